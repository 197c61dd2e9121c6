"""The proxy recipe of `velocitune targets` (docs/design.md §3 Stage B): the main run's config turned into a
short static-w0 run on a stratified subsample, its schedule compressed, evaluated at a few points; and the
main run's length it is sized from (`schedule.main_run_steps`, the same as `velocitune train`'s); whether a proxy
run directory is reused, resumed (`--resume`) or refused; and the warning when a short run stretches the proxy.

A proxy writes a checkpoint when it is preempted (SIGTERM/SIGUSR1: what `kill` and schedulers send), not
periodically: `velocitune targets --resume` continues it from there (docs/usage.md "Targets").
"""

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


def proxy_length(fraction: float, points: int, main_steps: int) -> int:
    """A proxy's steps: `fraction` of the main run, but at least one step per evaluation point and never longer
    than the main run (short runs: `proxy_warning` says so)."""
    return min(main_steps, max(points, int(round(fraction * main_steps))))


def proxy_warning(fraction: float, points: int, main_steps: int) -> str | None:
    """What to set when a short main run makes the proxy longer than `targets.fraction` of it (None: it is not)."""
    steps = proxy_length(fraction, points, main_steps)
    if steps <= max(1, int(round(fraction * main_steps))):
        return None
    return (f"the targets proxy runs {steps} steps, {steps / main_steps:.0%} of the main run's {main_steps} "
            f"(targets.fraction={fraction:g} asks for {fraction:.0%}): it needs one step per evaluation point "
            f"(targets.points={points}); lower targets.points (at least 4) or lengthen the main run (train.steps)")


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
    proxy_steps = proxy_length(tc.fraction, tc.points, main_steps)
    pc.data.subsample = tc.fraction * cfg.data.subsample  # a fraction of what the main run trains on
    pc.train.steps = proxy_steps
    pc.train.tokens = None
    if cfg.train.warmup_steps >= 1:  # absolute warm-up: compress it with the schedule
        pc.train.warmup_steps = max(1.0, round(cfg.train.warmup_steps * proxy_steps / main_steps))
    pc.mixing.rule = "static"
    pc.mixing.pace = False  # static at w0: a baseline does not pace (rules.pace_default), whatever the main run does
    pc.mixing.online, pc.mixing.max_rise, pc.mixing.objective = False, None, None  # nor refits targets it makes
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


def resume_proxy(run_dir: Path, resume: bool) -> bool:
    """Whether to continue the proxy in `run_dir` (train(pc, resume=True)) rather than start it afresh.

    True when it holds checkpoints of an unfinished run and `resume` was asked (train's resume then checks
    the config against the checkpoint's). Without `resume` such a directory is refused (ConfigError), never
    deleted: a preempted proxy is work a plain re-run would throw away. False when there is nothing to
    continue (no directory, a finished run, or no checkpoint): the caller clears it and starts at step 0.
    """
    from velocitune.checkpoint import list_checkpoints  # torch: only when a proxy runs

    ckpts = list_checkpoints(run_dir / runfiles.CHECKPOINTS_DIR)
    if not ckpts or runfiles.run_is_complete(run_dir):
        return False
    if not resume:
        raise ConfigError(f"the proxy run directory {run_dir} holds an unfinished proxy (checkpoint {ckpts[-1].name}); "
                          f"pass --resume to continue it, or delete {run_dir}")
    return True
