"""`velocitune prepare`: tokenize per-domain corpora into token shards with a fixed held-out val split.

Per domain, two streaming passes over its documents (memory stays bounded whatever the corpus size):
1. scan: read every document, hash its text, and pick the validation documents: those with the
   lowest hashes (see `_ValSelector`); only val candidates (about `val_fraction` of the corpus) are
   tokenized here, to learn their lengths;
2. write: tokenize every document (in `workers` processes, in document order) and append it, followed
   by the EOS token, to the train or val token stream, cut into shards of `shard_tokens` tokens.

Output layout and manifest: docs/contracts.md. Every file is written atomically; a domain's `.done`
marker is written last, so a rerun skips finished domains and redoes interrupted ones from scratch.
With `num_shards=N, shard_index=I` a machine writes the I-th contiguous 1/N of every domain's documents
into a part directory; `merge_prepared` concatenates the parts into exactly what one machine writes.
"""

from __future__ import annotations

import argparse
import codecs
import difflib
import glob
import gzip
import hashlib
import heapq
import io
import json
import logging
import multiprocessing
import os
import re
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from velocitune.errors import ConfigError, DataError
from velocitune.metrics import atomic_write_json
from velocitune.shards import (
    DONE_MARKER,
    MANIFEST_FORMAT,
    MANIFEST_VERSION,
    ShardWriter,
    choose_dtype,
    open_shard,
    read_header,
)

log = logging.getLogger(__name__)

TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".tex")
JSONL_EXTENSIONS = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_EXTENSIONS = (".parquet",)

DEFAULT_VAL_FRACTION = 0.01
DEFAULT_VAL_TOKENS = 1_000_000
DEFAULT_SHARD_TOKENS = 100_000_000
# Bumped whenever the token stream written for the same inputs would change: it is part of the
# inputs hash, so finished domains from an older velocitune are redone rather than reused.
PREPARE_VERSION = 1

# A unit of tokenizer work: documents are grouped until ~this many characters (or documents).
# Small enough that the last batch of a domain leaves the other workers idle only briefly.
_BATCH_CHARS = 256 * 1024
_BATCH_DOCS = 4096
_COPY_CHUNK = 1 << 24  # tokens per read when merging parts
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HASH_SPACE = 2**64


# ----------------------------------------------------------------------------------------------
# settings and inputs


@dataclass(frozen=True)
class Settings:
    """Everything besides the files and the tokenizer that shapes the token streams."""

    val_fraction: float
    val_tokens: int
    text_field: str
    extensions: tuple[str, ...]  # extra text-file extensions, normalised (".c"), sorted
    strict: bool
    shard_tokens: int

    def to_json(self) -> dict:
        d = asdict(self)
        d["extensions"] = list(self.extensions)
        return d


@dataclass(frozen=True)
class SourceFile:
    """One input file: how to read it, and what identifies its version (size, mtime)."""

    path: str
    kind: str  # "text" | "jsonl" | "parquet"
    size: int
    mtime_ns: int


def _normalize_extensions(extensions: Iterable[str] | None) -> tuple[str, ...]:
    out = set()
    for raw in extensions or ():
        for ext in str(raw).split(","):
            ext = ext.strip().lower()
            if not ext:
                continue
            out.add(ext if ext.startswith(".") else "." + ext)
    return tuple(sorted(out))


def make_settings(val_fraction: float = DEFAULT_VAL_FRACTION, val_tokens: int = DEFAULT_VAL_TOKENS,
                  text_field: str = "text", extensions: Iterable[str] | None = None, strict: bool = False,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Settings:
    """Validated `Settings` (ConfigError naming the option on a bad value)."""
    if not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction} (--val-fraction)")
    if int(val_tokens) < 1:
        raise ConfigError(f"val_tokens must be >= 1, got {val_tokens} (--val-tokens)")
    if int(shard_tokens) < 1:
        raise ConfigError(f"shard_tokens must be >= 1, got {shard_tokens} (--shard-tokens)")
    if not text_field:
        raise ConfigError("text_field must be a non-empty field name (--text-field)")
    return Settings(float(val_fraction), int(val_tokens), str(text_field),
                    _normalize_extensions(extensions), bool(strict), int(shard_tokens))


def normalize_domains(domains: dict[str, Any] | list[tuple[str, str]]) -> dict[str, list[str]]:
    """{name: [paths]} in the order given; (name, path) pairs with a repeated name add paths."""
    out: dict[str, list[str]] = {}
    if isinstance(domains, dict):
        items = []
        for name, paths in domains.items():
            if isinstance(paths, (str, os.PathLike)):
                paths = [paths]
            if not isinstance(paths, (list, tuple)) or not paths:
                raise DataError(f"domain {name!r}: give a path or a list of paths, got {paths!r}")
            items += [(name, p) for p in paths]
    else:
        items = list(domains)
    for name, path in items:
        name = str(name)
        if not _DOMAIN_NAME.match(name) or name == "manifest.json":
            raise DataError(
                f"domain name {name!r} is not allowed: use letters, digits, '.', '_' or '-', starting "
                f"with a letter or digit (it becomes a directory name)"
            )
        out.setdefault(name, []).append(os.fspath(path))
    if not out:
        raise DataError("no domains given; pass --domain NAME=PATH (one per domain, repeatable)")
    return out


def file_kind(path: str, extensions: tuple[str, ...]) -> str | None:
    """How to read `path` from its name, or None when the name is not a supported input."""
    low = path.lower()
    if low.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    if low.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    if low.endswith(TEXT_EXTENSIONS + extensions):
        return "text"
    return None


def _walk(root: str) -> Iterator[str]:
    """Every file under `root`, skipping hidden files and directories (.git, editor backups, ...)."""
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith("."):
                yield os.path.join(dirpath, f)


