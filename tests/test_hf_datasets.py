"""velocitune.integrations.hf_datasets: a prepared mixture as a `datasets.IterableDataset` yields exactly what
`MixtureDataset` yields, with each sequence's domain name."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from velocitune.errors import DataError
from velocitune.integrations.hf_trainer import MixtureDataset

datasets = pytest.importorskip("datasets")


@pytest.fixture(autouse=True)
def _cache_in_tmp(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


@pytest.mark.parametrize("weights", [None, {"prose": 0.6, "code": 0.3, "math": 0.1}])
def test_yields_exactly_what_mixture_dataset_yields(tiny_prepared, weights):
    from velocitune.integrations.hf_datasets import mixture_dataset

    kw = dict(seq_len=32, global_batch=8, steps=5, seed=3, weights=weights)
    ref = MixtureDataset(tiny_prepared, **kw)
    got = list(mixture_dataset(tiny_prepared, **kw))
    assert len(got) == len(ref) == 40
    for i, ex in enumerate(got):
        item = ref[i]
        assert ex["input_ids"] == item["input_ids"].tolist() and ex["labels"] == item["labels"].tolist()
        assert ex["domain"] == ref.names[ref.domain_of(i)]
    # The mixture is the given one: the domains drawn are not all the same.
    assert len({ex["domain"] for ex in got}) == 3


def test_torch_format_and_a_second_pass_are_the_same_stream(tiny_prepared):
    from velocitune.integrations.hf_datasets import mixture_dataset

    stream = mixture_dataset(tiny_prepared, seq_len=16, global_batch=4, steps=2).with_format("torch")
    first, second = list(stream), list(stream)
    assert [ex["domain"] for ex in first] == [ex["domain"] for ex in second]
    assert all(np.array_equal(a["input_ids"].numpy(), b["input_ids"].numpy()) for a, b in zip(first, second))
    assert first[0]["input_ids"].shape == (16,)


def test_without_datasets(tiny_prepared, monkeypatch):
    from velocitune.integrations.hf_datasets import mixture_dataset

    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"needs the `datasets` package; pip install 'velocitune\[hf\]'"):
        mixture_dataset(tiny_prepared, seq_len=16, global_batch=4)
