"""`prepare_corpus`: every domain from its input files to finished token shards and manifest.json.

Output layout and manifest: docs/contracts.md. Every file is written atomically; a domain's `.done`
marker is written last, so a rerun skips finished domains and redoes interrupted ones from scratch.
With `num_shards=N, shard_index=I` a machine writes the I-th contiguous 1/N of every domain's documents
into a part directory (see `velocitune.prepare.merge`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from velocitune.errors import ConfigError, DataError
from velocitune.fileio import atomic_write_json
from velocitune.prepare.encode import _Encoder, load_tokenizer
from velocitune.prepare.sources import SourceFile, list_domain_files, normalize_domains
from velocitune.prepare.split import _scan_domain, _write_domain
from velocitune.shards import DONE_MARKER, MANIFEST_FORMAT, MANIFEST_VERSION, choose_dtype, read_header

log = logging.getLogger(__name__)

DEFAULT_VAL_FRACTION = 0.01
DEFAULT_VAL_TOKENS = 1_000_000
DEFAULT_SHARD_TOKENS = 100_000_000
# Bumped whenever the token stream written for the same inputs would change: it is part of the
# inputs hash, so finished domains from an older velocitune are redone rather than reused.
PREPARE_VERSION = 1


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


def inputs_hash(files: list[SourceFile], tokenizer_hash: str, eos_token_id: int, settings: Settings) -> str:
    """sha256 of what the domain's output depends on: file paths, sizes and mtimes, tokenizer, settings;
    for a dataset (kind "hf") also its split, column and every file behind them.

    The part index of a sharded prepare is not included: every part of a domain shares this hash.
    """
    h = hashlib.sha256()
    head = {"prepare_version": PREPARE_VERSION, "tokenizer": tokenizer_hash, "eos": eos_token_id,
            "settings": settings.to_json()}
    h.update(json.dumps(head, sort_keys=True).encode())
    for f in files:
        h.update(json.dumps([f.path, f.kind, f.size, f.mtime_ns]).encode())
        if f.dataset is not None:  # absent for plain files, so their hashes stay those of earlier versions
            h.update(json.dumps(asdict(f.dataset)).encode())
    return h.hexdigest()


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
        files, abs_sources = list_domain_files(name, sources, settings.extensions, settings.text_field)
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