def list_domain_files(name: str, sources: list[str],
                      extensions: tuple[str, ...]) -> tuple[list[SourceFile], list[str]]:
    """A domain's input files in their deterministic order, and its sources as absolute paths.

    Each source is a file, a directory (read recursively) or a glob pattern; within a source files are
    sorted by path; sources keep the order given; a file reached twice is read once.
    """
    files: list[SourceFile] = []
    seen: set[str] = set()
    ignored: dict[str, int] = {}
    abs_sources = []
    supported = ", ".join(TEXT_EXTENSIONS + extensions + JSONL_EXTENSIONS + PARQUET_EXTENSIONS)
    for src in sources:
        src_abs = os.path.abspath(os.path.expanduser(src))
        abs_sources.append(src_abs)
        if os.path.isfile(src_abs):
            if file_kind(src_abs, extensions) is None:
                ext = os.path.splitext(src_abs)[1] or "(none)"
                raise DataError(
                    f"domain {name!r}: {src_abs} has an unsupported extension {ext}; supported: "
                    f"{supported}. To read it as plain text (one file = one document), pass --ext {ext}"
                )
            candidates = [src_abs]
        elif os.path.isdir(src_abs):
            candidates = sorted(_walk(src_abs))
        elif glob.has_magic(src_abs):
            candidates = []
            for match in sorted(glob.glob(src_abs, recursive=True)):
                candidates += sorted(_walk(match)) if os.path.isdir(match) else [match]
            if not candidates:
                raise DataError(f"domain {name!r}: the pattern {src_abs} matches no files; check the path")
        else:
            raise DataError(
                f"domain {name!r}: input path {src_abs} does not exist; give an existing file, "
                f"directory or glob pattern (--domain {name}=PATH)"
            )
        for path in candidates:
            kind = file_kind(path, extensions)
            if kind is None:
                ext = os.path.splitext(path)[1] or "(none)"
                ignored[ext] = ignored.get(ext, 0) + 1
                continue
            key = os.path.realpath(path)
            if key in seen:
                continue
            seen.add(key)
            try:
                st = os.stat(path)
            except OSError as e:  # e.g. a dangling symlink
                raise DataError(f"domain {name!r}: cannot read {path} ({e}); fix or remove it") from None
            files.append(SourceFile(path, kind, st.st_size, st.st_mtime_ns))
    if not files:
        why = ""
        if ignored:
            top = sorted(ignored.items(), key=lambda kv: -kv[1])[:5]
            why = (f" (ignored {', '.join(f'{n} {e}' for e, n in top)} files; to read them as plain "
                   f"text pass --ext {top[0][0]})")
        raise DataError(
            f"domain {name!r}: no input files with a supported extension under {abs_sources}{why}; "
            f"supported: {supported}"
        )
    return files, abs_sources


def inputs_hash(files: list[SourceFile], tokenizer_hash: str, eos_token_id: int, settings: Settings) -> str:
    """sha256 of what the domain's output depends on: file paths, sizes and mtimes, tokenizer, settings.

    The part index of a sharded prepare is not included: every part of a domain shares this hash.
    """
    h = hashlib.sha256()
    head = {"prepare_version": PREPARE_VERSION, "tokenizer": tokenizer_hash, "eos": eos_token_id,
            "settings": settings.to_json()}
    h.update(json.dumps(head, sort_keys=True).encode())
    for f in files:
        h.update(json.dumps([f.path, f.kind, f.size, f.mtime_ns]).encode())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# reading documents


class _NotUtf8(Exception):
    """A text file that is not valid UTF-8 (raised before any of its documents is yielded)."""


@contextmanager
def _open_binary(path: str) -> Iterator[BinaryIO]:
    """The decompressed bytes of a (possibly .gz / .zst) file."""
    if path.lower().endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield f
    elif path.lower().endswith(".zst"):
        try:
            import zstandard
        except ImportError:
            raise DataError(
                f"{path} is zstd-compressed but the `zstandard` package is not installed; "
                f"pip install 'velocitune[formats]' (or zstandard)"
            ) from None
        with open(path, "rb") as raw:
            reader = zstandard.ZstdDecompressor().stream_reader(raw)
            with io.BufferedReader(reader, buffer_size=1 << 20) as f:
                yield f
    else:
        with open(path, "rb") as f:
            yield f


def _decompress_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


def _import_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise DataError(
            "reading .parquet files needs the `pyarrow` package; pip install 'velocitune[formats]'"
        ) from None
    return pyarrow, pyarrow.parquet


def _parquet_text_column(path: str, field: str, domain: str):
    """(ParquetFile, is_binary) for a file whose column `field` holds the documents."""
    pa, pq = _import_pyarrow()
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError subclasses for unreadable files
        raise DataError(f"domain {domain!r}: {path} is not a readable Parquet file ({e})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        raise DataError(
            f"domain {domain!r}: {path} has no column {field!r}; its columns are {schema.names}. "
            f"Pass --text-field NAME to read another column"
        )
    typ = schema.field(field).type
    if pa.types.is_string(typ) or pa.types.is_large_string(typ):
        return pf, False
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        return pf, True
    raise DataError(
        f"domain {domain!r}: column {field!r} of {path} has type {typ}, expected strings; "
        f"pass --text-field NAME to read another column"
    )


def _parquet_batches(path: str, field: str, domain: str) -> Iterator[tuple[Any, bool]]:
    """(Arrow array of the text column, is_binary), one record batch at a time."""
    pf, is_binary = _parquet_text_column(path, field, domain)
    batches = pf.iter_batches(batch_size=1024, columns=[field])
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception as e:  # ArrowInvalid / OSError from a damaged file
            raise DataError(f"domain {domain!r}: cannot read {path} ({e}); the Parquet file is corrupt "
                            f"or truncated: replace or remove it") from None
        yield batch.column(0), is_binary


def is_utf8(f: SourceFile, text_field: str, domain: str) -> bool:
    """Whether a JSON Lines or Parquet file is valid UTF-8 throughout (checked before reading it,
    so that a bad file is skipped whole rather than after some of its documents were counted)."""
    if f.kind == "jsonl":
        decoder = codecs.getincrementaldecoder("utf-8")()
        try:
            with _open_binary(f.path) as fh:
                while chunk := fh.read(1 << 20):
                    decoder.decode(chunk)
                decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return False
        except _decompress_errors() as e:
            raise DataError(f"domain {domain!r}: cannot read or decompress {f.path} ({e}); the file is "
                            f"unreadable, corrupt or truncated: replace or remove it") from None
        return True
    if f.kind == "parquet":
        pa, _ = _import_pyarrow()
        for col, is_binary in _parquet_batches(f.path, text_field, domain):
            try:
                # A full validation checks string UTF-8; a binary -> string cast does the same.
                col.cast(pa.large_string()) if is_binary else col.validate(full=True)
            except pa.ArrowInvalid:
                return False
        return True
    raise ValueError(f"is_utf8 checks jsonl and parquet files, not {f.kind}")


