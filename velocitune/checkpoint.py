"""Save and restore everything that shapes a run, atomically, verifiably and as data, never code.

A checkpoint is a directory `ckpt_root/step_00000100/` holding one file per top-level key of the state,
then `meta.json` and, written last, `checksums.json` (sha256 and size of every other file). A part made of
plain values (dicts, lists, strings, numbers, booleans, None: the sampler schedule, the mixing state,
counters, the config) is written as JSON (`state.json`); a part holding tensors (`model.pt`,
`optimizer.pt`, `rng.pt`) with `torch.save`, and is loaded with `torch.load(weights_only=True)` only.
Nothing in a checkpoint can run code when loaded: a part that needs the full unpickler (a crafted pickle,
or a numpy array from a format-1 checkpoint) is refused with a CheckpointError. The directory is written
under a hidden temporary name and renamed into place, so a crash leaves either the whole checkpoint or
none of it; a checkpoint damaged afterwards (truncated, bit-flipped) fails its checksums and
`load_latest` falls back to the previous one.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from velocitune import __version__, fileio
from velocitune.errors import CheckpointError, ConfigError
from velocitune.fileio import json_default, write_synced

FORMAT = "velocitune-checkpoint"
# 2: plain-value parts as JSON, every .pt part loadable with weights_only=True (1 pickled numpy arrays).
FORMAT_VERSION = 2
META_FILE = "meta.json"
CHECKSUMS_FILE = "checksums.json"
_STEP_DIR = re.compile(r"step_(\d{8,})")
_TMP_PREFIX = ".tmp-"
_PART_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_RESERVED_META = {"format", "version", "step", "time", "velocitune_version", "torch_version", "config_hash", "parts"}
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT}
_HASH_CHUNK = 1 << 20  # 1 MiB reads keep hashing a multi-GB file at disk speed with flat memory


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped, removed or only partly restored; the message says which and why."""


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_checkpoints(ckpt_root: str | os.PathLike) -> list[Path]:
    """The `step_*` directories under `ckpt_root`, oldest step first (not verified; temp dirs excluded)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


# --------------------------------------------------------------------------------------------------
# Writing


def save_checkpoint(
    ckpt_root: str | os.PathLike,
    step: int,
    state: Mapping[str, Any],
    keep: int = 3,
    meta: Mapping[str, Any] | None = None,
) -> Path:
    """Write `state` (name → plain values or tensors) as `ckpt_root/step_%08d`, atomically.

    A part made only of plain values is written as `<name>.json`; any other part with torch.save as
    `<name>.pt`, and it must then load with weights_only=True (tensors, plain values and containers).

    Every file is fsynced before the directory is renamed into place, and the rename itself is made
    durable. Only then are older checkpoints pruned to the newest `keep` valid ones, and leftovers of
    crashed writes removed. Checkpoints with a *higher* step than `step` are removed too (with a
    warning): they belong to the timeline abandoned when the run was resumed from an earlier point, and
    `load_latest` would otherwise pick them. On a full disk the partial write is removed and a
    CheckpointError says which earlier checkpoint is intact. Call it from one process (rank 0).
    """
    root = Path(ckpt_root)
    _check_save_args(step, state, keep, meta)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # our own earlier attempt at this step, interrupted by an exception
    try:
        tmp.mkdir()
        parts = {key: f"{key}.json" if _is_plain(state[key]) else f"{key}.pt" for key in state}
        for key, filename in parts.items():
            _write_part(tmp / filename, state[key])
        meta_doc = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "step": step,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "velocitune_version": __version__,
            "torch_version": torch.__version__,
            "config_hash": _config_hash(state.get("config")),
            "parts": parts,
            **(meta or {}),
        }
        write_synced(tmp / META_FILE, (json.dumps(meta_doc, indent=2, default=json_default) + "\n").encode())
        # checksums.json goes last and covers meta.json, so every other file in the directory is verified.
        files = {name: _file_digest(tmp / name) for name in [*parts.values(), META_FILE]}
        checksums = {"algorithm": "sha256", "files": files}
        write_synced(tmp / CHECKSUMS_FILE, (json.dumps(checksums, indent=2) + "\n").encode())
        fileio.install_dir(tmp, final)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        disk_full = _disk_full_error(exc)
        if disk_full is not None:
            raise CheckpointError(
                f"the disk is full: could not write checkpoint {final.name} under {root} ({disk_full}). "
                f"The partial write was removed; {_previous_description(root)}. Free some disk space "
                "(or keep fewer checkpoints) and resume."
            ) from exc
        raise
    _prune(root, final, step, keep)
    return final


def _check_save_args(step: int, state: Mapping[str, Any], keep: int, meta: Mapping[str, Any] | None) -> None:
    if keep < 1:
        raise ConfigError(f"checkpoint keep must be at least 1 (the newest checkpoint), got {keep}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not state:
        raise ValueError("state is empty: nothing to checkpoint")
    for key in state:
        if not isinstance(key, str) or not _PART_NAME.fullmatch(key):
            raise ValueError(f"state key {key!r} cannot be a file name: use letters, digits, '_', '-', '.'")
    clash = _RESERVED_META & set(meta or {})
    if clash:
        raise ValueError(f"meta keys {sorted(clash)} are reserved for the checkpoint's own metadata")


def _is_plain(obj: Any) -> bool:
    """True for JSON's own values: dicts with string keys, lists/tuples, strings, numbers, booleans, None."""
    if obj is None or isinstance(obj, (str, bool, int, float)):
        return True
    if isinstance(obj, (list, tuple)):
        return all(_is_plain(v) for v in obj)
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in obj.items())
    return False


