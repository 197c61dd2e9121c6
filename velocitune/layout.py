"""The shape of a training run, fixed at set-up: domains, steps, batch geometry, evaluations, checkpoints.

Pure functions of the config and the data's window counts (no model, no I/O), so a bad combination is
refused before anything is loaded. When the mixture is updated is the mixing controller's business
(velocitune/controller.py); the curve evaluations default to its interval under the eval signal.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from velocitune.config import Config
from velocitune.errors import ConfigError, DataError
from velocitune.schedule import main_run_steps, warmup_steps


@dataclass(frozen=True)
class Layout:
    """The shape of a run: domains, steps, batch geometry, LR warm-up and the checkpoint interval."""

    names: list[str]
    seq_len: int
    steps: int
    batch: int  # global batch, sequences per optimizer step
    micro: int  # sequences per forward on this rank
    n_micro: int  # micro-batches per rank per step (gradient accumulation)
    warmup: int  # LR warm-up steps
    ckpt_every: int  # 0: no checkpoints

    @property
    def k(self) -> int:
        return len(self.names)

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


def train_windows(domains: dict, L: int) -> list[int]:
    """Training windows of L + 1 tokens per domain ({name: DomainTokens}); DataError when a domain holds none."""
    windows = [tokens.n_windows(L) for tokens in domains.values()]
    empty = [n for n, w in zip(domains, windows) if w == 0]
    if empty:
        raise DataError(
            f"domain(s) {empty} hold fewer training tokens than one window of data.seq_len + 1 = {L + 1}; "
            f"lower data.seq_len or add documents"
        )
    return windows


def plan_layout(cfg: Config, windows: Sequence[int], names: Sequence[str], world_size: int) -> Layout:
    """Steps and batch geometry from the config and the data; ConfigError when they do not fit together."""
    steps = main_run_steps(cfg, windows)
    B = cfg.train.batch_size
    if B % world_size:
        raise ConfigError(f"train.batch_size={B} must be divisible by the number of processes ({world_size})")
    per_rank = B // world_size
    micro = cfg.train.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch_size={micro} must divide the per-process batch {per_rank}")
    ckpt_every = cfg.checkpoint.interval if cfg.checkpoint.interval is not None else max(1, steps // 5)
    return Layout(names=list(names), seq_len=cfg.data.seq_len, steps=steps, batch=B, micro=micro,
                  n_micro=per_rank // micro, warmup=warmup_steps(cfg, steps), ckpt_every=ckpt_every)


def eval_points(cfg: Config, steps: int, interval: int, eval_signal: bool) -> frozenset[int]:
    """Steps with an evaluation for the loss curves: eval.points, else every eval.interval steps, else every
    update interval m under the eval signal (those evaluations are the signal's), else every steps // 10."""
    if cfg.eval.points is not None:
        return frozenset(cfg.eval.points)
    every = cfg.eval.interval or (interval if eval_signal else max(1, steps // 10))
    return frozenset(range(every, steps, every))


def assemble(domains: dict, names: list[str], dom: np.ndarray, win: np.ndarray, L: int, device: torch.device):
    """Gather the planned windows into one int64 batch (n, L+1) and its per-sequence domain ids (n,)."""
    batch = np.empty((len(dom), L + 1), dtype=np.int64)
    for d in np.unique(dom):
        rows = np.nonzero(dom == d)[0]
        batch[rows] = domains[names[d]].windows(win[rows], L)
    x = torch.from_numpy(batch)
    dvec = torch.from_numpy(dom.astype(np.int64))
    if device.type == "cuda":
        x, dvec = x.pin_memory(), dvec.pin_memory()
    return x.to(device, non_blocking=True), dvec.to(device, non_blocking=True)
