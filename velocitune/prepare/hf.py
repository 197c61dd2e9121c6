"""Domain sources read through the `datasets` library: `hf:PATH[:SPLIT][:FIELD]`.

PATH is a local dataset, never a Hub id (nothing is fetched: the library is told it is offline):
- a `save_to_disk` directory of a Dataset (`state.json`) or of a DatasetDict (`dataset_dict.json`);
- any other directory, read by `datasets.load_dataset(PATH, streaming=True)` (parquet, jsonl, arrow, csv files;
  their names give the splits);
- an `.arrow` file, or a glob of them (`Dataset.from_file`, memory-mapped).
SPLIT defaults to `train` when the dataset has it, else to its only split; FIELD (the text column) to
`--text-field`. Documents are read a batch of rows at a time, from memory-mapped Arrow or from a stream, so
memory stays bounded whatever the dataset's size. `datasets` is imported only when an hf: source is used.
"""

from __future__ import annotations

import glob
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from velocitune.errors import DataError

PREFIX = "hf:"
_BATCH_ROWS = 1024
_GRAMMAR = "hf:PATH[:SPLIT][:FIELD]"
_OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclass(frozen=True)
class HFSource:
    """Which part of a dataset a domain reads, and the files that identify its version."""

    layout: str  # "saved" (save_to_disk) | "files" (load_dataset on a directory) | "arrow" (one .arrow file)
    split: str | None  # None: the dataset has no splits (a saved Dataset, an Arrow file)
    field: str  # the text column
    files: tuple[tuple[str, int, int], ...]  # every file read: (path, size, mtime_ns), sorted by path


def is_spec(source: str) -> bool:
    return source.startswith(PREFIX)


def parse_spec(domain: str, spec: str) -> tuple[str, str | None, str | None]:
    """(path, split or None, field or None) of `hf:PATH[:SPLIT][:FIELD]`; `hf:PATH::FIELD` skips the split."""
    parts = spec[len(PREFIX):].split(":")
    if not parts[0] or len(parts) > 3:
        raise DataError(f"domain {domain!r}: {spec!r} is not a dataset source; expected {_GRAMMAR}, "
                        f"e.g. hf:data/code:train:text")
    path, split, field = parts + [""] * (3 - len(parts))
    return path, split or None, field or None


def spec_string(domain: str, spec: str, src: HFSource) -> str:
    """The resolved spec the manifest records: absolute path (or glob), chosen split, text column."""
    path = os.path.abspath(os.path.expanduser(parse_spec(domain, spec)[0]))
    return f"{PREFIX}{path}:{src.split or ''}:{src.field}"


# ----------------------------------------------------------------------------------------------
# the library, offline


def _import_datasets():
    try:
        import datasets
    except ImportError:
        raise DataError("reading hf: sources needs the `datasets` package; pip install 'velocitune[hf]'") from None
    return datasets


_offline_depth = 0
_saved: list = []


@contextmanager
def offline() -> Iterator[Any]:
    """The `datasets` module, with it and the Hub client set offline meanwhile (reads are local by design;
    offline mode turns a would-be download into an error instead of a silent fetch). Nested uses share one
    setting, restored when the outermost ends."""
    global _offline_depth
    datasets = _import_datasets()
    import huggingface_hub.constants as hub

    if _offline_depth == 0:
        _saved[:] = [datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE,
                     {k: os.environ.get(k) for k in _OFFLINE_ENV}]
        datasets.config.HF_HUB_OFFLINE = datasets.config.HF_DATASETS_OFFLINE = hub.HF_HUB_OFFLINE = True
        os.environ.update({k: "1" for k in _OFFLINE_ENV})
    _offline_depth += 1
    try:
        yield datasets
    finally:
        _offline_depth -= 1
        if _offline_depth == 0:
            datasets.config.HF_HUB_OFFLINE, datasets.config.HF_DATASETS_OFFLINE, hub.HF_HUB_OFFLINE, env = _saved
            for k, v in env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


# ----------------------------------------------------------------------------------------------
# resolving a spec