def iter_documents(f: SourceFile, text_field: str, domain: str) -> Iterator[tuple[int, str | None]]:
    """(location, text) for every document of a file; location = line (jsonl) or row (parquet) number.

    Text files are one document (location 0) and raise _NotUtf8 before yielding if they do not decode.
    `text` is None for a null field; empty and null documents are the caller's to skip.
    """
    if f.kind == "text":
        try:
            with open(f.path, "rb") as fh:
                data = fh.read()
        except OSError as e:
            raise DataError(f"domain {domain!r}: cannot read {f.path} ({e})") from None
        try:
            yield 0, data.decode("utf-8")
        except UnicodeDecodeError:
            raise _NotUtf8(f.path) from None
    elif f.kind == "jsonl":
        try:
            with _open_binary(f.path) as fh:
                for lineno, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    yield lineno, _jsonl_text(line, f.path, lineno, text_field, domain)
        except _decompress_errors() as e:
            raise DataError(f"domain {domain!r}: cannot read or decompress {f.path} ({e}); the file is "
                            f"unreadable, corrupt or truncated: replace or remove it") from None
    elif f.kind == "parquet":
        pa, _ = _import_pyarrow()
        row = 0
        for col, is_binary in _parquet_batches(f.path, text_field, domain):
            for text in (col.cast(pa.large_string()) if is_binary else col).to_pylist():
                yield row, text
                row += 1
    else:
        raise ValueError(f"unknown file kind {f.kind!r}")


def _jsonl_text(line: bytes, path: str, lineno: int, field: str, domain: str) -> str | None:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataError(
            f"domain {domain!r}: {path}, line {lineno}: malformed JSON ({e.msg} at column {e.colno}); "
            f"fix or remove that line"
        ) from None
    except UnicodeDecodeError:
        raise DataError(f"domain {domain!r}: {path}, line {lineno}: not UTF-8; re-encode the file") from None
    if not isinstance(obj, dict):
        raise DataError(
            f"domain {domain!r}: {path}, line {lineno}: a JSON {type(obj).__name__}, expected an object "
            f"with a {field!r} field"
        )
    if field not in obj:
        raise DataError(
            f"domain {domain!r}: {path}, line {lineno}: no field {field!r}; the line has fields "
            f"{sorted(obj)[:20]}. Pass --text-field NAME to read another field"
        )
    text = obj[field]
    if text is not None and not isinstance(text, str):
        raise DataError(
            f"domain {domain!r}: {path}, line {lineno}: field {field!r} is a {type(text).__name__}, "
            f"expected a string; pass --text-field NAME to read another field"
        )
    return text