def _write_part(path: Path, obj: Any) -> None:
    """One part, flushed and fsynced so the data is on disk before the directory rename.

    JSON keeps every float exactly (Python writes the shortest repr that reads back to the same double).
    """
    if path.suffix == ".json":
        write_synced(path, (json.dumps(obj) + "\n").encode())
        return
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _file_digest(path: Path) -> dict[str, Any]:
    return {"sha256": _sha256(path), "bytes": path.stat().st_size}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _config_hash(config: Any) -> str | None:
    """sha256 of the config as canonical JSON, so a resume can tell whether the config changed."""
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    text = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _disk_full_error(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError in `exc`'s cause/context chain, or None (torch.save wraps the OSError
    of a failed write in a RuntimeError)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _DISK_FULL:
            return cur
        cur = cur.__cause__ or cur.__context__
    return None


def _previous_description(root: Path) -> str:
    for path in reversed(list_checkpoints(root)):
        if _checkpoint_problem(path, full=False) is None:
            return f"the previous checkpoint at step {_step_of(path)} ({path}) is intact"
    return "there is no earlier checkpoint to resume from"


def _prune(root: Path, newest: Path, step: int, keep: int) -> None:
    """Keep `newest` plus the newest `keep - 1` valid older checkpoints; delete the rest, stale temp
    dirs, and checkpoints of a higher step (an abandoned timeline)."""
    for path in root.iterdir():
        if path.name.startswith(_TMP_PREFIX) and _tmp_is_stale(path):
            shutil.rmtree(path, ignore_errors=True)
    kept = 1
    for path in reversed(list_checkpoints(root)):
        if path == newest:
            continue
        if _step_of(path) > step:
            warnings.warn(
                f"removed checkpoint {path}: its step is after the one just saved ({step}), so it belongs "
                "to the run before it was resumed from an earlier checkpoint",
                CheckpointWarning,
                stacklevel=3,
            )
            shutil.rmtree(path, ignore_errors=True)
            continue
        # A structural check only (files present, sizes right): hashing every kept checkpoint at every
        # save would cost minutes for a large model. load_latest does the full check.
        problem = _checkpoint_problem(path, full=False)
        if problem is not None:
            warnings.warn(f"removed damaged checkpoint {path}: {problem}", CheckpointWarning, stacklevel=3)
            shutil.rmtree(path, ignore_errors=True)
        elif kept < keep:
            kept += 1
        else:
            shutil.rmtree(path, ignore_errors=True)


