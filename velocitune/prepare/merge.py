"""`merge_prepared`: the N part directories of a sharded prepare into one prepared directory.

Each part holds a contiguous range of every domain's documents, so `merge_prepared` concatenates the
parts' streams in part order into exactly what one machine writes. The parts' manifests are read, and
the domain markers and the manifest written, by `velocitune.manifest` (called through that module, as
the pipeline does, so that what replaces them there, e.g. a test's fault injection, takes effect here too).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from velocitune import manifest
from velocitune.errors import DataError
from velocitune.prepare.pipeline import reusable_entry
from velocitune.prepare.settings import make_settings
from velocitune.prepare.split import SplitWriter, check_val_size, clear_domain_dir
from velocitune.shards import open_shard

_COPY_CHUNK = 1 << 24  # tokens per read when merging parts


def merge_prepared(parts: list[str | os.PathLike], out_dir: str | os.PathLike, progress: bool = True,
                   seq_len: int | None = None) -> dict:
    """Combine the N part directories of a sharded prepare into one prepared directory; returns the manifest.

    The result equals a single-machine prepare of the same inputs (parts hold contiguous document
    ranges, so the streams are concatenated in part order and re-cut into shards). With `seq_len`, every
    domain's val split is checked as `prepare_corpus` checks it (`split.check_val_size`).
    """
    dirs = [Path(p).expanduser().absolute() for p in parts]
    if not dirs:
        raise DataError("--merge needs the part directories written with --num-shards N --shard-index I")
    out = Path(out_dir).expanduser().absolute()
    if out in dirs:
        raise DataError(f"--out {out} is one of the parts being merged; choose a new directory")
    manifests = [manifest.read_part(d) for d in dirs]
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
    fs = first["settings"]
    settings = make_settings(fs["val_fraction"], fs["val_tokens"], fs["text_field"], fs["extensions"],
                             fs["strict"], shard_tokens)
    out.mkdir(parents=True, exist_ok=True)
    manifest.discard_manifest(out)
    entries = []
    for k, base in enumerate(first["domains"]):
        name = base["name"]
        entry = reusable_entry(out, name, base["inputs_hash"], None)
        fresh = entry is None
        if fresh:
            entry = _merge_domain(out, dirs, [m["domains"][k] for m in manifests], dtype, shard_tokens, progress)
        if seq_len is not None:
            check_val_size(name, entry["val"]["tokens"], int(seq_len), settings)
        if fresh:
            manifest.write_done_marker(out, entry, None)
        entries.append(entry)
    result = manifest.build_manifest(first["tokenizer"], dtype, first["settings"], None, entries)
    manifest.write_manifest(out, result)
    return result


def _merge_domain(out: Path, dirs: list[Path], parts: list[dict], dtype: np.dtype, shard_tokens: int,
                  progress: bool) -> dict:
    """One domain's train and val streams, its parts' (`parts`: their entries) concatenated; its entry."""
    base = parts[0]
    name = base["name"]
    clear_domain_dir(out / name)
    (out / name).mkdir(parents=True, exist_ok=True)
    entry = {key: base[key] for key in base if key not in ("train", "val")}
    for split in ("train", "val"):
        writer = SplitWriter(out, name, split, dtype, shard_tokens)
        try:
            with tqdm(desc=f"{name} {split}", unit=" tok", unit_scale=True,
                      disable=not progress, leave=False) as bar:
                for d, part in zip(dirs, parts):
                    info = part[split]
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
    return {key: entry[key] for key in base}
