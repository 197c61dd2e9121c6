"""Measure how fast a run goes: FLOPs per token, named GPU peaks, throughput and MFU, timers, TensorBoard
and Weights & Biases.

The figures mean what they say: tokens/s over a window between log points, MFU against a named dense
bf16 peak only on GPUs we know (never a guess), and timers that carry their totals across a resume.
"""

from __future__ import annotations

import math
import os
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from velocitune.errors import ConfigError


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
        for tag, value in flat_scalars(prefix, values).items():
            self.scalar(tag, value, step)

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


def flat_scalars(prefix: str, values: Mapping[str, Any]) -> dict[str, float]:
    """{"prefix/key": float} of every number in `values`, nested mappings nesting the tag ("weight/math"); strings,
    lists and None are skipped. TensorBoard and W&B both name their scalars this way, so they match."""
    out: dict[str, float] = {}
    for key, value in values.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flat_scalars(tag, value))
        elif _is_number(value):
            out[tag] = float(value)
    return out


def new_wandb_run_id() -> str:
    """A fresh W&B run id (lower-case hex: valid in W&B ids and URLs), chosen by us so it can be saved before
    wandb.init and a crash in between still resumes the same run."""
    return secrets.token_hex(6)


def import_wandb():
    """The `wandb` module, or a ConfigError saying how to install it."""
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError(
            "Weights & Biases logging is enabled (log.wandb: true) but the `wandb` package is not installed: run "
            "pip install 'velocitune[wandb]', or set log.wandb=false"
        ) from exc
    return wandb


class WandbLogger:
    """Optional Weights & Biases run: the same scalars as TensorBoard, under the same names and steps, plus the
    config, summary values and images; a no-op when disabled. Create it on rank 0 only.

    Every `scalars` call is logged with `step=` the optimizer steps done, so W&B's step axis is TensorBoard's.
    W&B merges calls at one step into one history row and drops a call at a step lower than the last it saw
    (it warns): the trainer logs in step order, and on `--resume` the steps re-done after the checkpoint go
    to W&B again (see docs/usage.md, "Weights & Biases").
    """

    def __init__(self, enabled: bool, *, run_id: str | None = None, project: str = "velocitune",
                 entity: str | None = None, name: str | None = None, group: str | None = None,
                 tags: Sequence[str] = (), mode: str = "auto", config: Mapping[str, Any] | None = None,
                 local_dir: str | os.PathLike | None = None):
        self.enabled = enabled
        self._run = None
        self._wandb = None
        if not enabled:
            return
        wandb = self._wandb = import_wandb()
        if local_dir is not None:
            Path(local_dir).mkdir(parents=True, exist_ok=True)  # W&B refuses a `dir` that does not exist
        # resume="allow": the id is ours (new_wandb_run_id), so the first start creates the run and `--resume`
        # continues it; "must" would refuse to resume online a run whose first process logged offline.
        try:
            self._run = wandb.init(id=run_id, resume="allow", project=project, entity=entity, name=name, group=group,
                                   tags=list(tags), mode=None if mode == "auto" else mode,
                                   dir=None if local_dir is None else str(local_dir))
        except wandb.errors.Error as exc:  # not logged in, no network, a project or entity W&B refuses, ...
            raise ConfigError(
                f"Weights & Biases could not start the run ({exc}); run `wandb login`, check log.wandb_project and "
                "log.wandb_entity, or log without network with log.wandb_mode=offline (upload later: `wandb sync`)"
            ) from exc
        if config is not None:
            # Not through init(config=...): a resumed run may have changed log.* keys, and W&B refuses a changed
            # config value on a resumed run unless told the change is wanted.
            self._run.config.update(dict(config), allow_val_change=True)

    @property
    def run_id(self) -> str | None:
        return None if self._run is None else self._run.id

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._run is not None:
            self._run.log({tag: float(value)}, step=step)

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        """Log every number in `values` as "prefix/key" at `step` (the TensorBoard logger's rules, same names)."""
        if self._run is not None:
            flat = flat_scalars(prefix, values)
            if flat:
                self._run.log(flat, step=step)

    def summary(self, prefix: str, values: Mapping[str, Any]) -> None:
        """Set the run summary's "prefix/key" values (W&B shows them in its runs table)."""
        if self._run is not None:
            self._run.summary.update(flat_scalars(prefix, values))

    def images(self, images: Mapping[str, tuple[str | os.PathLike, str]], step: int) -> None:
        """Log {tag: (PNG path, caption)} as W&B images at `step`; W&B copies the files when they are logged."""
        if self._run is not None and images:
            self._run.log({tag: self._wandb.Image(str(path), caption=caption) for tag, (path, caption) in images.items()},
                          step=step)

    def close(self, exit_code: int = 0) -> None:
        """Finish the run (exit_code != 0 marks it failed in W&B; `--resume` continues it all the same)."""
        if self._run is not None:
            run, self._run = self._run, None
            run.finish(exit_code=exit_code)
            if self._wandb.run is None:
                # W&B's service process closes the run's files on its own schedule, after finish() returns (seen:
                # an offline transaction log still empty when read right after). With no other W&B run in this
                # process, shut the service down (it waits for them), so the files are complete when training
                # returns; the next wandb.init starts a new service.
                self._wandb.teardown()


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