def _tmp_is_stale(path: Path) -> bool:
    """A temp dir is stale unless the process that named it is alive (and is not us: ours are done)."""
    try:
        pid = int(path.name.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, owned by another user
    return False


# --------------------------------------------------------------------------------------------------
# Reading


def _step_of(path: Path) -> int:
    m = _STEP_DIR.fullmatch(path.name)
    if m is None:
        raise CheckpointError(f"{path} is not a checkpoint directory (expected a name like step_00000100)")
    return int(m.group(1))


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _checkpoint_problem(path: Path, full: bool) -> str | None:
    """What is wrong with checkpoint `path`, or None. `full` also compares sha256 (reads every byte)."""
    checksums_path = path / CHECKSUMS_FILE
    if not checksums_path.is_file():
        return f"{CHECKSUMS_FILE} is missing (the checkpoint was not completely written)"
    try:
        files = _read_json(checksums_path)["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{CHECKSUMS_FILE} is unreadable ({exc})"
    if not isinstance(files, dict) or META_FILE not in files:
        return f"{CHECKSUMS_FILE} does not list {META_FILE}"
    for name, expected in files.items():
        file = path / name
        if not isinstance(expected, dict) or not {"bytes", "sha256"} <= expected.keys():
            return f"{CHECKSUMS_FILE} has a malformed entry for {name}"
        if not file.is_file():
            return f"{name} is missing"
        size = file.stat().st_size
        if size != expected["bytes"]:
            return f"{name} is {size} bytes, expected {expected['bytes']} (truncated or overwritten)"
        if full:
            digest = _sha256(file)
            if digest != expected["sha256"]:
                return f"{name} has sha256 {digest[:16]}…, expected {expected['sha256'][:16]}… (corrupted)"
    try:
        meta = _read_json(path / META_FILE)
    except ValueError as exc:
        return f"{META_FILE} is not valid JSON ({exc})"
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        return f"{META_FILE} has format {found!r}, expected {FORMAT!r}"
    if _STEP_DIR.fullmatch(path.name) and meta.get("step") != _step_of(path):
        return f"{META_FILE} says step {meta.get('step')} but the directory is {path.name}"
    parts = meta.get("parts")
    if not isinstance(parts, dict):
        return f"{META_FILE} has no table of parts"
    unlisted = [f for f in parts.values() if f not in files]
    if unlisted:
        return f"{CHECKSUMS_FILE} does not cover {unlisted}"
    return None


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError naming the bad file when checkpoint `path` is incomplete or corrupted."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist (or is not a directory)")
    problem = _checkpoint_problem(path, full=True)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")


def read_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The `meta.json` of checkpoint `path` (step, time, versions, config hash, caller's meta); unverified."""
    file = Path(path) / META_FILE
    try:
        return _read_json(file)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from exc


def _load_part(file: Path, map_location: Any, version: Any) -> Any:
    """One part: JSON as JSON; a .pt part with torch.load(weights_only=True) only (tensors, plain values).

    The full unpickler would run whatever code a crafted file names, so a part it would need is refused:
    a checkpoint, shared or downloaded, is data and never code.
    """
    if file.suffix == ".json":
        try:
            return json.loads(file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CheckpointError(f"cannot load {file}: not valid JSON ({exc})") from None
    try:
        return torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        old = (" It was written by velocitune 0.1 (checkpoint format 1), which pickled numpy arrays: finish that "
               "run with velocitune 0.1, or start it over." if version == 1 else "")
        raise CheckpointError(
            f"refused to load {file}: it holds Python objects other than tensors and plain values, which only "
            f"the full unpickler can rebuild, and that would run code named in the file. velocitune never "
            f"writes such a part; the file was crafted or written by another program.{old}{_unsafe_global(exc)}"
        ) from None
    except Exception as exc:
        raise CheckpointError(f"cannot load {file} ({type(exc).__name__}: {exc})") from exc


def _unsafe_global(exc: Exception) -> str:
    """The global torch's safe unpickler refused (e.g. "GLOBAL pathlib.Path.write_text"), to name it."""
    found = re.search(r"Unsupported global: (GLOBAL [\w.]+)", str(exc))
    return f" (it names {found.group(1)})" if found else ""


def load_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> tuple[int, dict[str, Any]]:
    """Verify checkpoint `path` against its checksums and load it: `(step, {key: object})`.

    Raises CheckpointError naming the damaged file.
    """
    path = Path(path)
    verify_checkpoint(path)
    meta = read_meta(path)
    version = meta.get("version")
    state = {key: _load_part(path / filename, map_location, version) for key, filename in meta["parts"].items()}
    return int(meta["step"]), state


def load_latest(ckpt_root: str | os.PathLike, map_location: Any = "cpu") -> tuple[int, dict[str, Any]] | None:
    """The newest checkpoint under `ckpt_root` that verifies, as `(step, state)`; None when there is none.

    Each damaged checkpoint is skipped with a CheckpointWarning naming the file and what is wrong with
    it. If checkpoints exist but none verifies, CheckpointError: starting over silently would discard
    the run.
    """
    root = Path(ckpt_root)
    if not root.is_dir():
        return None
    for tmp in sorted(p for p in root.iterdir() if p.name.startswith(_TMP_PREFIX) and _tmp_is_stale(p)):
        warnings.warn(
            f"ignoring {tmp}: an unfinished checkpoint write (its process crashed); it is removed at the next save",
            CheckpointWarning,
            stacklevel=2,
        )
    candidates = list_checkpoints(root)
    problems = []
    for path in reversed(candidates):
        try:
            return load_checkpoint(path, map_location)
        except CheckpointError as exc:
            problems.append(str(exc))
            warnings.warn(f"{exc}; falling back to the previous checkpoint", CheckpointWarning, stacklevel=2)
    if candidates:
        raise CheckpointError(
            f"none of the {len(candidates)} checkpoints under {root} is usable ({'; '.join(problems)}). "
            "Restore one from a backup, or delete the directory to start the run over."
        )
    return None


# --------------------------------------------------------------------------------------------------
# RNG state


def rng_state() -> dict[str, Any]:
    """Python `random`, numpy's global generator, torch CPU and (if available) every CUDA device.

    Only tensors, numbers, strings and containers, so the part loads with weights_only=True.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state()` captured. A CUDA state without CUDA here is skipped with a warning."""
    random.setstate(state["python"])
    npst = state["numpy"]
    keys = np.asarray(npst["keys"], dtype=np.int64).astype(np.uint32)  # MT19937 key: 624 uint32
    np.random.set_state((npst["kind"], keys, npst["pos"], npst["has_gauss"], npst["cached_gaussian"]))
    torch.set_rng_state(state["torch"].cpu())
    cuda = state.get("cuda")
    if cuda is None:
        return
    if not torch.cuda.is_available():
        warnings.warn(
            "the checkpoint holds CUDA RNG states but CUDA is not available: GPU random streams (dropout) "
            "will differ from the original run",
            CheckpointWarning,
            stacklevel=2,
        )
        return
    if len(cuda) != torch.cuda.device_count():
        warnings.warn(
            f"the checkpoint holds {len(cuda)} CUDA RNG states but {torch.cuda.device_count()} devices are "
            "visible: restoring the first ones only",
            CheckpointWarning,
            stacklevel=2,
        )
    for device, dev_state in enumerate(cuda[: torch.cuda.device_count()]):
        torch.cuda.set_rng_state(dev_state.cpu(), device)
