"""A prepared mixture as a `datasets.IterableDataset`, for pipelines built on the `datasets` library.

    from velocitune.integrations.hf_datasets import mixture_dataset
    stream = mixture_dataset("prepared", seq_len=1024, global_batch=64, steps=2000)
    for example in stream.take(2):
        print(example["domain"], len(example["input_ids"]))

It yields exactly the items of `hf_trainer.MixtureDataset` in the same order (sequence i % B of global step
i // B of the sampler's plan), as lists, plus the name of each sequence's domain. The mixture is fixed (the
given weights, default w0, the natural token shares): re-weighting while training needs the dataset object
that `VelocituneCallback` updates, i.e. `MixtureDataset` itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

from velocitune.errors import DataError
from velocitune.integrations.hf_trainer import MixtureDataset


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("mixture_dataset needs the `datasets` package; pip install 'velocitune[hf]'") from None
    return datasets


def _examples(data_path: str, seq_len: int, global_batch: int, steps: int | None, seed: int,
              weights: dict[str, float] | None, max_repetition: float) -> Iterator[dict[str, Any]]:
    # Built inside the generator so that each iteration (and each DataLoader worker) opens its own memmaps.
    data = MixtureDataset(data_path, seq_len, global_batch, steps=steps, seed=seed, weights=weights,
                          max_repetition=max_repetition)
    for i in range(len(data)):
        item = data[i]
        yield {"input_ids": item["input_ids"].tolist(), "labels": item["labels"].tolist(),
               "domain": data.names[data.domain_of(i)]}


def mixture_dataset(data_path: str | Path, seq_len: int, global_batch: int, steps: int | None = None,
                    seed: int = 0, weights: dict[str, float] | None = None, max_repetition: float = 1.0):
    """A `datasets.IterableDataset` of {"input_ids", "labels", "domain"}: the planned token stream of a
    prepared directory (arguments as for `MixtureDataset`; `.with_format("torch")` gives tensors)."""
    datasets = _import_datasets()
    MixtureDataset(data_path, seq_len, global_batch, steps=steps, seed=seed, weights=weights,
                   max_repetition=max_repetition)  # checks the arguments now, not at the first example
    ids = datasets.Sequence(datasets.Value("int64"))
    features = datasets.Features({"input_ids": ids, "labels": ids, "domain": datasets.Value("string")})
    # Plain values only in gen_kwargs: `datasets` would split a list argument across shards.
    kwargs = {"data_path": str(data_path), "seq_len": int(seq_len), "global_batch": int(global_batch),
              "steps": steps, "seed": int(seed), "weights": dict(weights) if weights is not None else None,
              "max_repetition": float(max_repetition)}
    return datasets.IterableDataset.from_generator(_examples, features=features, gen_kwargs=kwargs)
