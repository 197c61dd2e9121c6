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
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from velocitune import manifest
from velocitune.errors import ConfigError, DataError
from velocitune.prepare.encode import Encoder, load_tokenizer
from velocitune.prepare.settings import (
    DEFAULT_SHARD_TOKENS,
    DEFAULT_VAL_FRACTION,
    DEFAULT_VAL_TOKENS,
    MIN_VAL_WINDOWS,
    Settings,
    make_settings,
)
from velocitune.prepare.sources import SourceFile, list_domain_files, normalize_domains
from velocitune.prepare.split import check_val_size, clear_domain_dir, scan_domain, write_domain
from velocitune.shards import choose_dtype, read_header

log = logging.getLogger(__name__)

# Bumped whenever the token stream written for the same inputs would change: it is part of the
# inputs hash, so finished domains from an older velocitune are redone rather than reused.
PREPARE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# inputs


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


def reusable_entry(out: Path, name: str, digest: str, part: dict | None) -> dict | None:
    """The domain's manifest entry if it is already done with these inputs (and its shards are whole), else None."""
    marker = manifest.read_done_marker(out, name)
    if marker is None or marker.get("inputs_hash") != digest or marker.get("part") != part:
        return None
    entry = marker.get("entry")
    try:
        for split in ("train", "val"):
            if sum(read_header(out / rel)[1] for rel in entry[split]["shards"]) != entry[split]["tokens"]:
                return None
    except (DataError, KeyError, TypeError):
        return None
    return entry


def check_val_room(settings: Settings, seq_len: int | None) -> None:
    """Refuse at once a --val-tokens cap too small for MIN_VAL_WINDOWS windows of seq_len + 1 tokens."""
    if seq_len is None:
        return
    need = MIN_VAL_WINDOWS * (int(seq_len) + 1)
    if settings.val_tokens < need:
        raise ConfigError(
            f"val_tokens {settings.val_tokens:,} caps every domain's validation split below {MIN_VAL_WINDOWS} "
            f"window(s) of data.seq_len + 1 = {int(seq_len) + 1} tokens; raise --val-tokens to at least "
            f"{need:,} or lower data.seq_len"
        )


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
                   shard_tokens: int = DEFAULT_SHARD_TOKENS, seq_len: int | None = None) -> dict:
    """Tokenize every domain into `out_dir` (train/val shards + manifest.json); returns the manifest.

    Domains already finished with the same inputs are skipped; interrupted ones are redone.
    With num_shards > 1 this writes part `shard_index` of a sharded prepare (see merge_prepared).
    With `seq_len` (the training window is seq_len + 1 tokens) every domain's val split must hold
    MIN_VAL_WINDOWS windows (DataError saying what to change), with a warning below USEFUL_VAL_WINDOWS;
    a part of a sharded prepare is checked when the parts are merged.
    """
    settings = make_settings(val_fraction, val_tokens, text_field, extensions, strict, shard_tokens)
    check_val_room(settings, seq_len)
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
    entries = {name: reusable_entry(out, name, digest, part) for name, _, _, digest in plans}
    for name, entry in entries.items():
        if entry is not None and seq_len is not None and part is None:
            check_val_size(name, entry["val"]["tokens"], int(seq_len), settings)
    todo = [p for p in plans if entries[p[0]] is None]
    for name, *_ in plans:
        if entries[name] is not None:
            log.info("domain %r: already prepared with the same inputs, skipping", name)
    if todo:
        # The old manifest would describe files we are about to replace.
        manifest.discard_manifest(out)
        with Encoder(tok.spec, workers) as encoder:
            for name, files, abs_sources, digest in todo:
                domain_dir = out / name
                clear_domain_dir(domain_dir)
                domain_dir.mkdir(parents=True, exist_ok=True)
                scan = scan_domain(name, files, settings, encoder, progress)
                lo = scan.n_docs * int(shard_index) // int(num_shards)
                hi = scan.n_docs * (int(shard_index) + 1) // int(num_shards)
                train, val = write_domain(out, name, scan, lo, hi, settings, dtype, encoder, progress)
                if seq_len is not None and part is None:
                    check_val_size(name, val["tokens"], int(seq_len), settings)
                entry = {"name": name, "sources": abs_sources, "inputs_hash": digest,
                         "files": len(scan.files), "train": train, "val": val,
                         "skipped_files": len(scan.skipped), "empty_documents": scan.n_empty}
                manifest.write_done_marker(out, entry, part)
                entries[name] = entry
    # Called through the module so that a test's fault injection there strikes here (tests/test_faults.py).
    result = manifest.build_manifest(tok.manifest(), dtype, settings.to_json(), part,
                                     [entries[name] for name, *_ in plans])
    manifest.write_manifest(out, result)
    return result
