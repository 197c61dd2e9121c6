"""Record what a run did and how fast: JSON-lines logs, atomic files, throughput/MFU, timers, TensorBoard.

Everything a run writes besides checkpoints goes through here, so that a crash never leaves a half-written
file behind (`atomic_write_*`), a resumed run's logs equal an uninterrupted run's (`truncate_after`), and
the speed figures mean what they say (`Throughput`, `Timers`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from velocitune.errors import ConfigError, DataError

# Dense (no sparsity) bf16 tensor-core peaks per device, from NVIDIA's data sheets, matched against
# `torch.cuda.get_device_name()`. Longer keys first so "H100 PCIe" wins over "H100".
PEAK_BF16_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H100": 989e12,  # SXM (the name reads e.g. "NVIDIA H100 80GB HBM3")
    "H200": 989e12,
    "A100": 312e12,
}


# --------------------------------------------------------------------------------------------------
# Files


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
    text = path.read_text(encoding="utf-8")
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


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a JSON-lines file; blank lines are skipped, a crash-torn last line dropped with a warning.

    Raises DataError for a malformed line anywhere else.
    """
    path = Path(path)
    lines, tail = _split_lines(path.read_text(encoding="utf-8"))
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
    text = path.read_text(encoding="utf-8")
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


# --------------------------------------------------------------------------------------------------
# Speed


def transformer_flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token of a decoder: 6·N for the matmuls plus 12·L·d·T for attention scores.

    Forward + backward = 3 × forward; forward = 2·N (one multiply-add per weight) + 4·L·d·T
    (QKᵀ and AV over a length-T context), as in PaLM (Chowdhery et al. 2022, appendix B).
    Pass the non-embedding parameter count for N when the embedding is a lookup.
    """
    return 6.0 * n_params + 12.0 * n_layers * d_model * seq_len


def peak_flops_for_device(device_name: str) -> float | None:
    """The dense bf16 peak FLOP/s for a GPU name as `torch.cuda.get_device_name()` gives it, or None."""
    for key, peak in PEAK_BF16_FLOPS.items():
        if key.lower() in device_name.lower():
            return peak
    return None


@dataclass(frozen=True)
class ThroughputStats:
    """Speed between the last two log points (`window_*`) and since `Throughput.start()` (`total_*`)."""

    window_tokens: int
    window_s: float
    tok_per_s: float  # over the window
    total_tokens: int
    elapsed_s: float
    avg_tok_per_s: float  # since start
    mfu: float | None  # over the window; None without a peak or FLOPs/token


class Throughput:
    """Tokens per second between log points and overall, with MFU when a peak is given.

    Count *global* tokens (all ranks) in `add`; `peak_flops` is per device, so
    MFU = flops_per_token · tok/s / (peak_flops · n_ranks).
    """

    def __init__(
        self,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        n_ranks: int = 1,
        clock: Callable[[], float] = time.perf_counter,
    ):
        if n_ranks < 1:
            raise ValueError(f"n_ranks must be >= 1, got {n_ranks}")
        if peak_flops is not None and peak_flops <= 0:
            raise ValueError(f"peak_flops must be positive, got {peak_flops}")
        self.flops_per_token = flops_per_token
        self.peak_flops = peak_flops
        self.n_ranks = n_ranks
        self._clock = clock
        self.start()

    def start(self) -> None:
        """(Re)start both clocks and zero the counts, e.g. after model set-up and before the first step."""
        self._t0 = self._t_window = self._clock()
        self._total_tokens = 0
        self._window_tokens = 0

    def add(self, tokens: int) -> None:
        """Count `tokens` more trained tokens (summed over ranks)."""
        self._window_tokens += int(tokens)
        self._total_tokens += int(tokens)

    def log_point(self) -> ThroughputStats:
        """Close the current window, return its stats and open the next one."""
        now = self._clock()
        window_s = now - self._t_window
        elapsed_s = now - self._t0
        tok_per_s = self._window_tokens / window_s if window_s > 0 else 0.0
        mfu = None
        if self.peak_flops is not None and self.flops_per_token is not None:
            mfu = self.flops_per_token * tok_per_s / (self.peak_flops * self.n_ranks)
        stats = ThroughputStats(
            window_tokens=self._window_tokens,
            window_s=window_s,
            tok_per_s=tok_per_s,
            total_tokens=self._total_tokens,
            elapsed_s=elapsed_s,
            avg_tok_per_s=self._total_tokens / elapsed_s if elapsed_s > 0 else 0.0,
            mfu=mfu,
        )
        self._t_window = now
        self._window_tokens = 0
        return stats


class Timers:
    """Named cumulative timers, `with timers("eval"): ...`, and each name's share of the wall time.

    GPU work is asynchronous: a timer around it measures only the launch unless the device is
    synchronized at both ends. Pass `sync_fn` (e.g. `torch.cuda.synchronize`) and ask for it per timer
    with `timers("eval", sync=True)`, only where the extra sync is worth its cost.
    State (`state_dict`) carries the totals across a resume.
    """

    def __init__(self, sync_fn: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        self._sync_fn = sync_fn
        self._clock = clock
        self._totals: dict[str, float] = {}
        self._running: set[str] = set()
        self._t0 = clock()
        self._wall_before = 0.0  # wall seconds of earlier processes of this run (after a resume)

    @contextmanager
    def __call__(self, name: str, sync: bool = False) -> Iterator[None]:
        if name in self._running:
            # Re-entering the same name would count the inner span twice.
            raise RuntimeError(f"timer {name!r} is already running")
        do_sync = sync and self._sync_fn is not None
        if do_sync:
            self._sync_fn()
        self._running.add(name)
        start = self._clock()
        try:
            yield
        finally:
            if do_sync:
                self._sync_fn()
            self._totals[name] = self._totals.get(name, 0.0) + (self._clock() - start)
            self._running.discard(name)

    def wall_s(self) -> float:
        """Wall seconds since the timers were created, plus those carried over from a resumed run."""
        return self._wall_before + (self._clock() - self._t0)

    def total(self, name: str) -> float:
        """Cumulative seconds under `name` (0.0 if it never ran)."""
        return self._totals.get(name, 0.0)

    def seconds(self) -> dict[str, float]:
        """Cumulative seconds per name."""
        return dict(self._totals)

    def shares(self) -> dict[str, float]:
        """Each name's seconds as a fraction of the wall time."""
        wall = self.wall_s()
        return {name: (s / wall if wall > 0 else 0.0) for name, s in self._totals.items()}

    def as_metrics(self) -> dict[str, float]:
        """`{"time_<name>_s": seconds}`, the fields metrics.jsonl carries (docs/contracts.md)."""
        return {f"time_{name}_s": s for name, s in self._totals.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self._totals), "wall_s": self.wall_s()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._totals = {str(k): float(v) for k, v in state["totals"].items()}
        self._wall_before = float(state["wall_s"])
        self._t0 = self._clock()