def _stat_files(root: str) -> tuple[tuple[str, int, int], ...]:
    """(path, size, mtime_ns) of `root` or of every non-hidden file under it, sorted by path."""
    paths = [root]
    if os.path.isdir(root):
        paths = []
        for d, dirs, names in os.walk(root, followlinks=True):
            dirs[:] = [x for x in dirs if not x.startswith(".")]  # .cache/ and the like: not the data
            paths += [os.path.join(d, f) for f in names if not f.startswith(".")]
    out = []
    for p in sorted(paths):
        st = os.stat(p)
        out.append((p, st.st_size, st.st_mtime_ns))
    return tuple(out)


def _choose_split(domain: str, path: str, splits: list[str], split: str | None) -> str:
    if split is not None:
        if split not in splits:
            raise DataError(f"domain {domain!r}: dataset {path} has no split {split!r}; its splits are {splits}. "
                            f"Name one of them: hf:{path}:SPLIT")
        return split
    if "train" in splits:
        return "train"
    if len(splits) == 1:
        return splits[0]
    raise DataError(f"domain {domain!r}: dataset {path} has splits {splits} and none is 'train'; name the one "
                    f"to read: hf:{path}:SPLIT")


def _check_field(domain: str, where: str, features: Any, field: str) -> None:
    """The text column exists and holds strings (`features` None: a stream whose columns are not known
    before reading; its values are checked as they come)."""
    if features is None:
        return
    if field not in features:
        raise DataError(f"domain {domain!r}: {where} has no column {field!r}; its columns are {list(features)}. "
                        f"Pass {_GRAMMAR} with FIELD (or --text-field NAME) to read another column")
    feature = features[field]
    if not isinstance(feature, _import_datasets().Value) or feature.dtype not in ("string", "large_string"):
        raise DataError(f"domain {domain!r}: column {field!r} of {where} has type {feature}, expected strings; "
                        f"pass {_GRAMMAR} with FIELD (or --text-field NAME) to read another column")


def _where(path: str, split: str | None) -> str:
    return f"dataset {path}" + (f" (split {split!r})" if split else "")


def _not_a_dataset(domain: str, path: str, why: str) -> DataError:
    return DataError(f"domain {domain!r}: {path} is not a dataset ({why}); hf: reads a `save_to_disk` "
                     f"directory, a directory of data files (parquet, jsonl, arrow, csv) or .arrow files")