def doc_hash(text: str) -> int:
    """A stable 64-bit hash of a document's UTF-8 text: decides the val split (same on every machine)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


# ----------------------------------------------------------------------------------------------
# the tokenizer and the processes that run it


@dataclass(frozen=True)
class TokenizerInfo:
    name_or_path: str
    vocab_size: int
    hash: str
    eos_token_id: int
    spec: dict  # what a worker needs to rebuild the exact same encoder (see _BatchEncoder)
    fingerprint: str = ""  # model.vocab_fingerprint: lets `train` refuse a model with another vocabulary

    def manifest(self) -> dict:
        return {"name_or_path": self.name_or_path, "vocab_size": self.vocab_size, "hash": self.hash,
                "eos_token_id": self.eos_token_id, "vocab_fingerprint": self.fingerprint}


def _tokenizer_hash(directory: Path, vocab_files: Iterable[str]) -> str:
    """sha256 of tokenizer.json; without one, of the vocab files present (each name, NUL, content),
    else of every file in the directory."""
    if (directory / "tokenizer.json").is_file():
        return hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest()
    names = sorted(n for n in set(vocab_files) if (directory / n).is_file())
    if not names:
        names = sorted(p.name for p in directory.iterdir() if p.is_file())
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode() + b"\0")
        h.update((directory / n).read_bytes())
    return h.hexdigest()


def load_tokenizer(tokenizer_dir: str | os.PathLike) -> TokenizerInfo:
    """Load a local Hugging Face tokenizer directory (never downloads) and describe it."""
    directory = Path(tokenizer_dir).expanduser().absolute()
    hint = ("pass --tokenizer a local Hugging Face tokenizer directory (with tokenizer.json or vocab "
            "files, e.g. written by tokenizer.save_pretrained(DIR))")
    if not directory.is_dir():
        raise DataError(f"tokenizer directory {directory} does not exist; {hint}")
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many types (OSError, ValueError, JSON errors ...)
        raise DataError(
            f"could not load a tokenizer from {directory} ({type(e).__name__}: {e}); {hint}"
        ) from None
    if tok.eos_token_id is None:
        raise DataError(
            f"the tokenizer in {directory} has no EOS token, which prepare appends after every "
            f"document; set \"eos_token\" in its tokenizer_config.json (e.g. \"<|endoftext|>\")"
        )
    vocab_size = len(tok)
    dtype = choose_dtype(vocab_size)
    spec: dict = {"eos": int(tok.eos_token_id), "dtype": dtype.name}
    if getattr(tok, "is_fast", False) and getattr(tok, "backend_tokenizer", None) is not None:
        # The serialised backend rebuilds in a worker in milliseconds without importing transformers.
        spec.update(kind="fast", json=tok.backend_tokenizer.to_str())
    else:
        spec.update(kind="hf", dir=str(directory))
    vocab_files = getattr(tok, "vocab_files_names", {}).values()
    from velocitune.model import vocab_fingerprint

    return TokenizerInfo(str(directory), vocab_size, _tokenizer_hash(directory, vocab_files),
                         int(tok.eos_token_id), spec, vocab_fingerprint(tok))


class _BatchEncoder:
    """Encodes a list of documents (no special tokens) into one flat token array, EOS after each."""

    def __init__(self, spec: dict):
        self.eos = int(spec["eos"])
        self.dtype = np.dtype(spec["dtype"])
        if spec["kind"] == "fast":
            from tokenizers import Tokenizer

            tk = Tokenizer.from_str(spec["json"])
            tk.no_truncation()
            tk.no_padding()
            # encode_batch_fast (tokenizers >= 0.21) skips character offsets we do not use.
            encode = getattr(tk, "encode_batch_fast", tk.encode_batch)
            self._ids = lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(spec["dir"], local_files_only=True)
            self._ids = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]

    def encode(self, texts: list[str], lengths_only: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
        """(tokens (sum(lengths),) in the shard dtype or None, lengths (len(texts),) int64 incl. EOS)."""
        ids = self._ids(texts)
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        if lengths_only:
            return None, lengths
        out = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for x in ids:
            n = len(x)
            out[pos : pos + n] = x  # numpy raises OverflowError for an id the dtype cannot hold
            out[pos + n] = self.eos
            pos += n + 1
        return out, lengths


_WORKER: _BatchEncoder | None = None


def _init_worker(spec: dict) -> None:
    global _WORKER
    # One thread per worker process: the pool already uses every core we were given.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = _BatchEncoder(spec)


def _encode_in_worker(texts: list[str], lengths_only: bool) -> tuple[np.ndarray | None, np.ndarray]:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.encode(texts, lengths_only)


class _Encoder:
    """Tokenizes batches in `workers` processes (in this process when workers == 1), results in order."""

    def __init__(self, spec: dict, workers: int):
        self.workers = workers
        self._inline = _BatchEncoder(spec) if workers <= 1 else None
        # spawn, not fork: the parent may hold tokenizer threads and tqdm's monitor thread.
        self._pool = (multiprocessing.get_context("spawn").Pool(workers, _init_worker, (spec,))
                      if workers > 1 else None)
        self._max_inflight = 2 * workers + 1  # keeps every worker busy; bounds queued text in memory

    def map(self, jobs: Iterable[tuple[Any, list[str]]],
            lengths_only: bool = False) -> Iterator[tuple[Any, np.ndarray | None, np.ndarray]]:
        """(meta, tokens, lengths) for each (meta, texts) job, in job order."""
        if self._inline is not None:
            for meta, texts in jobs:
                yield (meta, *self._inline.encode(texts, lengths_only))
            return
        assert self._pool is not None
        pending: deque = deque()
        for meta, texts in jobs:
            pending.append((meta, self._pool.apply_async(_encode_in_worker, (texts, lengths_only))))
            while len(pending) >= self._max_inflight:
                m, result = pending.popleft()
                yield (m, *result.get())
        while pending:
            m, result = pending.popleft()
            yield (m, *result.get())

    def __enter__(self) -> _Encoder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()


# ----------------------------------------------------------------------------------------------
# pass 1: scan a domain and choose its val documents


class _ValSelector:
    """Streaming choice of the val set among candidate documents (hash < val_fraction * 2^64).

    Rule: sort candidates by hash; take them in that order while the tokens already taken are below
    `cap` (so the last one may cross it). Identical documents share a hash and go together. Only the
    chosen candidates are kept (a max-heap on hash), so memory is bounded by the cap, not the corpus.
    """

    def __init__(self, cap: int):
        self.cap = cap
        self.total = 0
        self.groups: dict[int, list] = {}  # hash -> [tokens, [ordinals]]
        self._heap: list[int] = []  # negated hashes of the groups

    def add(self, h: int, ordinal: int, n_tokens: int) -> None:
        group = self.groups.get(h)
        if group is None:
            if self._heap and self.total >= self.cap and h > -self._heap[0]:
                return  # would be the last in hash order after the cap is reached: never chosen
            group = self.groups[h] = [0, []]
            heapq.heappush(self._heap, -h)
        group[0] += n_tokens
        group[1].append(ordinal)
        self.total += n_tokens
        # Drop the highest-hash group while the others already reach the cap without it.
        while self._heap:
            top = self.groups[-self._heap[0]]
            if self.total - top[0] < self.cap:
                break
            self.total -= top[0]
            del self.groups[-heapq.heappop(self._heap)]

    def ordinals(self) -> list[int]:
        return [o for _, ords in self.groups.values() for o in ords]


@dataclass
class _Scan:
    """What pass 1 learns about a domain."""

    files: list[tuple[SourceFile, int]]  # every readable file and its non-empty document count
    skipped: list[str]  # files skipped as not UTF-8
    n_docs: int  # non-empty documents; their ordinals are 0 .. n_docs-1 in file order
    n_empty: int  # empty or null documents (not counted, not written)
    val_ordinals: np.ndarray  # sorted int64 ordinals of the val documents


def _candidate_batches(name: str, files: list[SourceFile], settings: Settings, state: dict,
                       bar: tqdm) -> Iterator[tuple[tuple[list[int], list[int]], list[str]]]:
    """Reads the whole domain once; yields batches of val candidates ((hashes, ordinals), texts) and
    fills `state` with per-file counts, skipped files and the lowest hash seen."""
    threshold = int(settings.val_fraction * _HASH_SPACE)
    hashes: list[int] = []
    ordinals: list[int] = []
    texts: list[str] = []
    chars = 0
    ordinal = 0
    for f in files:
        if f.kind != "text" and not is_utf8(f, settings.text_field, name):
            _skip_file(name, f.path, settings.strict, state["skipped"])
            continue
        first = ordinal
        try:
            for loc, text in iter_documents(f, settings.text_field, name):
                if not text:
                    state["n_empty"] += 1
                    continue
                try:
                    h = doc_hash(text)
                except UnicodeEncodeError:
                    where = f"line {loc}" if f.kind == "jsonl" else f"row {loc}"
                    raise DataError(
                        f"domain {name!r}: {f.path}, {where}: the text contains an unpaired surrogate "
                        f"escape (e.g. \\ud800), which is not valid Unicode; fix or remove it"
                    ) from None
                if h < state["min_hash"]:
                    state["min_hash"], state["min_ordinals"] = h, [ordinal]
                elif h == state["min_hash"]:
                    state["min_ordinals"].append(ordinal)
                if h < threshold:
                    hashes.append(h)
                    ordinals.append(ordinal)
                    texts.append(text)
                    chars += len(text)
                    if chars >= _BATCH_CHARS or len(texts) >= _BATCH_DOCS:
                        yield (hashes, ordinals), texts
                        hashes, ordinals, texts, chars = [], [], [], 0
                ordinal += 1
        except _NotUtf8:
            _skip_file(name, f.path, settings.strict, state["skipped"])
            continue
        state["files"].append((f, ordinal - first))
        bar.update(ordinal - first)
    state["n_docs"] = ordinal
    if texts:
        yield (hashes, ordinals), texts


def _skip_file(domain: str, path: str, strict: bool, skipped: list[str]) -> None:
    if strict:
        raise DataError(
            f"domain {domain!r}: {path} is not valid UTF-8; re-encode it (e.g. `iconv -f latin1 -t "
            f"utf-8`) or remove it, or drop --strict to skip such files with a warning"
        )
    log.warning("domain %r: skipping %s: not valid UTF-8 (counted in the manifest's skipped_files; "
                "--strict makes this an error)", domain, path)
    skipped.append(path)


def _scan_domain(name: str, files: list[SourceFile], settings: Settings, encoder: _Encoder,
                 progress: bool) -> _Scan:
    """Pass 1: count documents and choose the val split (module docstring); errors on degenerate domains."""
    state: dict = {"files": [], "skipped": [], "n_empty": 0, "n_docs": 0,
                   "min_hash": _HASH_SPACE, "min_ordinals": []}
    selector = _ValSelector(settings.val_tokens)
    with tqdm(desc=f"{name}: scan", unit=" docs", disable=not progress, leave=False) as bar:
        jobs = _candidate_batches(name, files, settings, state, bar)
        for (hashes, ordinals), _, lengths in encoder.map(jobs, lengths_only=True):
            for h, o, n in zip(hashes, ordinals, lengths.tolist()):
                selector.add(h, o, n)
    n_docs = state["n_docs"]
    val = selector.ordinals()
    if not val and n_docs >= 2:
        # No document fell under val_fraction (a small domain): hold out the lowest-hash one(s).
        val = state["min_ordinals"]
    if n_docs == 0:
        raise DataError(
            f"domain {name!r} yields no documents: its {len(files)} input file(s) are empty"
            + (f" or not UTF-8 ({len(state['skipped'])} skipped)" if state["skipped"] else "")
            + f"; check its paths and --text-field ({settings.text_field!r})"
        )
    if n_docs == 1:
        raise DataError(
            f"domain {name!r} has a single document, so a held-out val set would take all of it; give "
            f"it at least 2 documents (a text file is one document: split it into several files)"
        )
    if len(val) >= n_docs:
        raise DataError(
            f"domain {name!r}: the val split would take all {n_docs} documents (val_fraction="
            f"{settings.val_fraction}, val_tokens={settings.val_tokens}; identical documents go together); "
            f"lower --val-fraction or --val-tokens, or add distinct documents"
        )
    return _Scan(state["files"], state["skipped"], n_docs, state["n_empty"],
                 np.array(sorted(val), dtype=np.int64))


# ----------------------------------------------------------------------------------------------
# pass 2: write the token streams


class _SplitWriter:
    """One split's token stream, cut into shards of exactly `shard_tokens` tokens (the last may be short)."""

    def __init__(self, root: Path, domain: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.domain, self.split = root, domain, split
        self.dtype, self.shard_tokens = dtype, shard_tokens
        self.shards: list[str] = []  # finished shards, relative to root
        self.n_tokens = 0
        self.n_docs = 0
        self._current: ShardWriter | None = None

    def write(self, tokens: np.ndarray, n_docs: int = 0) -> None:
        self.n_docs += n_docs
        while tokens.size:
            if self._current is None:
                rel = f"{self.domain}/{self.split}_{len(self.shards):05d}.bin"
                self._current = ShardWriter(self.root / rel, self.dtype)
            room = self.shard_tokens - self._current.n_tokens
            self._current.write(tokens[:room])
            self.n_tokens += min(room, tokens.size)
            tokens = tokens[room:]
            if self._current.n_tokens == self.shard_tokens:
                self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._current is not None
        path = self._current.close()
        self.shards.append(path.relative_to(self.root).as_posix())
        self._current = None

    def close(self) -> dict:
        """The split's manifest entry: {"tokens", "documents", "shards"}."""
        if self._current is not None:
            self._finish_shard()
        return {"tokens": self.n_tokens, "documents": self.n_docs, "shards": list(self.shards)}

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None


def _slice_batches(name: str, scan: _Scan, lo: int, hi: int,
                   text_field: str) -> Iterator[tuple[tuple[int, int], list[str]]]:
    """Documents with ordinals in [lo, hi) as batches ((first ordinal, count), texts), in order."""
    texts: list[str] = []
    chars = 0
    first = ordinal = 0
    for f, n_file in scan.files:
        if ordinal + n_file <= lo:
            ordinal += n_file  # the whole file lies before this slice: do not read it
            continue
        if ordinal >= hi:
            break
        file_first = ordinal
        for _, text in iter_documents(f, text_field, name):
            if not text:
                continue
            if lo <= ordinal < hi:
                if not texts:
                    first = ordinal
                texts.append(text)
                chars += len(text)
                if chars >= _BATCH_CHARS or len(texts) >= _BATCH_DOCS:
                    yield (first, len(texts)), texts
                    texts, chars = [], 0
            ordinal += 1
        if ordinal - file_first != n_file:
            raise DataError(
                f"domain {name!r}: {f.path} changed while it was being prepared ({n_file} documents, "
                f"then {ordinal - file_first}); re-run `velocitune prepare` once it is stable"
            )
    if texts:
        yield (first, len(texts)), texts


def _write_domain(out: Path, name: str, scan: _Scan, lo: int, hi: int, settings: Settings,
                  dtype: np.dtype, encoder: _Encoder, progress: bool) -> tuple[dict, dict]:
    """Pass 2: tokenize documents [lo, hi) into the train and val streams; returns their entries."""
    train = _SplitWriter(out, name, "train", dtype, settings.shard_tokens)
    val = _SplitWriter(out, name, "val", dtype, settings.shard_tokens)
    try:
        with tqdm(desc=name, total=hi - lo, unit=" docs", disable=not progress) as bar:
            jobs = _slice_batches(name, scan, lo, hi, settings.text_field)
            for (first, n), tokens, lengths in encoder.map(jobs):
                assert tokens is not None
                a, b = np.searchsorted(scan.val_ordinals, [first, first + n])
                if a == b:
                    train.write(tokens, n)
                else:
                    is_val = np.zeros(n, dtype=bool)  # (n,) per document of the batch
                    is_val[scan.val_ordinals[a:b] - first] = True
                    token_is_val = np.repeat(is_val, lengths)  # (sum(lengths),)
                    val.write(tokens[token_is_val], int(b - a))
                    train.write(tokens[~token_is_val], n - int(b - a))
                bar.update(n)
                bar.set_postfix_str(f"{train.n_tokens + val.n_tokens:,} tokens", refresh=False)
        return train.close(), val.close()
    except BaseException:
        train.abort()
        val.abort()
        raise


# ----------------------------------------------------------------------------------------------
# orchestration


def _clear_domain_dir(directory: Path) -> None:
    """Remove what an earlier (maybe interrupted) prepare left for a domain; leave anything else alone."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        n = p.name
        ours = (re.fullmatch(r"(train|val)_\d{5}\.bin", n) or n == DONE_MARKER
                or (n.startswith(".") and n.endswith(".tmp")))
        if ours and p.is_file():
            p.unlink()


def _reusable_entry(out: Path, name: str, digest: str, part: dict | None) -> dict | None:
    """The domain's manifest entry if it is already done with these inputs, else None."""
    done = out / name / DONE_MARKER
    try:
        marker = json.loads(done.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("inputs_hash") != digest or marker.get("part") != part:
        return None
    entry = marker.get("entry")
    try:
        for split in ("train", "val"):
            if sum(read_header(out / rel)[1] for rel in entry[split]["shards"]) != entry[split]["tokens"]:
                return None
    except (DataError, KeyError, TypeError):
        return None
    return entry


def _finish_domain(out: Path, entry: dict, part: dict | None) -> None:
    atomic_write_json(out / entry["name"] / DONE_MARKER,
                       {"inputs_hash": entry["inputs_hash"], "part": part, "entry": entry})


def _build_manifest(tokenizer: dict, dtype: np.dtype, settings: dict, part: dict | None,
                    entries: list[dict]) -> dict:
    manifest: dict = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "tokenizer": tokenizer,
                      "dtype": np.dtype(dtype).name, "settings": settings}
    if part is not None:
        manifest["part"] = part
    manifest["domains"] = entries
    if part is None:
        # w0 = natural train-token shares (only meaningful for a whole corpus, not for one part).
        total = sum(e["train"]["tokens"] for e in entries)
        manifest["w0"] = {e["name"]: e["train"]["tokens"] / total for e in entries}
    return manifest


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def prepare_corpus(tokenizer_dir: str | os.PathLike, out_dir: str | os.PathLike,
                   domains: dict[str, Any] | list[tuple[str, str]], val_fraction: float = DEFAULT_VAL_FRACTION,
                   val_tokens: int = DEFAULT_VAL_TOKENS, workers: int | None = None, text_field: str = "text",
                   extensions: Iterable[str] | None = None, strict: bool = False, num_shards: int = 1,
                   shard_index: int = 0, progress: bool = True,
                   shard_tokens: int = DEFAULT_SHARD_TOKENS) -> dict:
    """Tokenize every domain into `out_dir` (train/val shards + manifest.json); returns the manifest.

    Domains already finished with the same inputs are skipped; interrupted ones are redone.
    With num_shards > 1 this writes part `shard_index` of a sharded prepare (see merge_prepared).
    """
    settings = make_settings(val_fraction, val_tokens, text_field, extensions, strict, shard_tokens)
    workers = _default_workers() if workers is None else int(workers)
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers} (--workers)")
    if int(num_shards) < 1:
        raise DataError(f"--num-shards must be >= 1, got {num_shards}")
    if not 0 <= int(shard_index) < int(num_shards):
        raise DataError(
            f"--shard-index {shard_index} is out of range for --num-shards {num_shards}; "
            f"use 0 .. {int(num_shards) - 1}"
        )
    part = {"index": int(shard_index), "count": int(num_shards)} if int(num_shards) > 1 else None
    named = normalize_domains(domains)
    tok = load_tokenizer(tokenizer_dir)
    dtype = choose_dtype(tok.vocab_size)
    out = Path(out_dir).expanduser().absolute()
    out.mkdir(parents=True, exist_ok=True)

    plans = []  # (name, files, abs sources, inputs hash), in the user's domain order
    for name, sources in named.items():
        files, abs_sources = list_domain_files(name, sources, settings.extensions)
        plans.append((name, files, abs_sources,
                      inputs_hash(files, tok.hash, tok.eos_token_id, settings)))
    entries = {name: _reusable_entry(out, name, digest, part) for name, _, _, digest in plans}
    todo = [p for p in plans if entries[p[0]] is None]
    for name, *_ in plans:
        if entries[name] is not None:
            log.info("domain %r: already prepared with the same inputs, skipping", name)
    if todo:
        # The old manifest would describe files we are about to replace.
        (out / "manifest.json").unlink(missing_ok=True)
        with _Encoder(tok.spec, workers) as encoder:
            for name, files, abs_sources, digest in todo:
                domain_dir = out / name
                _clear_domain_dir(domain_dir)
                domain_dir.mkdir(parents=True, exist_ok=True)
                scan = _scan_domain(name, files, settings, encoder, progress)
                lo = scan.n_docs * int(shard_index) // int(num_shards)
                hi = scan.n_docs * (int(shard_index) + 1) // int(num_shards)
                train, val = _write_domain(out, name, scan, lo, hi, settings, dtype, encoder, progress)
                entry = {"name": name, "sources": abs_sources, "inputs_hash": digest,
                         "files": len(scan.files), "train": train, "val": val,
                         "skipped_files": len(scan.skipped), "empty_documents": scan.n_empty}
                _finish_domain(out, entry, part)
                entries[name] = entry
    manifest = _build_manifest(tok.manifest(), dtype, settings.to_json(), part,
                               [entries[name] for name, *_ in plans])
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


