"""The proxies of a plan (docs/design.md §4.4): run them here one after another (`run_proxies`), or write
their configs and a commands file for a cluster (`emit_commands`), then read what the finished ones give
(`collect`): the shares each realised, each domain's loss at its end, and where its curve is needed the loss
extrapolated to the main budget by the `targets` predictor."""

from __future__ import annotations

import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from velocitune import laws, runfiles
from velocitune.config import Config, check_resume_config, dump_yaml, to_dict
from velocitune.errors import ConfigError, DataError
from velocitune.fileio import atomic_write_text
from velocitune.plan.design import PROXIES_DIR, PlanSetup, needs_curve
from velocitune.schedule import lr_schedule, warmup_steps
from velocitune.targets import fit_domain

COMMANDS_FILE = "commands.sh"
MIN_PROXIES = 4  # to fit a mixture law and leave one mixture out


def proxy_done(run_dir: Path, pc: Config) -> bool:
    """A finished proxy with this config (ℓ_init's source, extra evaluation points and keys that may change on
    resume aside)."""
    if not runfiles.run_is_complete(run_dir):
        return False
    try:
        saved = to_dict(runfiles.read_config(run_dir / runfiles.CONFIG_FILE))
        now = to_dict(pc)
        saved["mixing"]["init_loss"] = now["mixing"]["init_loss"]
        if set(now["eval"]["points"] or []) <= set(saved["eval"]["points"] or []):
            saved["eval"]["points"] = now["eval"]["points"]  # evaluated more often than needed: still usable
        check_resume_config(saved, now)
    except (ConfigError, DataError):
        return False
    return True


def emit_commands(s: PlanSetup) -> None:
    """Each proxy's config beside its run directory, and commands.sh with one `velocitune train` per line."""
    lines = ["#!/bin/sh", "# One proxy per line: run them in any order or as a job array "
             "(e.g. --array=1-N: sed -n \"$((SLURM_ARRAY_TASK_ID + 3))p\" commands.sh | sh),",
             f"# then: velocitune plan CONFIG --out {shlex.quote(str(s.out))} --collect"]
    for d, pc in zip(s.dirs, s.configs):
        d.parent.mkdir(parents=True, exist_ok=True)
        path = d.parent / f"{d.name}.yaml"
        atomic_write_text(path, dump_yaml(pc))
        lines.append(f"velocitune train {shlex.quote(str(path))}")
    atomic_write_text(s.out / COMMANDS_FILE, "\n".join(lines) + "\n")
    print(f"wrote {len(s.dirs)} proxy configs under {s.out / PROXIES_DIR} and {s.out / COMMANDS_FILE}")


def run_proxies(s: PlanSetup) -> None:
    """Run every proxy not already finished with its config, one after another. Every proxy starts from the
    same model on the same val sets, so ℓ_init is measured once (the first proxy's step 0) and reused."""
    from velocitune.train import train  # orchestration above the trainer (torch only when a proxy runs)

    init_file = s.out / runfiles.INIT_LOSS_FILE
    for j, (d, pc) in enumerate(zip(s.dirs, s.configs)):
        if proxy_done(d, pc):
            continue
        print(f"plan: proxy {j + 1}/{len(s.dirs)} ({pc.run.arm}) -> {d}")
        shutil.rmtree(d, ignore_errors=True)
        if init_file.exists():
            pc.mixing.init_loss = str(init_file)
        train(pc, resume=False)
        if not init_file.exists():
            runfiles.write_init_loss(init_file, s.cfg.model.path or "fresh", s.names, *init_from(d, s.names))


def unfinished(s: PlanSetup) -> list[Path]:
    """The proxies' run directories that hold no finished run with their config."""
    return [d for d, pc in zip(s.dirs, s.configs) if not proxy_done(d, pc)]


def init_from(run_dir: Path, names: list[str]) -> tuple[list[float], list[int]]:
    """ℓ_init and the tokens it was measured on, from a proxy's step-0 evaluation."""
    records = runfiles.read_log(run_dir / runfiles.EVAL_FILE, runfiles.EVAL, names)
    first = next((r for r in records if r["step"] == 0), None)
    if first is None:
        raise DataError(f"{run_dir}: no step-0 evaluation (ℓ_init) in {runfiles.EVAL_FILE}; re-run this proxy")
    return [first["losses"][n] for n in names], [first["tokens_evaluated"][n] for n in names]


