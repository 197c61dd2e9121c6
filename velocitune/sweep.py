"""`velocitune sweep`: run a grid of training arms over seeds as parallel processes, resumably.

On a small CPU machine several one-thread processes beat one multi-thread process (docs/design.md §8), so each arm
is a `velocitune train` subprocess pinned to `--threads` threads, `--parallel` at a time. An arm whose
run directory already holds a complete summary is skipped; one with checkpoints is resumed; so an
interrupted sweep continues where it stopped. The run directories feed `velocitune report`.
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from velocitune.errors import ConfigError, VelocituneError
from velocitune.fileio import output_dir, require_file
from velocitune.runfiles import run_is_complete


@dataclass
class Arm:
    """One training run: a name (its directory under the sweep root) and its dotted overrides."""

    name: str
    overrides: list[str] = field(default_factory=list)


def parse_grid(items: Sequence[str]) -> dict[str, list[str]]:
    """['mixing.rule=static,velocitune', 'mixing.eta=0.5,1'] -> {key: [values]} (values kept as text)."""
    grid: dict[str, list[str]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--grid '{item}' must look like section.key=v1,v2,...")
        key, values = item.split("=", 1)
        key = key.strip().lstrip("-")
        if key in grid:
            raise ConfigError(f"--grid names '{key}' twice")
        grid[key] = [v.strip() for v in values.split(",") if v.strip()]
        if not grid[key]:
            raise ConfigError(f"--grid '{item}' has no values")
    return grid


def expand(grid: dict[str, list[str]], seeds: Sequence[int], fixed: Sequence[str] = ()) -> list[Arm]:
    """The cartesian product of the grid, times seeds; arm names read like 'mixing.rule=dbl/seed1'."""
    keys = list(grid)
    arms = []
    for combo in itertools.product(*(grid[k] for k in keys)) if keys else [()]:
        label = ",".join(f"{k.split('.')[-1]}={v}" for k, v in zip(keys, combo)) or "base"
        overrides = list(fixed) + [f"--{k}={v}" for k, v in zip(keys, combo)]
        if keys:  # reports group seeds by arm
            overrides.append(f"--run.arm={label}")
        for s in seeds:
            arms.append(Arm(f"{label}/seed{s}", overrides + [f"--train.seed={s}"]))
    return arms


def arm_status(run_dir: Path) -> str:
    """'done' (complete summary), 'partial' (checkpoints to resume from) or 'new'."""
    if run_is_complete(run_dir):
        return "done"
    if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step_*")):
        return "partial"
    return "new"


def run_arms(
    config: str | Path | None,
    arms: Sequence[Arm],
    root: str | Path,
    parallel: int = 2,
    threads: int = 1,
    progress: bool = True,
) -> list[Path]:
    """Run every arm (skipping finished ones) as subprocesses; return their run directories in order."""
    if config is not None:
        require_file(config, "sweep config")
    root = output_dir(root, "the sweep root (--out)")
    dirs = [root / a.name for a in arms]
    todo = [(a, d) for a, d in zip(arms, dirs) if arm_status(d) != "done"]
    if not todo:
        return dirs
    from tqdm.auto import tqdm

    bar = tqdm(total=len(arms), initial=len(arms) - len(todo), unit="run", desc="runs", disable=not progress)
    failures: list[str] = []

    def launch(item: tuple[Arm, Path]) -> None:
        arm, run_dir = item
        status = arm_status(run_dir)
        if status == "new" and run_dir.exists():  # a run that died before its first checkpoint
            import shutil

            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "velocitune", "train"] + ([str(config)] if config else [])
        cmd += arm.overrides + [f"--run.out_dir={run_dir}", f"--train.threads={threads}", "--log.progress=false"]
        if status == "partial":
            cmd.append("--resume")
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        t0 = time.perf_counter()
        with open(run_dir.parent / f"{run_dir.name}.log", "a") as log:
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if rc != 0:
            failures.append(f"{arm.name} (exit {rc}; see {run_dir.parent / (run_dir.name + '.log')})")
        bar.set_postfix_str(f"{arm.name} {time.perf_counter() - t0:.0f}s")
        bar.update(1)

    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        list(pool.map(launch, todo))
    bar.close()
    if failures:
        raise VelocituneError("some runs failed: " + "; ".join(failures) + ". Re-run the same command to resume.")
    return dirs


HELP_DESCRIPTION = """\
A grid of training runs over seeds, as parallel resumable processes (each a `velocitune train`); a finished
run is skipped and an interrupted one resumed, so re-running the same command continues the sweep.

Config overrides are accepted: dotted --section.key=value arguments after the config apply to every arm,
exactly as --set section.key=value does (and as `velocitune train` takes them); --grid names the keys that
vary between arms. `velocitune train --help-config` lists every key with its default.
"""

HELP_EPILOG = """\
example:
  velocitune sweep configs/cpt.yaml --grid mixing.rule=static,velocitune --seeds 3 --train.steps=400 --out runs/sweep
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = HELP_DESCRIPTION
    p.epilog = HELP_EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("config", nargs="?", help="base YAML config for every arm")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="a config key and its values; repeat for a cartesian product (e.g. mixing.rule=static,velocitune)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an override for every arm (the same as --KEY=VALUE after the config)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per arm (train.seed = 0..N-1; default 3)")
    p.add_argument("--out", default="runs/sweep", help="sweep root; each arm gets ROOT/<arm>/seed<N>")
    p.add_argument("--parallel", type=int, default=os.cpu_count() or 1,
                   help="runs at once (default: CPU count; on 2 cores two 1-thread runs beat one 2-thread run)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    p.add_argument("--no-report", action="store_true", help="skip `velocitune report` at the end")


def main(args: argparse.Namespace) -> int:
    grid = parse_grid(args.grid)
    fixed = [s if s.startswith("--") else f"--{s}" for s in args.set]
    arms = expand(grid, range(args.seeds), fixed)
    print(f"{len(arms)} runs ({len(arms) // max(1, args.seeds)} arms x {args.seeds} seeds), {args.parallel} at a time")
    dirs = run_arms(args.config, arms, args.out, args.parallel, args.threads)
    if not args.no_report:
        from velocitune.report import make_report

        path = make_report(dirs, Path(args.out) / "report")
        print(f"report: {path}")
    return 0
