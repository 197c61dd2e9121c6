"""A domain's input files and the documents in them.

Discovery: each source of a domain is a file, a directory (read recursively, hidden files skipped) or a
glob pattern; a file's name says how to read it (`file_kind`). Reading: text files are one document
each, JSON Lines (plain, .gz, .zst) one document per line, Parquet one per row (`iter_documents`);
`is_utf8` checks a whole file first so that a bad one is skipped whole. A source `hf:PATH[:SPLIT][:FIELD]` is a
local dataset read through the `datasets` library (`velocitune.prepare.hf`): one `SourceFile` of kind "hf"
(one per file for a glob of .arrow files), whose rows are its documents.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, BinaryIO

from velocitune.errors import DataError
from velocitune.prepare import hf

TEXT_EXTENSIONS = (".txt", ".md", ".rst", ".py", ".tex")
JSONL_EXTENSIONS = (".jsonl", ".jsonl.gz", ".jsonl.zst")
PARQUET_EXTENSIONS = (".parquet",)
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class SourceFile:
    """One input file (or dataset): how to read it, and what identifies its version (size, mtime)."""

    path: str
    kind: str  # "text" | "jsonl" | "parquet" | "hf"
    size: int  # kind "hf": the total of its files'
    mtime_ns: int  # kind "hf": the newest of its files'
    dataset: hf.HFSource | None = None  # kind "hf": the split and column read, and every file behind them


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


def list_domain_files(name: str, sources: list[str], extensions: tuple[str, ...],
                      text_field: str = "text") -> tuple[list[SourceFile], list[str]]:
    """A domain's input files in their deterministic order, and its sources as absolute paths.

    Each source is a file, a directory (read recursively), a glob pattern or a dataset (`hf:PATH...`, whose
    column defaults to `text_field`; recorded as its resolved spec); within a source files are sorted by path;
    sources keep the order given; a file reached twice is read once.
    """
    files: list[SourceFile] = []
    seen: set = set()
    ignored: dict[str, int] = {}
    abs_sources = []
    supported = ", ".join(TEXT_EXTENSIONS + extensions + JSONL_EXTENSIONS + PARQUET_EXTENSIONS)
    for src in sources:
        if hf.is_spec(src):
            for path, info in hf.resolve(name, src, text_field):
                if ("hf", path, info.split, info.field) not in seen:
                    seen.add(("hf", path, info.split, info.field))
                    files.append(_dataset_file(path, info))
            abs_sources.append(hf.spec_string(name, src, info))
            continue
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


def _dataset_file(path: str, info: hf.HFSource) -> SourceFile:
    return SourceFile(path, "hf", sum(size for _, size, _ in info.files),
                      max((mtime for *_, mtime in info.files), default=0), info)


# ----------------------------------------------------------------------------------------------
# reading documents


class NotUtf8(Exception):
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
    """Whether a JSON Lines, Parquet file or dataset column is valid UTF-8 throughout (checked before reading it,
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
    if f.kind == "hf":
        assert f.dataset is not None
        return hf.is_utf8(domain, f.path, f.dataset)
    raise ValueError(f"is_utf8 checks jsonl, parquet and hf sources, not {f.kind}")


def iter_documents(f: SourceFile, text_field: str, domain: str) -> Iterator[tuple[int, str | None]]:
    """(location, text) for every document of a file; location = line (jsonl) or row (parquet, hf) number.

    Text files are one document (location 0) and raise NotUtf8 before yielding if they do not decode.
    `text` is None for a null field; empty and null documents are the caller's to skip. A dataset (kind
    "hf") reads its own column (`f.dataset.field`), not `text_field`.
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
            raise NotUtf8(f.path) from None
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
    elif f.kind == "hf":
        assert f.dataset is not None
        yield from hf.iter_documents(domain, f.path, f.dataset)
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
