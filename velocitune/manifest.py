"""manifest.json and the domain `.done` markers of a prepared data directory: their one writer and one reader.

`velocitune prepare` (pipeline and merge) writes them through `build_manifest`, `write_manifest` and
`write_done_marker`; `velocitune.shards.PreparedData` and `merge_prepared` read them through
`read_manifest` and `read_part`, which validate everything a reader relies on. Layout:
docs/contracts.md.

Why here and not in `velocitune.prepare`: the manifest is the contract between the prepare command (a
high layer) and the data layer every training command imports (`velocitune.shards`). Importing any
module of the `velocitune.prepare` package runs its `__init__`, which pulls in the whole pipeline (and
the config through `prepare.command`), and the pipeline itself imports `velocitune.shards`: a reader
there would make shards -> prepare -> shards a cycle. So the format lives at the data layer, beside
shards, and imports only numpy, `velocitune.errors` and `velocitune.fileio` (tests/test_imports.py
holds that layering).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from velocitune.errors import DataError
from velocitune.fileio import atomic_write_json, require_dir

MANIFEST_FORMAT = "velocitune-prepared"
MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
DONE_MARKER = ".done"
REPREPARE_HINT = "re-run `velocitune prepare` with the same arguments to rebuild it"


# ----------------------------------------------------------------------------------------------
# writer


def build_manifest(tokenizer: dict, dtype: np.dtype, settings: dict, part: dict | None,
                   entries: list[dict]) -> dict:
    """The manifest of a prepared directory (or of part `part` of a sharded prepare) from its domain entries."""
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


def write_manifest(out: Path, manifest: dict) -> None:
    """Write `out`/manifest.json atomically: its presence says every domain is finished."""
    atomic_write_json(out / MANIFEST_NAME, manifest)


def discard_manifest(out: Path) -> None:
    """Remove `out`/manifest.json before domains are rewritten: it would describe files being replaced."""
    (out / MANIFEST_NAME).unlink(missing_ok=True)


def write_done_marker(out: Path, entry: dict, part: dict | None) -> None:
    """Mark domain `entry["name"]` finished (written after its last shard): its entry, inputs hash and part."""
    atomic_write_json(out / entry["name"] / DONE_MARKER,
                      {"inputs_hash": entry["inputs_hash"], "part": part, "entry": entry})


def read_done_marker(out: Path, name: str) -> dict | None:
    """A domain's done marker, or None when it is missing or unreadable (the domain is then redone)."""
    try:
        marker = json.loads((out / name / DONE_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


# ----------------------------------------------------------------------------------------------
# reader


@dataclass(frozen=True)
class Manifest:
    """A complete prepared directory's manifest, validated: every domain finished, every shard present."""

    raw: dict  # the manifest.json object as written
    vocab_size: int
    tokenizer_hash: str
    eos_token_id: int
    dtype: np.dtype
    entries: list[dict]  # one per domain, in the manifest's order
    w0: dict[str, float]  # natural train-token share per domain


def _load_object(path: Path, what: str, hint: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{what} {path} is not valid JSON ({e}); {hint}") from None
    if not isinstance(obj, dict):
        raise DataError(f"{what} {path} is not a JSON object; {hint}")
    return obj


def _is_current(m: dict) -> bool:
    return m.get("format") == MANIFEST_FORMAT and m.get("version") == MANIFEST_VERSION


def read_manifest(root: Path) -> Manifest:
    """The manifest of the complete prepared directory `root`; DataError saying how to fix anything wrong."""
    prepare_cmd = f"run `velocitune prepare --tokenizer DIR --out {root} --domain NAME=PATH ...` first"
    require_dir(root, "prepared data directory (data.path)", prepare_cmd)
    path = root / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{root} has no manifest.json: it was not prepared, or `velocitune prepare` did "
            f"not finish; {prepare_cmd} (a rerun resumes where it stopped)"
        )
    m = _load_object(path, "manifest", REPREPARE_HINT)
    if not _is_current(m):
        raise DataError(
            f"{path} is not a velocitune-prepared manifest version {MANIFEST_VERSION} "
            f"(format={m.get('format')!r}, version={m.get('version')!r}); {REPREPARE_HINT}"
        )
    if m.get("part") is not None:
        part = m["part"]
        raise DataError(
            f"{root} holds part {part.get('index')} of a {part.get('count')}-way sharded "
            f"prepare; combine all parts first with `velocitune prepare --merge PART_DIR ... "
            f"--out DIR` and point at DIR"
        )
    try:
        entries = list(m["domains"])
        w0 = {e["name"]: float(m["w0"][e["name"]]) for e in entries}
        manifest = Manifest(m, int(m["tokenizer"]["vocab_size"]), str(m["tokenizer"]["hash"]),
                            int(m["tokenizer"]["eos_token_id"]), np.dtype(m["dtype"]), entries, w0)
    except (KeyError, TypeError, ValueError) as e:
        raise DataError(
            f"manifest {path} is missing or has a malformed field ({e!r}); {REPREPARE_HINT}"
        ) from None
    if not entries:
        raise DataError(f"manifest {path} lists no domains; {REPREPARE_HINT}")
    for entry in entries:
        _check_domain_files(root, entry)
    return manifest


def _check_domain_files(root: Path, entry: dict) -> None:
    """Every domain must be finished (its .done marker matches the manifest) and have its shards."""
    name = entry["name"]
    done = root / name / DONE_MARKER
    if not done.is_file():
        raise DataError(
            f"domain {name!r} in {root} is not finished (no {name}/{DONE_MARKER} marker): "
            f"`velocitune prepare` was interrupted; re-run it with the same arguments to finish"
        )
    marker = _load_object(done, "done marker", REPREPARE_HINT)
    if marker.get("inputs_hash") != entry.get("inputs_hash"):
        raise DataError(
            f"domain {name!r} in {root} was re-prepared after manifest.json was written "
            f"(inputs hash mismatch); {REPREPARE_HINT}"
        )
    for split in ("train", "val"):
        for rel in entry[split]["shards"]:
            if not (root / rel).is_file():
                raise DataError(f"shard {rel} of domain {name!r} is missing from {root}; {REPREPARE_HINT}")


def read_part(directory: Path) -> dict:
    """The manifest of a finished part of a sharded prepare (`--num-shards N --shard-index I`), for merging."""
    require_dir(directory, "part directory",
                "--merge takes the directories written with --num-shards N --shard-index I")
    path = directory / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{directory} has no manifest.json: it is not a finished part; re-run its "
            f"`velocitune prepare ... --num-shards N --shard-index I` to finish it"
        )
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e}); re-run that part") from None
    if not isinstance(m, dict) or not _is_current(m):
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

