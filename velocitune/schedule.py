"""When things happen in a run: the LR of every step, the step budget, warm-up, and the mixing interval.

Pure functions of the config (no torch, no I/O), shared by the training loop, the proxy runs of
`velocitune targets` (which squeeze the main schedule to the proxy's length) and the Trainer callback, so
every path agrees on the same steps. The LR-aware target law integrates exactly `lr_schedule`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from velocitune import rules
from velocitune.config import Config, MixingConfig
from velocitune.errors import ConfigError, DataError


def lr_at(step: int, peak: float, steps: int, warmup: int, schedule: str, min_ratio: float, decay_fraction: float) -> float:
    """LR of optimizer step `step` (0-based): linear warm-up, then cosine, WSD or constant."""
    if step < warmup:
        return peak * (step + 1) / warmup
    lo = peak * min_ratio
    if schedule == "constant":
        return peak
    if schedule == "wsd":
        decay_start = max(warmup, int(round(steps * (1 - decay_fraction))))
        if step < decay_start:
            return peak
        frac = (step - decay_start + 1) / max(1, steps - decay_start)
        return peak + (lo - peak) * min(1.0, frac)
    progress = (step - warmup + 1) / max(1, steps - warmup)  # cosine: reaches lo at the last step
    return lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_lr(cfg: Config, step: int, steps: int) -> float:
    """`lr_at` with the config's schedule: the LR the loop sets before step `step` of a `steps`-step run."""
    t = cfg.train
    return lr_at(step, t.lr, steps, warmup_steps(cfg, steps), t.schedule, t.min_lr_ratio, t.decay_fraction)


def lr_schedule(cfg: Config, steps: int) -> np.ndarray:
    """The LR of every optimizer step, float64 (steps,): what the LR-aware target law integrates."""
    return np.array([step_lr(cfg, s, steps) for s in range(steps)])


def as_steps(x: float, steps: int) -> int:
    """A count of steps given as a fraction of the run (< 1) or as steps (>= 1)."""
    return int(round(x * steps)) if x < 1 else int(x)


def warmup_steps(cfg: Config, steps: int) -> int:
    """train.warmup_steps as a step count: a fraction of the run when < 1, else steps."""
    return as_steps(cfg.train.warmup_steps, steps)


def resolve_steps(cfg: Config, windows: Sequence[int]) -> int:
    """train.steps, else train.tokens / tokens per step, else one epoch of the (subsampled) corpus.

    `windows`: training windows of seq_len + 1 tokens per domain (after subsampling).
    """
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    if cfg.train.steps is not None:
        return cfg.train.steps
    if cfg.train.tokens is not None:
        return max(1, math.ceil(cfg.train.tokens / tokens_per_step))
    epoch = sum(windows) // cfg.train.batch_size
    if epoch < 1:
        raise DataError(
            f"the corpus holds {sum(windows)} training windows of {cfg.data.seq_len + 1} tokens, fewer than one "
            f"global batch of {cfg.train.batch_size}; lower train.batch_size or data.seq_len, or add data"
        )
    return epoch


def subsampled_windows(windows: Sequence[int], subsample: float) -> list[int]:
    """Windows per domain that a stratified `data.subsample` keeps (at least one per domain)."""
    return [max(1, math.ceil(w * subsample)) for w in windows]


def main_run_steps(cfg: Config, windows: Sequence[int]) -> int:
    """The main run's optimizer steps: what `velocitune train` runs, and what `targets` and `plan` size their
    proxies and budgets by. The one place the run's length is computed, so that they cannot diverge.

    `windows`: the prepared domains' training windows of seq_len + 1 tokens, as prepared (before
    `data.subsample`, which is applied here the way the sampler applies it).
    """
    return resolve_steps(cfg, subsampled_windows(windows, cfg.data.subsample))


def first_update_setting(mc: MixingConfig) -> float | None:
    """When the first weight update falls: mixing.warmup, else the rule's own (dbl: 0, odm: 2 %), else None:
    at the end of the LR warm-up (< 1: a fraction of the run; docs/design.md §3)."""
    return mc.warmup if mc.warmup is not None else rules.timing(mc.rule)["warmup"]


def update_interval(mc: MixingConfig, steps: int, rule_interval: bool = True) -> int:
    """m, the steps between weight updates: mixing.interval, else the rule's (odm: 1, with the train signal it
    was made for; `rule_interval=False` skips it), else max(1, steps // 100) (docs/design.md §3)."""
    m = mc.interval
    if m is None and rule_interval:
        m = rules.timing(mc.rule)["interval"]
    return default_interval(m, steps, adaptive=rules.is_adaptive(mc.rule))


def default_interval(interval: int | None, steps: int, adaptive: bool = True) -> int:
    """`interval` or its default max(1, steps // 100); refused when an adaptive rule would never update."""
    m = interval if interval is not None else max(1, steps // 100)
    if adaptive and m >= steps:
        raise ConfigError(
            f"config key 'mixing.interval' is {m} but the run has only {steps} steps, so the weights would "
            f"never change; use a smaller interval (default: steps // 100)"
        )
    return m


def is_update_step(step: int, warmup: int, m: int) -> bool:
    """Updates happen at optimizer-step boundaries from the end of warm-up on, every m steps; never at 0."""
    return step > 0 and step >= warmup and (step - warmup) % m == 0