# --------------------------------------------------------------------------------------------------
# Display


class TensorBoardLogger:
    """Optional TensorBoard scalars (loss, per-domain losses, weights, velocity); a no-op when disabled."""

    def __init__(self, log_dir: str | os.PathLike, enabled: bool):
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(
                "TensorBoard logging is enabled but the `tensorboard` package is not installed: run "
                "pip install 'velocitune[tensorboard]', or turn TensorBoard off in the config"
            ) from exc
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, float(value), global_step=step)

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        """Write every number in `values` under "prefix/key" (just "key" when `prefix` is ""); a nested
        mapping nests the tag ("weights/math"). Strings, lists and None are skipped, so a whole
        metrics record can be passed as it is."""
        if self._writer is None:
            return
        for key, value in values.items():
            tag = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                self.scalars(tag, value, step)
            elif _is_number(value):
                self.scalar(tag, float(value), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float, np.number)):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor) and value.numel() == 1


def format_weights(names: Sequence[str], w: Sequence[float] | np.ndarray) -> str:
    """Compact weights for a progress bar: "code .41 math .22 prose 1.00"; a positive weight that
    rounds to zero shows as "<.01" so a collapsing domain stays visible."""
    values = np.asarray(w, dtype=np.float64).reshape(-1)
    if len(names) != len(values):
        raise ValueError(f"{len(names)} names but {len(values)} weights")
    parts = []
    for name, x in zip(names, values, strict=True):
        if not math.isfinite(x):
            text = str(x)
        else:
            text = f"{x:.2f}"
            if text.startswith("0."):
                text = text[1:]
            if text == ".00" and x > 0:
                text = "<.01"
        parts.append(f"{name} {text}")
    return " ".join(parts)