def _load_part(directory: Path) -> dict:
    path = directory / "manifest.json"
    if not path.is_file():
        raise DataError(
            f"{directory} has no manifest.json: it is not a finished part; re-run its "
            f"`velocitune prepare ... --num-shards N --shard-index I` to finish it"
        )
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run that part") from None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT or m.get("version") != MANIFEST_VERSION:
        raise DataError(f"{path} is not a velocitune-prepared manifest version {MANIFEST_VERSION}")
    if not m.get("part"):
        raise DataError(
            f"{directory} is a complete prepared directory, not a part of a sharded prepare "
            f"(--num-shards N > 1); only parts can be merged"
        )
    for e in m["domains"]:
        if not (directory / e["name"] / DONE_MARKER).is_file():
            raise DataError(f"domain {e['name']!r} of part {directory} is not finished; re-run that part")
    return m


def merge_prepared(parts: list[str | os.PathLike], out_dir: str | os.PathLike, progress: bool = True) -> dict:
    """Combine the N part directories of a sharded prepare into one prepared directory; returns the manifest.

    The result equals a single-machine prepare of the same inputs (parts hold contiguous document
    ranges, so the streams are concatenated in part order and re-cut into shards).
    """
    dirs = [Path(p).expanduser().absolute() for p in parts]
    if not dirs:
        raise DataError("--merge needs the part directories written with --num-shards N --shard-index I")
    out = Path(out_dir).expanduser().absolute()
    if out in dirs:
        raise DataError(f"--out {out} is one of the parts being merged; choose a new directory")
    manifests = [_load_part(d) for d in dirs]
    count = manifests[0]["part"]["count"]
    indices = sorted(m["part"]["index"] for m in manifests)
    if any(m["part"]["count"] != count for m in manifests) or indices != list(range(count)):
        have = [f"{m['part']['index']}/{m['part']['count']}" for m in manifests]
        raise DataError(
            f"--merge needs every part 0..N-1 of one N-way prepare exactly once; got parts {have} "
            f"(index/count) from {[str(d) for d in dirs]}"
        )
    order = sorted(range(len(dirs)), key=lambda i: manifests[i]["part"]["index"])
    dirs, manifests = [dirs[i] for i in order], [manifests[i] for i in order]
    first = manifests[0]
    for d, m in zip(dirs[1:], manifests[1:]):
        for what, a, b in [("tokenizer", first["tokenizer"]["hash"], m["tokenizer"]["hash"]),
                           ("dtype", first["dtype"], m["dtype"]), ("settings", first["settings"], m["settings"])]:
            if a != b:
                raise DataError(f"part {d} was prepared with a different {what} than part {dirs[0]}; "
                                f"re-run all parts with the same arguments")
        theirs = [(e["name"], e["inputs_hash"]) for e in m["domains"]]
        ours = [(e["name"], e["inputs_hash"]) for e in first["domains"]]
        if theirs != ours:
            raise DataError(
                f"part {d} has different domains or inputs than part {dirs[0]} (names or inputs hashes "
                f"differ: files changed between runs?); re-run all parts with the same inputs"
            )
    dtype = np.dtype(first["dtype"])
    shard_tokens = int(first["settings"]["shard_tokens"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)
    entries = []
    for k, base in enumerate(first["domains"]):
        name = base["name"]
        entry = _reusable_entry(out, name, base["inputs_hash"], None)
        if entry is None:
            _clear_domain_dir(out / name)
            (out / name).mkdir(parents=True, exist_ok=True)
            entry = {key: base[key] for key in base if key not in ("train", "val")}
            for split in ("train", "val"):
                writer = _SplitWriter(out, name, split, dtype, shard_tokens)
                try:
                    with tqdm(desc=f"{name} {split}", unit=" tok", unit_scale=True,
                              disable=not progress, leave=False) as bar:
                        for d, m in zip(dirs, manifests):
                            info = m["domains"][k][split]
                            writer.n_docs += info["documents"]
                            for rel in info["shards"]:
                                shard = open_shard(d / rel)
                                for s in range(0, shard.size, _COPY_CHUNK):
                                    chunk = np.asarray(shard[s : s + _COPY_CHUNK])
                                    writer.write(chunk)
                                    bar.update(chunk.size)
                    entry[split] = writer.close()
                except BaseException:
                    writer.abort()
                    raise
            # Keep the key order of a single-machine entry.
            entry = {key: entry[key] for key in base}
            _finish_domain(out, entry, None)
        entries.append(entry)
    manifest = _build_manifest(first["tokenizer"], dtype, first["settings"], None, entries)
    atomic_write_json(out / "manifest.json", manifest)
    return manifest


# ----------------------------------------------------------------------------------------------
# command line

_CONFIG_KEYS = ("tokenizer", "out", "domains", "val_tokens", "val_fraction", "workers", "text_field",
                "ext", "strict", "shard_tokens", "num_shards", "shard_index", "merge", "progress")

_DESCRIPTION = """\
Tokenize per-domain corpora into token shards with a fixed held-out validation set per domain.

Inputs per domain: files, directories (read recursively) or glob patterns of
  text files (.txt .md .rst .py .tex, more with --ext): one file = one document;
  JSON Lines (.jsonl .jsonl.gz .jsonl.zst): one line = one document, text in field "text";
  Parquet (.parquet): one row = one document, text in column "text".
Each document is encoded without special tokens and followed by the tokenizer's EOS token.

Validation split: the documents with the lowest text hashes, i.e. those whose hash falls under
--val-fraction, in hash order until --val-tokens is reached (and at least one document when a
domain has 2 or more). It does not move when documents are added or when --num-shards changes.

Reruns skip domains already finished with the same inputs and redo interrupted ones.
Sharded over N machines: run `... --num-shards N --shard-index I --out PART_I` on each, then
`velocitune prepare --merge PART_0 ... PART_N-1 --out DIR`.
"""

_EPILOG = """\
examples:
  velocitune prepare --tokenizer tok/ --out data/ --domain code=src/ --domain math=math.jsonl.zst
  velocitune prepare prepare.yaml --workers 8
where prepare.yaml holds the same keys as the flags, e.g.
  tokenizer: tok/
  out: data/
  domains: {code: src/, math: [math/a.jsonl, math/b.parquet]}
  val_tokens: 500000
(relative paths in the YAML file are relative to the file's directory)
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `prepare` subcommand's arguments."""
    parser.description = _DESCRIPTION
    parser.epilog = _EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("config", nargs="?", metavar="CONFIG.yaml",
                        help="YAML file with the keys: " + ", ".join(_CONFIG_KEYS) + " (flags override it)")
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="local Hugging Face tokenizer directory (nothing is downloaded)")
    parser.add_argument("--out", metavar="DIR", help="output directory (created if needed)")
    parser.add_argument("--domain", action="append", metavar="NAME=PATH",
                        help="a domain and one input (file, directory or glob); repeat the flag for more "
                             "domains, or with the same NAME to add inputs to a domain")
    parser.add_argument("--val-tokens", type=int, metavar="N",
                        help=f"cap on val tokens per domain (default {DEFAULT_VAL_TOKENS:,})")
    parser.add_argument("--val-fraction", type=float, metavar="F",
                        help=f"share of documents eligible for val (default {DEFAULT_VAL_FRACTION})")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="tokenizer processes (default: number of CPUs; 1 = in this process)")
    parser.add_argument("--text-field", metavar="NAME",
                        help='JSON field / Parquet column holding the text (default "text")')
    parser.add_argument("--ext", action="append", metavar="EXT",
                        help="extra extension(s) to read as plain text, e.g. --ext .c --ext .h or --ext c,h")
    parser.add_argument("--strict", action="store_true", default=None,
                        help="fail on a file that is not UTF-8 instead of skipping it with a warning")
    parser.add_argument("--shard-tokens", type=int, metavar="N",
                        help=f"tokens per output shard file (default {DEFAULT_SHARD_TOKENS:,})")
    parser.add_argument("--num-shards", type=int, metavar="N",
                        help="split the work over N machines: this run writes part --shard-index (default 1)")
    parser.add_argument("--shard-index", type=int, metavar="I", help="which part to write, 0..N-1 (default 0)")
    parser.add_argument("--merge", nargs="+", metavar="PART_DIR",
                        help="merge the part directories of a sharded prepare into --out, then stop")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bars")


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


