"""The proxy recipe of `velocitune targets` (docs/design.md §3 Stage B): the main run's config turned into a
short static-w0 run on a stratified subsample, its schedule compressed, evaluated at a few points; and the
main run's length it is sized from (`schedule.main_run_steps`, the same as `velocitune train`'s)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np

from velocitune import runfiles
from velocitune.config import Config, check_resume_config, to_dict
from velocitune.errors import ConfigError, DataError
from velocitune.schedule import main_run_steps
from velocitune.shards import PreparedData


def main_steps_for(cfg: Config, data: PreparedData) -> int:
    """The main run's optimizer steps on the prepared data: what `velocitune train` will run with `cfg`."""
    return main_run_steps(cfg, [data.train(n).n_windows(cfg.data.seq_len) for n in data.domains])


def proxy_eval_steps(proxy_steps: int, n_points: int) -> list[int]:
    """n evaluation steps spaced evenly over [0.1, 1] of the proxy run (skipping most of warm-up)."""
    pts = np.unique(np.round(np.linspace(0.1 * proxy_steps, proxy_steps, n_points)).astype(int))
    return [int(p) for p in pts if p >= 1]


def proxy_config(cfg: Config, out_dir: Path, main_steps: int) -> Config:
    """The main run's config turned into its proxy: static w0 on a stratified fraction of every domain (of the
    main run's data: `targets.fraction` × `data.subsample`), `main_steps` compressed to the fraction.

    The recipe comes from cfg.targets: `fraction` of the data, `points` evaluations, and the LR schedule
    either compressed from the main run's (warm-up, peak, anneal) or constant at the peak (the paper's).
    """
    tc = cfg.targets
    pc = copy.deepcopy(cfg)
    if tc.proxy_schedule == "constant":
        pc.train.schedule = "constant"
    # At least one step per point, but never longer than the main run (tiny test runs).
    proxy_steps = min(main_steps, max(tc.points, int(round(tc.fraction * main_steps))))
    pc.data.subsample = tc.fraction * cfg.data.subsample  # a fraction of what the main run trains on
    pc.train.steps = proxy_steps
    pc.train.tokens = None
    if cfg.train.warmup_steps >= 1:  # absolute warm-up: compress it with the schedule
        pc.train.warmup_steps = max(1.0, round(cfg.train.warmup_steps * proxy_steps / main_steps))
    pc.mixing.rule = "static"
    pc.mixing.weights = None
    pc.mixing.targets = None
    pc.mixing.target_values = None
    pc.mixing.init_loss = None  # the proxy measures ℓ_init at its step 0: the base model on the same val sets
    pc.eval.points = proxy_eval_steps(proxy_steps, tc.points)
    pc.eval.interval = None
    pc.checkpoint.interval = 0
    pc.checkpoint.save_final = False
    pc.run.out_dir = str(out_dir)
    pc.run.arm = "proxy"
    return pc


def proxy_reusable(proxy_dir: Path, pc: Config) -> bool:
    """A finished proxy with the same config (up to keys that do not change it) can be fitted again."""
    if not runfiles.run_is_complete(proxy_dir):
        return False
    try:  # the same keys that may change on resume (threads, logging, ...) do not change the proxy either
        check_resume_config(to_dict(runfiles.read_config(proxy_dir / runfiles.CONFIG_FILE)), to_dict(pc))
    except (ConfigError, DataError):
        return False
    return True
