"""Measure how fast a run goes: FLOPs per token, named GPU peaks, throughput and MFU, timers, and the
one-line display of mixture weights. TensorBoard and Weights & Biases are `velocitune.loggers`.

The figures mean what they say: tokens/s over a window between log points, MFU against a named dense
bf16 peak only on GPUs we know (never a guess), and timers that carry their totals across a resume.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np


def flops_per_token(model, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·A·T (the PaLM appendix B / nanoGPT convention).

    N = non-embedding parameters (`model.num_params(exclude_embeddings=True)`, output head included):
    2 FLOPs per parameter per token forward, 4 backward. The attention term counts QKᵀ and the
    attention-weighted sum of V over the whole window (T = seq_len, no causal halving) in every one
    of the L layers, A = n_heads·head_dim wide, forward and backward.
    """
    from velocitune.model import num_params, unwrap_model

    config = unwrap_model(model).config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n_layers = config.num_hidden_layers
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return 6.0 * num_params(model, exclude_embeddings=True) + 12.0 * n_layers * n_heads * head_dim * seq_len


# (substring of torch.cuda.get_device_name().upper(), dense bf16 peak FLOP/s, source). Ordered so
# that a more specific name matches before a substring of it (H100 NVL before H100, L40S before L4).
_PEAKS: tuple[tuple[str, float, str], ...] = (
    ("H100 NVL", 835e12, "H100 NVL bf16 dense"),
    ("H100 PCIE", 756e12, "H100 PCIe bf16 dense"),
    ("H100", 989.5e12, "H100 SXM bf16 dense"),
    ("H200", 989.5e12, "H200 bf16 dense"),
    ("B200", 2250e12, "B200 bf16 dense"),
    ("A100", 312e12, "A100 bf16 dense"),
    ("L40S", 362.05e12, "L40S bf16 dense"),
    ("L4", 121e12, "L4 bf16 dense"),
    ("A10G", 125e12, "A10 bf16 dense (datasheet; A10G clocks can be lower)"),
    ("A10", 125e12, "A10 bf16 dense"),
)


def peak_flops(device) -> tuple[float | None, str]:
    """The named dense bf16 peak FLOP/s of `device` for MFU, and what it is; (None, why) if unknown."""
    import torch

    device = torch.device(device)
    if device.type != "cuda":
        return None, f"{device.type}: no named peak (MFU is reported on known GPUs only)"
    name = torch.cuda.get_device_name(device)
    upper = name.upper()
    for key, flops, source in _PEAKS:
        if key in upper:
            return flops, f"{name}: {source} {flops / 1e12:g} TFLOP/s"
    return None, f"{name}: unknown GPU, no named peak (MFU not reported)"


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
    """Named cumulative timers, `with timers("eval"): ...`, carried across a resume by `state_dict`.

    GPU work is asynchronous: a timer around it measures only the launch unless the device is
    synchronized at both ends. Pass `sync_fn` (e.g. `torch.cuda.synchronize`) and ask for it per timer
    with `timers("eval", sync=True)`, only where the extra sync is worth its cost.
    """

    def __init__(self, sync_fn: Callable[[], None] | None = None, clock: Callable[[], float] = time.perf_counter):
        self._sync_fn = sync_fn
        self._clock = clock
        self._totals: dict[str, float] = {}
        self._running: set[str] = set()

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

    def total(self, name: str) -> float:
        """Cumulative seconds under `name` (0.0 if it never ran)."""
        return self._totals.get(name, 0.0)

    def seconds(self) -> dict[str, float]:
        """Cumulative seconds per name."""
        return dict(self._totals)

    def state_dict(self) -> dict[str, Any]:
        return {"totals": dict(self._totals)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._totals = {str(k): float(v) for k, v in state["totals"].items()}


# --------------------------------------------------------------------------------------------------
# Display


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
