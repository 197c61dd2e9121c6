"""The design of a plan (docs/design.md §4.4): which mixtures the proxies run, how long each runs, and each
proxy's config, from the config and the prepared data (`plan_setup`, read once per plan)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from velocitune.config import Config
from velocitune.errors import ConfigError
from velocitune.schedule import main_run_steps
from velocitune.shards import PreparedData
from velocitune.targets import proxy_config

PROXIES_DIR = "proxies"


def design_mixtures(names: list[str], w0: np.ndarray, tilt: float) -> list[tuple[str, np.ndarray]]:
    """(label, shares (k,)) of the proxies: w0, uniform, and w0 tilted toward each domain by `tilt`.

    k + 2 mixtures: the mixing law has k + 1 parameters, so one more leaves one out; uniform adds a point
    far from w0 in every direction. A design mixture equal to an earlier one (uniform w0) is dropped.
    """
    k = len(names)
    w0 = np.asarray(w0, dtype=np.float64)
    rows = [("w0", w0), ("uniform", np.full(k, 1.0 / k))]
    for i, n in enumerate(names):
        rows.append((f"tilt-{n}", (1 - tilt) * w0 + tilt * np.eye(k)[i]))
    out: list[tuple[str, np.ndarray]] = []
    for label, r in rows:
        if not any(np.allclose(r, q, atol=1e-9) for _, q in out):
            out.append((label, r / r.sum()))
    return out


def proxy_steps(main_steps: int, n_mixtures: int, budget: float, points: int) -> int:
    """Steps of each proxy: the budget shared out, at least one step per evaluation point."""
    return min(main_steps, max(points, int(round(budget * main_steps / n_mixtures))))


def budget_warning(main_steps: int, n_mixtures: int, budget: float, points: int) -> str | None:
    """What to set when a short main run makes the proxies together longer than plan.budget of it (each needs
    one step per evaluation point); None when they fit."""
    steps = proxy_steps(main_steps, n_mixtures, budget, points)
    share = n_mixtures * steps / main_steps
    if share <= budget + 1e-9 or steps <= max(1, int(round(budget * main_steps / n_mixtures))):
        return None
    return (f"the plan's {n_mixtures} proxies run {steps} steps each, {share:.0%} of the main run's {main_steps} "
            f"steps (plan.budget={budget:g} asks for {budget:.0%}): each needs one step per evaluation point "
            f"(plan.points={points}); lower plan.points (at least 4) or lengthen the main run (train.steps)")


def needs_curve(cfg: Config, label: str) -> bool:
    """Whether the proxy `label` needs its whole loss curve (a law fit) or only its end loss: `extrapolate`
    fits every proxy; `offset` fits only w0's, and only when no targets file gives w0's main-budget loss."""
    if cfg.plan.stage1 == "extrapolate":
        return True
    has_base = bool(cfg.mixing.targets) and Path(cfg.mixing.targets).is_file()
    return label == "w0" and not has_base


def plan_proxy_config(cfg: Config, out_dir: Path, main_steps: int, steps: int, shares: np.ndarray,
                      names: list[str], label: str) -> Config:
    """The proxy of one mixture: the `targets` proxy recipe at `steps` steps, static at `shares`; evaluated at
    plan.points points when its curve is fitted, else only at its end (evaluation dominates a short proxy)."""
    base = copy.deepcopy(cfg)
    base.targets.fraction = steps / main_steps
    base.targets.points = cfg.plan.points
    pc = proxy_config(base, out_dir, main_steps)
    pc.train.steps = steps  # proxy_config rounds fraction × steps; keep exactly the planned length
    pc.mixing.weights = {n: float(s) for n, s in zip(names, shares)}
    pc.mixing.plan = None
    pc.run.arm = f"plan-{label}"
    if not needs_curve(cfg, label):
        pc.eval.points = [steps]
    return pc


def mixture_dirs(out: Path, design: list[tuple[str, np.ndarray]]) -> list[Path]:
    """The run directory of each design mixture's proxy: out/proxies/m{j}-{label}."""
    return [out / PROXIES_DIR / f"m{j}-{label}" for j, (label, _) in enumerate(design)]


def domain_map(names: list[str], given: dict[str, float] | None, key: str, default: float | None) -> dict[str, float]:
    """A per-domain config map checked against the data's domains; with a default, every domain gets a value
    (the default when the map is not given, 0 for a domain a given map leaves out)."""
    unknown = sorted(set(given or {}) - set(names))
    if unknown:
        raise ConfigError(f"{key} names unknown domain(s) {unknown}; the prepared data has {names}")
    if default is None:
        return dict(given or {})
    return {n: float((given or {}).get(n, default if given is None else 0.0)) for n in names}


def _run_max_rise(cfg: Config, names: list[str]) -> dict[str, float] | None:
    """mixing.max_rise for every domain, when it is a finite number (inf or unset: no constraint)."""
    tol = cfg.mixing.max_rise
    return None if tol is None or not np.isfinite(tol) else {n: float(tol) for n in names}


@dataclass
class PlanSetup:
    """One plan, fixed before any proxy runs: the data's domains, the objective, the main run's budget, the
    design mixtures and each proxy's run directory and config."""

    cfg: Config
    out: Path
    names: list[str]
    windows: list[int]  # training windows per domain, as prepared (before data.subsample)
    w0: np.ndarray  # (k,) the corpus mixture
    objective: dict[str, float]
    max_rise: dict[str, float]
    main_steps: int
    design: list[tuple[str, np.ndarray]]  # (label, nominal shares (k,))
    steps: int  # of each proxy
    dirs: list[Path]
    configs: list[Config]

    @property
    def budget_tokens(self) -> float:
        return float(self.main_steps * self.cfg.train.batch_size * self.cfg.data.seq_len)

    @property
    def labels(self) -> list[str]:
        return [label for label, _ in self.design]


def plan_setup(cfg: Config, out: Path) -> PlanSetup:
    """Read the prepared data once and lay the plan out: domains, objective, the main run's steps (as
    `velocitune train` will run them), the design and the proxies' configs."""
    data = PreparedData(cfg.data.path)
    names = data.domains
    if len(names) < 2:
        raise ConfigError(f"a plan needs at least two domains; the prepared data at {cfg.data.path} has {names}")
    # plan.objective / plan.max_rise mean what mixing.objective / mixing.max_rise mean (docs/design.md §3); unset,
    # the plan takes the run's, so one config states the objective once and the default sacrifices no domain.
    objective = domain_map(names, cfg.plan.objective if cfg.plan.objective is not None else cfg.mixing.objective,
                           "plan.objective", 1.0)
    max_rise = domain_map(names, cfg.plan.max_rise if cfg.plan.max_rise is not None else _run_max_rise(cfg, names),
                          "plan.max_rise", None)
    windows = [data.train(n).n_windows(cfg.data.seq_len) for n in names]
    main_steps = main_run_steps(cfg, windows)
    w0 = np.asarray(data.w0, dtype=np.float64)
    design = design_mixtures(names, w0, cfg.plan.tilt)
    steps = proxy_steps(main_steps, len(design), cfg.plan.budget, cfg.plan.points)
    dirs = mixture_dirs(out, design)
    configs = [plan_proxy_config(cfg, d, main_steps, steps, r, names, label) for d, (label, r) in zip(dirs, design)]
    return PlanSetup(cfg=cfg, out=out, names=names, windows=windows, w0=w0, objective=objective, max_rise=max_rise,
                     main_steps=main_steps, design=design, steps=steps, dirs=dirs, configs=configs)
