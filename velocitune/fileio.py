"""Files that survive crashes: atomic writes with fsync, JSON-lines logs, and checks on the kind of a path.

Everything velocitune writes goes through here, so that a crash never leaves a half-written file behind
(`atomic_write_*`: temp file in the same directory, fsync, rename), a crash-torn log line is dropped
rather than glued onto the next record (`JsonlWriter`), and a resumed run's logs equal an uninterrupted
run's (`truncate_after`). `require_file`/`require_dir`/`output_dir` turn a path of the wrong kind (a file
where a directory belongs, or the reverse) into one clear error before any work starts.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from velocitune.errors import DataError


def json_default(obj: Any) -> Any:
    """`json.dumps(default=...)` hook: numpy/torch scalars and arrays become numbers and lists, paths strings.

    A torch tensor is converted with `.tolist()`, which syncs with the device: log only at log points.
    """
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    # torch is only checked when already imported: no tensor can exist otherwise, and this module
    # stays importable without paying for torch.
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    raise TypeError(f"cannot write a {type(obj).__name__} as JSON (value {obj!r:.80})")


def fsync_dir(path: Path) -> None:
    """Make a rename or file creation inside directory `path` durable (POSIX; a no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems (and Windows) refuse fsync on a directory; the data files are synced
    finally:
        os.close(fd)


def install_dir(tmp: Path, final: Path) -> None:
    """Rename the finished directory `tmp` to `final` durably, replacing an older `final`.

    rename cannot replace a non-empty directory, so an older `final` (a re-save of the same step after a
    resume) is first renamed aside under a `.tmp-` name and deleted afterwards; a crash between the two
    renames loses only that older copy, which the next save's clean-up removes.
    """
    fsync_dir(tmp)  # the files inside are synced by their writers; this makes their names durable
    if final.exists():
        aside = final.with_name(f".tmp-replaced-{final.name}-{os.getpid()}")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(final, aside)
        os.rename(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


def write_synced(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it (inside a directory that is itself renamed into place later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a torn mix."""
    atomic_write_bytes(Path(path), text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write `obj` as indented JSON (numpy/torch values converted), ending with a newline."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=json_default) + "\n")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Temp file in the same directory (so the rename stays on one filesystem), fsync, os.replace."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


class JsonlWriter:
    """Append one JSON object per line to `path`, flushed after every record; `sync()` also fsyncs.

    Opening a file that ends in a partial line (a crash mid-write) first drops that line, with a
    warning, so the next record does not get glued onto it.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            _drop_partial_tail(self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """Append `record` as one line (a single write call, so a crash tears at most this line)."""
        self._f.write(json.dumps(record, default=json_default) + "\n")
        self._f.flush()

    def sync(self) -> None:
        """Force the records written so far onto disk (call at checkpoints, not every step)."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        if not self._f.closed:
            self.sync()
            self._f.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _split_lines(text: str) -> tuple[list[str], str | None]:
    """Split a JSON-lines text into its complete lines (without "\\n") and a dropped partial tail.

    A final line without a newline is kept when it parses (a record written without its newline);
    otherwise it is a write cut short by a crash and is returned as the tail, to be dropped.
    """
    lines = text.split("\n")
    tail = lines.pop()  # "" when the text ends with a newline
    if tail.strip() == "":
        return lines, None
    try:
        json.loads(tail)
    except json.JSONDecodeError:
        return lines, tail
    return lines + [tail], None


def _warn_partial(path: Path, n_lines: int, tail: str) -> None:
    warnings.warn(
        f"{path}: dropped a partial last line (line {n_lines + 1}, {len(tail)} characters, "
        f"starting {tail[:40]!r}); it was cut short by a crash during the write",
        stacklevel=3,
    )


def _drop_partial_tail(path: Path) -> None:
    """Rewrite `path` (atomically) without a crash-torn last line, ending a complete last line with "\\n"."""
    text = _read_text(path)
    lines, tail = _split_lines(text)
    if tail is not None:
        _warn_partial(path, len(lines), tail)
    fixed = "".join(line + "\n" for line in lines)
    if fixed != text:
        atomic_write_text(path, fixed)


def _parse_record(path: Path, lineno: int, line: str) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path}, line {lineno}: not valid JSON ({exc.msg} at column {exc.colno}); the file is damaged "
            "in the middle, not just at the end: fix or delete that line"
        ) from exc
    if not isinstance(record, dict):
        raise DataError(
            f"{path}, line {lineno}: expected a JSON object per line, got {type(record).__name__}: fix or "
            "delete that line"
        )
    return record


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): the file is damaged; fix or delete it"
        ) from None


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSON-lines file; blank lines are skipped, a crash-torn last line dropped with a warning.

    Raises DataError for a malformed line anywhere else.
    """
    path = Path(path)
    lines, tail = _split_lines(_read_text(path))
    if tail is not None:
        _warn_partial(path, len(lines), tail)
    return [_parse_record(path, i, line) for i, line in enumerate(lines, start=1) if line.strip()]


def truncate_after(path: str | os.PathLike, step: int, key: str = "step") -> int:
    """On resume from a checkpoint at `step`: drop the records with `record[key] > step`; returns how many.

    The kept lines are copied byte for byte, so the resumed run's file ends up equal to an uninterrupted
    run's. The rewrite is atomic (temp file + rename); a crash-torn last line is dropped with a warning.
    A missing file is left missing (returns 0).
    """
    path = Path(path)
    if not path.exists():
        return 0
    text = _read_text(path)
    lines, tail = _split_lines(text)
    if tail is not None:
        _warn_partial(path, len(lines), tail)
    kept: list[str] = []
    dropped = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse_record(path, lineno, line)
        value = record.get(key)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise DataError(
                f"{path}, line {lineno}: the record has no numeric {key!r} field, so it cannot be matched "
                f"to the checkpoint at step {step}: fix or delete that line"
            )
        if value > step:
            dropped += 1
        else:
            kept.append(line)
    new_text = "".join(line + "\n" for line in kept)
    if new_text != text:
        atomic_write_text(path, new_text)
    return dropped


def read_json(path: str | os.PathLike, fix: str = "re-create it with the command that wrote it") -> Any:
    """The JSON document in `path`; DataError when it is not UTF-8 or not valid JSON (a damaged file)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text ({exc.reason} at byte {exc.start}): the file is damaged; {fix}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(
            f"{path} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); the file is damaged "
            f"or was cut short: {fix}"
        ) from None


# --------------------------------------------------------------------------------------------------
# The kind of a path


def require_file(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """`path` as a Path when it is an existing file; DataError saying what it is instead, and `hint`."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"{what} '{p}' is a directory, but a file is needed here" + (f"; {hint}" if hint else ""))
    if not p.is_file():
        raise DataError(f"{what} '{p}' does not exist" + (f"; {hint}" if hint else ""))
    return p


def require_dir(path: str | os.PathLike, what: str, hint: str = "") -> Path:
    """`path` as a Path when it is an existing directory; DataError saying what it is instead, and `hint`."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise DataError(f"{what} '{p}' is a file, but a directory is needed here" + (f"; {hint}" if hint else ""))
    if not p.is_dir():
        raise DataError(f"{what} '{p}' does not exist" + (f"; {hint}" if hint else ""))
    return p


def output_dir(path: str | os.PathLike, what: str, create: bool = True) -> Path:
    """Directory `path` for output, created (with its parents) unless `create` is False; DataError when it,
    or a parent, is a file."""
    p = Path(path).expanduser()
    for q in (p, *p.parents):
        if q.exists() and not q.is_dir():
            raise DataError(f"{what} '{p}' cannot be created: '{q}' is a file, not a directory; choose another path")
    if create:
        p.mkdir(parents=True, exist_ok=True)
    return p


def output_file(path: str | os.PathLike, what: str) -> Path:
    """`path` for a file about to be written: its directory is created; DataError when `path` is a directory."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise DataError(f"{what} '{p}' is a directory; give the path of the file to write (e.g. {p / 'x.json'})")
    output_dir(p.parent, f"the directory of {what}")
    return p