@dataclass
class ProxyResults:
    """What the finished proxies gave, one row per finished proxy (n of them) over the k domains."""

    done: list[int]  # indices into the design of the finished proxies
    missing: list[Path]  # run directories of the proxies that have not finished
    init: dict[str, float]  # ℓ_init per domain
    R: np.ndarray  # (n, k) the shares each realised (tokens trained per domain / all)
    X: np.ndarray  # (n, k) each domain's loss extrapolated to the main budget (NaN where not fitted)
    P: np.ndarray  # (n, k) each domain's loss at the proxy's end
    warnings: list[str]
    wall: float  # seconds the finished proxies took together


def collect(s: PlanSetup, missing: list[Path]) -> ProxyResults:
    """Read every finished proxy (all but `missing`); DataError when fewer than MIN_PROXIES have finished."""
    done = [j for j, d in enumerate(s.dirs) if d not in missing]
    if missing:
        print(f"plan: {len(missing)} proxy run(s) missing or unfinished: " + ", ".join(str(d) for d in missing),
              file=sys.stderr)
    if len(done) < MIN_PROXIES:
        raise DataError(
            f"only {len(done)} of {len(s.dirs)} proxies have finished (need at least {MIN_PROXIES} to fit and check a "
            f"law); run the missing ones ({s.out / COMMANDS_FILE}) or `velocitune plan` without --collect"
        )
    init_file = s.out / runfiles.INIT_LOSS_FILE
    if not init_file.exists():
        runfiles.write_init_loss(init_file, s.cfg.model.path or "fresh", s.names, *init_from(s.dirs[done[0]], s.names))
    init = runfiles.read_init_loss(init_file, s.names)
    rows, warnings, wall = [], [], 0.0
    for j in done:
        shares, final, end, warns, seconds = proxy_result(s, j, init)
        rows.append((shares, final, end))
        warnings += warns
        wall += seconds
    R, X, P = (np.array([row[c] for row in rows]) for c in range(3))
    if missing:
        warnings.append(f"fitted on {len(done)} of {len(s.dirs)} proxies; missing: {[str(d) for d in missing]}")
    return ProxyResults(done=done, missing=missing, init=init, R=R, X=X, P=P, warnings=warnings, wall=wall)


def proxy_result(s: PlanSetup, j: int, init: dict[str, float]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str], float]:
    """(realised shares (k,), each domain's loss extrapolated to the main budget (k,; NaN unless its curve is
    needed), its loss at the proxy's end (k,), warnings, wall seconds) of the design's proxy j."""
    cfg, pc, run_dir, names = s.cfg, s.configs[j], s.dirs[j], s.names
    summary = runfiles.read_summary(run_dir / runfiles.SUMMARY_FILE)
    toks = np.array([summary["tokens_per_domain"][n] for n in names], dtype=np.float64)
    records = runfiles.read_log(run_dir / runfiles.EVAL_FILE, runfiles.EVAL, names)
    pts = [r for r in records if r["step"] in set(pc.eval.points)]
    final, warnings = np.full(len(names), np.nan), []
    if needs_curve(cfg, s.labels[j]):
        tokens_per_step = float(cfg.train.batch_size * cfg.data.seq_len)
        steps_at = np.array([r["step"] for r in pts], dtype=np.int64)
        S1p, S2p = laws.lr_areas(lr_schedule(pc, pc.train.steps), warmup_steps(pc, pc.train.steps))
        S1m, S2m = laws.lr_areas(lr_schedule(cfg, s.main_steps), warmup_steps(cfg, s.main_steps))
        for i, n in enumerate(names):
            losses = np.array([r["losses"][n] for r in pts], dtype=np.float64)
            entry, _ = fit_domain(n, steps_at * tokens_per_step, losses, init[n], s.budget_tokens,
                                  cfg.targets.predictor, (S1p[steps_at - 1], S2p[steps_at - 1]),
                                  (float(S1m[-1]), float(S2m[-1])), bootstrap=0)
            final[i] = entry["target"]
            warnings += [f"{run_dir.name}/{n}: {w}" for w in entry["warnings"]]
    end = np.array([pts[-1]["losses"][n] for n in names], dtype=np.float64)
    return toks / toks.sum(), final, end, warnings, float(summary["wall_time_s"])