def _saved_splits(domain: str, path: str) -> list[str] | None:
    """The splits of a `save_to_disk` DatasetDict, or None for another directory."""
    try:
        with open(os.path.join(path, "dataset_dict.json"), encoding="utf-8") as f:
            return list(json.load(f)["splits"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"domain {domain!r}: {os.path.join(path, 'dataset_dict.json')} is unreadable ({e}); "
                        f"save the dataset again with save_to_disk") from None


def resolve(domain: str, spec: str, text_field: str) -> list[tuple[str, HFSource]]:
    """The (path, HFSource) items a spec reads, checked: the path exists and is a dataset, the split and
    the text column exist, the column holds strings. One item, or one per file of an Arrow glob."""
    raw, split, field = parse_spec(domain, spec)
    field = field or text_field
    path = os.path.abspath(os.path.expanduser(raw))
    if glob.has_magic(path) or (path.endswith(".arrow") and not os.path.isdir(path)):
        matches = sorted(glob.glob(path, recursive=True)) if glob.has_magic(path) else [path] * os.path.isfile(path)
        if not matches:
            raise _missing(domain, raw, path)
        if split is not None:
            raise DataError(f"domain {domain!r}: Arrow files have no splits, got {split!r}; drop it: "
                            f"hf:{raw}::{field}")
        out = []
        for p in matches:
            src = HFSource("arrow", None, field, _stat_files(p))
            with _open(domain, p, src) as ds:
                _check_field(domain, _where(p, None), ds.features, field)
            out.append((p, src))
        return out
    if not os.path.exists(path):
        raise _missing(domain, raw, path)
    if not os.path.isdir(path):
        raise _not_a_dataset(domain, path, "a file that is not .arrow; to read a data file as it is, pass its path "
                                           "without hf:")
    splits = _saved_splits(domain, path)
    if splits is not None:
        split = _choose_split(domain, path, splits, split)
        src = HFSource("saved", split, field, _stat_files(os.path.join(path, split)))
    elif os.path.isfile(os.path.join(path, "state.json")):
        if split is not None:
            raise DataError(f"domain {domain!r}: dataset {path} is a single saved Dataset without splits, got "
                            f"split {split!r}; drop it: hf:{raw}::{field}")
        src = HFSource("saved", None, field, _stat_files(path))
    else:
        with offline() as datasets:
            streams = _load_files(domain, path, datasets)
            split = _choose_split(domain, path, list(streams), split)
        src = HFSource("files", split, field, _stat_files(path))
    with _open(domain, path, src) as ds:
        _check_field(domain, _where(path, src.split), ds.features, field)
    return [(path, src)]


def _missing(domain: str, raw: str, path: str) -> DataError:
    hub = " It looks like a Hugging Face Hub id, not a local path." if re.fullmatch(r"[\w.-]+/[\w.-]+", raw) else ""
    return DataError(f"domain {domain!r}: dataset path {path} does not exist.{hub} hf: reads local datasets only: "
                     f"on a machine with access run `datasets.load_dataset(...).save_to_disk(DIR)`, copy DIR here "
                     f"and pass hf:DIR")


def _load_files(domain: str, path: str, datasets: Any):
    """`load_dataset(path, streaming=True)`: an IterableDatasetDict, read lazily from the data files."""
    try:
        return datasets.load_dataset(path, streaming=True)
    except FileNotFoundError:  # DataFilesNotFoundError, EmptyDatasetError
        raise _not_a_dataset(domain, path, "neither a save_to_disk directory nor one with data files `datasets` "
                                           "can read") from None
    except ValueError as e:  # e.g. data files of several formats, a malformed README config
        raise _not_a_dataset(domain, path, str(e).splitlines()[0] if str(e) else type(e).__name__) from None


@contextmanager
def _open(domain: str, path: str, src: HFSource) -> Iterator[Any]:
    """The Dataset (memory-mapped) or IterableDataset (streamed) a source reads, offline."""
    with offline() as datasets:
        try:
            if src.layout == "arrow":
                ds = datasets.Dataset.from_file(path)
            elif src.layout == "saved":
                ds = datasets.load_from_disk(os.path.join(path, src.split) if src.split else path)
            else:
                ds = _load_files(domain, path, datasets)[src.split]
        except DataError:
            raise
        except Exception as e:  # ArrowInvalid, FileNotFoundError, JSON errors from damaged files
            raise _not_a_dataset(domain, path, f"{type(e).__name__}: {e}") from None
        yield ds


# ----------------------------------------------------------------------------------------------
# reading documents


def _batches(domain: str, path: str, src: HFSource) -> Iterator[Any]:
    """The text column a batch of rows at a time: an Arrow ChunkedArray (Dataset) or a list (stream)."""
    with offline() as datasets, _open(domain, path, src) as ds:
        ds = ds.select_columns([src.field])
        if isinstance(ds, datasets.Dataset):
            # Arrow batches sliced from the memory map: no Python objects but this batch's texts.
            batches = (table.column(0) for table in ds.with_format("arrow").iter(batch_size=_BATCH_ROWS))
        else:
            batches = (batch[src.field] for batch in ds.iter(batch_size=_BATCH_ROWS))
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                return
            except Exception as e:  # a damaged data file met mid-stream (JSON, Parquet, Arrow errors)
                raise DataError(f"domain {domain!r}: cannot read {_where(path, src.split)} ({type(e).__name__}: "
                                f"{e}); a data file is corrupt or truncated: replace or remove it") from None
            yield batch


def is_utf8(domain: str, path: str, src: HFSource) -> bool:
    """Whether the text column is valid UTF-8 throughout (Arrow strings are not checked when read)."""
    import pyarrow as pa

    for col in _batches(domain, path, src):
        if isinstance(col, list):
            return True  # a stream decodes its files into Python strings: valid by construction
        try:
            col.validate(full=True)
        except pa.ArrowInvalid:
            return False
    return True


def iter_documents(domain: str, path: str, src: HFSource) -> Iterator[tuple[int, str | None]]:
    """(row, text) for every row of the dataset's split, in order; text None for a null."""
    row = 0
    for col in _batches(domain, path, src):
        for text in col if isinstance(col, list) else col.to_pylist():
            if text is not None and not isinstance(text, str):
                raise DataError(f"domain {domain!r}: {_where(path, src.split)}, row {row}: column {src.field!r} "
                                f"holds a {type(text).__name__}, expected a string; pass {_GRAMMAR} with FIELD "
                                f"(or --text-field NAME) to read another column")
            yield row, text
            row += 1