def _load_yaml_unique(path: Path) -> Any:
    """Parse YAML, refusing a mapping key given twice (PyYAML would silently keep the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.load(f, Loader=Loader)
    except _DuplicateKey as e:
        raise DataError(
            f"{path}, line {e.line}: {e.key!r} is given twice (a duplicate domain name?); give each "
            f"domain once, with a list of paths: `{e.key}: [path1, path2]`"
        ) from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None


def load_config(path: str | os.PathLike) -> dict:
    """The keys of a prepare YAML file, with relative paths made relative to the file's directory."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    cfg = _load_yaml_unique(path) or {}
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a mapping of keys ({', '.join(_CONFIG_KEYS)})")
    for key in cfg:
        if key not in _CONFIG_KEYS:
            close = difflib.get_close_matches(str(key), _CONFIG_KEYS, n=1)
            raise ConfigError(
                f"{path}: unknown key {key!r}" + (f"; did you mean {close[0]!r}?" if close else "")
                + f" Valid keys: {', '.join(_CONFIG_KEYS)}"
            )
    base = path.parent

    def rel(p: Any) -> str:
        return os.path.join(base, os.path.expanduser(str(p)))

    for key in ("tokenizer", "out"):
        if cfg.get(key) is not None:
            cfg[key] = rel(cfg[key])
    if cfg.get("merge") is not None:
        merge = cfg["merge"] if isinstance(cfg["merge"], list) else [cfg["merge"]]
        cfg["merge"] = [rel(p) for p in merge]
    if cfg.get("domains") is not None:
        if not isinstance(cfg["domains"], dict):
            raise ConfigError(f"{path}: `domains` must map each name to a path or a list of paths")
        domains = {}
        for name, paths in cfg["domains"].items():
            paths = paths if isinstance(paths, list) else [paths]
            if not paths or not all(isinstance(p, str) for p in paths):
                raise ConfigError(f"{path}: domain {name!r} needs a path or a list of paths, got {paths!r}")
            domains[str(name)] = [rel(p) for p in paths]
        cfg["domains"] = domains
    return cfg


