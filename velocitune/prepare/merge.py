"""`merge_prepared`: the N part directories of a sharded prepare into one prepared directory.

Each part holds a contiguous range of every domain's documents, so `merge_prepared` concatenates the
parts' streams in part order into exactly what one machine writes. The domain markers and the manifest
are written by `velocitune.prepare.pipeline`'s own functions, called through that module (so that what
replaces them there, e.g. a test's fault injection, takes effect here too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from velocitune.errors import DataError
from velocitune.fileio import atomic_write_json, require_dir
from velocitune.prepare import pipeline
from velocitune.prepare.split import _SplitWriter
from velocitune.shards import DONE_MARKER, MANIFEST_FORMAT, MANIFEST_VERSION, open_shard

_COPY_CHUNK = 1 << 24  # tokens per read when merging parts


def _load_part(directory: Path) -> dict:
    require_dir(directory, "part directory", "--merge takes the directories written with --num-shards N --shard-index I")
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
        entry = pipeline._reusable_entry(out, name, base["inputs_hash"], None)
        if entry is None:
            pipeline._clear_domain_dir(out / name)
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
            pipeline._finish_domain(out, entry, None)
        entries.append(entry)
    manifest = pipeline._build_manifest(first["tokenizer"], dtype, first["settings"], None, entries)
    atomic_write_json(out / "manifest.json", manifest)
    return manifest