def _cli_domains(specs: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--domain {spec!r}: expected NAME=PATH, e.g. --domain code=src/")
        out.setdefault(name, []).append(path)
    return out


def _print_summary(manifest: dict, seconds: float) -> None:
    rows = manifest["domains"]
    w0 = manifest.get("w0") or {}
    print(f"{'domain':<20} {'train tokens':>14} {'val tokens':>11} {'docs':>9} {'w0':>7}  skipped")
    for e in rows:
        docs = e["train"]["documents"] + e["val"]["documents"]
        share = f"{w0[e['name']]:.4f}" if e["name"] in w0 else "-"
        print(f"{e['name']:<20} {e['train']['tokens']:>14,} {e['val']['tokens']:>11,} {docs:>9,} "
              f"{share:>7}  {e.get('skipped_files', 0)}")
    total = sum(e["train"]["tokens"] + e["val"]["tokens"] for e in rows)
    print(f"{total:,} tokens ({manifest['dtype']}) in {seconds:.1f} s")


def main(args: argparse.Namespace) -> int:
    """Run `velocitune prepare` from parsed arguments (config file values overridden by flags)."""
    cfg = load_config(args.config) if args.config else {}

    def pick(flag: str, key: str, default: Any = None) -> Any:
        value = getattr(args, flag, None)
        return value if value is not None else cfg.get(key, default)

    out = pick("out", "out")
    if out is None:
        raise ConfigError("no output directory: pass --out DIR (or `out:` in the config file)")
    progress = bool(pick("progress", "progress", True))
    start = time.perf_counter()
    merge = pick("merge", "merge")
    if merge:
        if args.domain or cfg.get("domains"):
            raise ConfigError("--merge combines finished parts; it takes no --domain (drop one of them)")
        manifest = merge_prepared(merge, out, progress=progress)
        print(f"merged {len(merge)} parts into {out}")
        _print_summary(manifest, time.perf_counter() - start)
        return 0
    tokenizer = pick("tokenizer", "tokenizer")
    if tokenizer is None:
        raise ConfigError("no tokenizer: pass --tokenizer DIR (a local Hugging Face tokenizer directory)")
    domains = dict(cfg.get("domains") or {})
    # A --domain flag replaces that domain's inputs from the config file; repeats add inputs.
    domains.update(_cli_domains(args.domain or []))
    if not domains:
        raise ConfigError("no domains: pass --domain NAME=PATH (repeat it for each domain)")
    ext = args.ext if args.ext is not None else cfg.get("ext")
    if isinstance(ext, str):
        ext = [ext]
    manifest = prepare_corpus(
        tokenizer, out, domains,
        val_fraction=pick("val_fraction", "val_fraction", DEFAULT_VAL_FRACTION),
        val_tokens=pick("val_tokens", "val_tokens", DEFAULT_VAL_TOKENS),
        workers=pick("workers", "workers"),
        text_field=pick("text_field", "text_field", "text"),
        extensions=ext,
        strict=bool(pick("strict", "strict", False)),
        num_shards=pick("num_shards", "num_shards", 1),
        shard_index=pick("shard_index", "shard_index", 0),
        progress=progress,
        shard_tokens=pick("shard_tokens", "shard_tokens", DEFAULT_SHARD_TOKENS),
    )
    part = manifest.get("part")
    if part:
        print(f"wrote part {part['index']} of {part['count']} to {out}; merge all parts with "
              f"`velocitune prepare --merge PART_DIR ... --out DIR`")
    else:
        print(f"prepared {out}")
    _print_summary(manifest, time.perf_counter() - start)
    return 0
