"""Stages A and B of docs/design.md §3: the base model's initial loss, and target losses from a proxy run.

`init-loss` evaluates the base model on the fixed val sets. `targets` runs the same training loop on a
stratified subsample (fraction p) with static w0, the main run's batch size and peak LR and its LR schedule
compressed to the proxy's length, evaluates at n points over [0.1, 1] of the proxy, fits a law per domain
and extrapolates to the main run's budget. The maths lives in `velocitune.laws`; the recipe in the config's
`targets` section; this module only orchestrates.
"""

from __future__ import annotations

import copy
import shutil
import time
from pathlib import Path

import numpy as np

from velocitune import dist, laws, runfiles
from velocitune.config import Config, check_resume_config, to_dict
from velocitune.errors import ConfigError, DataError, FitError
from velocitune.fileio import output_file
from velocitune.schedule import lr_schedule, resolve_steps, warmup_steps
from velocitune.shards import PreparedData

# Points on each domain's drawn curves (targets.json "fit_curve" and "prediction_curve").
CURVE_POINTS = 64


def targets_path(cfg: Config) -> Path:
    """Where `velocitune targets` writes targets.json: mixing.targets (where `train` reads it), else the run dir."""
    return Path(cfg.mixing.targets) if cfg.mixing.targets else Path(cfg.run.out_dir) / runfiles.TARGETS_FILE


def init_loss_path(cfg: Config, beside: Path | None = None) -> Path:
    """Where ℓ_init goes: mixing.init_loss (where `train` reads it), else beside `beside` or in the run dir."""
    if cfg.mixing.init_loss:
        return Path(cfg.mixing.init_loss)
    return (beside.parent if beside is not None else Path(cfg.run.out_dir)) / runfiles.INIT_LOSS_FILE


def init_loss_main(cfg: Config, out: str | None = None) -> int:
    """`velocitune init-loss`: write init_loss.json with the base model's per-domain val loss."""
    import torch

    from velocitune.evaluate import evaluate, load_val_set
    from velocitune.model import make_model

    path = output_file(Path(out) if out else init_loss_path(cfg), "the initial-loss file (--out)")
    env = dist.init(cfg.train.device, cfg.dist.backend)
    try:
        data = PreparedData(cfg.data.path)
        model = make_model(cfg, data).to(env.device)
        val = load_val_set(data, cfg.data.seq_len, cfg.eval.max_tokens)
        bf16 = env.device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else None
        t0 = time.perf_counter()
        losses = evaluate(model, val, env, cfg.eval.batch_size, cfg.train.loss_chunk_tokens, ctx)
        if env.is_main:
            runfiles.write_init_loss(path, cfg.model.path or "fresh", val.names, losses, val.tokens,
                                     seconds=time.perf_counter() - t0)
            for n, l in zip(val.names, losses):
                print(f"{n:>20s}  {l:.4f} nats")
            print(f"wrote {path}")
    finally:
        dist.shutdown(env)
    return 0


def proxy_eval_steps(proxy_steps: int, n_points: int) -> list[int]:
    """n evaluation steps spaced evenly over [0.1, 1] of the proxy run (skipping most of warm-up)."""
    pts = np.unique(np.round(np.linspace(0.1 * proxy_steps, proxy_steps, n_points)).astype(int))
    return [int(p) for p in pts if p >= 1]


def proxy_config(cfg: Config, out_dir: Path, main_steps: int) -> Config:
    """The main run's config turned into its proxy: static w0 on a stratified fraction of every domain.

    The recipe comes from cfg.targets: `fraction` of the data, `points` evaluations, and the LR schedule
    either compressed from the main run's (warm-up, peak, anneal) or constant at the peak (the paper's).
    """
    tc = cfg.targets
    pc = copy.deepcopy(cfg)
    if tc.proxy_schedule == "constant":
        pc.train.schedule = "constant"
    # At least one step per point, but never longer than the main run (tiny test runs).
    proxy_steps = min(main_steps, max(tc.points, int(round(tc.fraction * main_steps))))
    pc.data.subsample = tc.fraction
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


def fit_domain(
    name: str,
    tokens: np.ndarray,
    losses: np.ndarray,
    init: float,
    budget_tokens: float,
    predictor: str,
    proxy_areas: tuple[np.ndarray, np.ndarray],
    main_areas: tuple[float, float],
    bootstrap: int = 200,
) -> tuple[dict, object]:
    """Fit one domain's points and extrapolate to the main budget; (the targets.json entry, the fitted law).

    The entry records what was used and why (warnings); the fit (a DataLawFit, a CptLawFit, or None for the
    log-linear fallback) lets the caller draw the curve of the law that made the prediction. `bootstrap`:
    resamples for the entry's prediction interval (0: no interval, a fraction of the time; `plan` uses that).
    """
    entry: dict = {"init": float(init), "points": [[float(t), float(l)] for t, l in zip(tokens, losses)], "warnings": []}
    ok = np.isfinite(losses)
    if not ok.all():
        entry["warnings"].append(f"{int((~ok).sum())} NaN/inf loss point(s) dropped")
    tokens, losses = tokens[ok], losses[ok]
    S1, S2 = proxy_areas[0][ok], proxy_areas[1][ok]
    if len(losses) < 4:
        raise FitError(
            f"domain '{name}': only {len(losses)} usable proxy points (need >= 4); raise targets.points or the "
            f"proxy's targets.fraction so that the proxy has more steps"
        )
    if losses[-1] >= losses[0]:
        entry["warnings"].append(
            f"the proxy loss does not decrease ({losses[0]:.4f} -> {losses[-1]:.4f}); the domain is predicted not to improve"
        )

    def chinchilla() -> dict:
        fit = laws.fit_data_law(tokens, losses, bootstrap=bootstrap)
        target = float(fit.predict(budget_tokens))
        interval = [float(x) for x in fit.interval(budget_tokens)] if bootstrap else None
        return {"predictor": "chinchilla", "target": target, "params": {"E": fit.E, "B": fit.B, "beta": fit.beta},
                "r2": fit.r2, "interval": interval, "holdout_error": fit.holdout_error,
                "checks": laws.check_data_law(fit, float(losses[-1]), budget_tokens), "fit": fit}

    def cpt_law() -> dict:
        fit = laws.fit_cpt_law(S1, S2, losses, init, bootstrap=bootstrap)
        at = (np.array([main_areas[0]]), np.array([main_areas[1]]))
        target = float(fit.predict(*at)[0])
        interval = [float(np.ravel(x)[0]) for x in fit.interval(*at)] if bootstrap else None
        return {"predictor": "cpt_law", "target": target, "params": fit.params, "r2": fit.r2,
                "interval": interval, "holdout_error": fit.holdout_error,
                "checks": laws.check_cpt_law(fit, losses, target), "fit": fit}

    if predictor == "cpt_law":
        result = cpt_law()
        entry["warnings"] += [f"cpt_law: {c}" for c in result["checks"]]
    else:
        result = chinchilla()
        if predictor == "auto" and result["checks"]:
            entry["warnings"] += [f"chinchilla: {c}" for c in result["checks"]]
            try:
                result = cpt_law()
                entry["warnings"] += [f"cpt_law: {c}" for c in result["checks"]]
            except FitError as e:
                entry["warnings"].append(f"cpt_law failed ({e}); log-linear extrapolation of the last half")
                result = {"predictor": "loglinear", "target": float(laws.loglinear_extrapolate(tokens, losses, budget_tokens)),
                          "params": {}, "r2": None, "interval": None, "holdout_error": None, "checks": [], "fit": None}
        else:
            entry["warnings"] += result["checks"]
    entry.update({k: v for k, v in result.items() if k not in ("checks", "fit")})
    entry["guarded"] = bool(entry["target"] >= init)
    if entry["guarded"]:
        entry["warnings"].append(
            f"target {entry['target']:.4f} >= initial loss {init:.4f}: predicted to get worse; training applies "
            f"the δ_min guard to this domain"
        )
    return entry, result["fit"]


def law_curves(fit, proxy: tuple[np.ndarray, np.ndarray, np.ndarray], main: tuple[np.ndarray, np.ndarray, np.ndarray],
               first_point: float) -> dict[str, list[list[float]]]:
    """Each fit drawn with its own law: the fitted curve over the proxy, the prediction over the main run.

    proxy, main: (tokens, S1, S2) at every step of that run, (steps,) each. A CPT-law fit depends on the LR
    schedule, so its fitted curve follows the proxy's areas and its prediction the main run's; a data-law fit
    is one curve in tokens. Both start at the first proxy point, where the fit starts. Empty for the
    log-linear fallback (it has no curve to draw).
    """
    if fit is None:
        return {}

    def sample(tokens, S1, S2):
        keep = tokens >= first_point
        idx = np.unique(np.linspace(0, keep.sum() - 1, CURVE_POINTS).round().astype(int))
        t, s1, s2 = tokens[keep][idx], S1[keep][idx], S2[keep][idx]
        y = fit.predict(s1, s2) if isinstance(fit, laws.CptLawFit) else fit.predict(t)
        return [[float(a), float(b)] for a, b in zip(t, np.atleast_1d(y))]

    return {"fit_curve": sample(*proxy), "prediction_curve": sample(*main)}


def targets_main(cfg: Config, out: str | None = None) -> int:
    """`velocitune targets`: proxy run, per-domain fits, targets.json and targets.png."""
    path = output_file(Path(out) if out else targets_path(cfg), "the targets file (--out)")
    result = estimate_targets(cfg, path)
    print(f"wrote {path} (and {path.with_suffix('.png').name}, {init_loss_path(cfg, path)})")
    for n, d in result["domains"].items():
        flag = "  [guarded]" if d["guarded"] else ""
        print(f"{n:>20s}  init {d['init']:.4f}  target {d['target']:.4f}  ({d['predictor']}){flag}")
        for w in d["warnings"]:
            print(f"{'':>22s}warning: {w}")
    return 0


def _proxy_reusable(proxy_dir: Path, pc: Config) -> bool:
    """A finished proxy with the same config (up to keys that do not change it) can be fitted again."""
    if not runfiles.run_is_complete(proxy_dir):
        return False
    try:  # the same keys that may change on resume (threads, logging, ...) do not change the proxy either
        check_resume_config(to_dict(runfiles.read_config(proxy_dir / runfiles.CONFIG_FILE)), to_dict(pc))
    except (ConfigError, DataError):
        return False
    return True


def estimate_targets(cfg: Config, out: Path | None = None) -> dict:
    """Run the proxy, fit each domain, write targets.json (+ targets.png beside it); return the document.

    `out` defaults to `targets_path(cfg)`; the proxy's run directory is `proxy/` beside it and ℓ_init (the
    proxy's step-0 evaluation) goes to `init_loss_path(cfg, out)`.
    """
    from velocitune.train import train

    out = output_file(Path(out) if out is not None else targets_path(cfg), "the targets file")
    tc = cfg.targets
    data = PreparedData(cfg.data.path)
    names = data.domains
    windows = [data.train(n).n_windows(cfg.data.seq_len) for n in names]
    main_steps = resolve_steps(cfg, windows)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    budget = main_steps * tokens_per_step
    proxy_dir = out.parent / "proxy"
    pc = proxy_config(cfg, proxy_dir, main_steps)
    t0 = time.perf_counter()
    if _proxy_reusable(proxy_dir, pc):  # same proxy already run (e.g. refitting with another predictor)
        proxy_wall = float(runfiles.read_summary(proxy_dir / runfiles.SUMMARY_FILE)["wall_time_s"])
    else:
        shutil.rmtree(proxy_dir, ignore_errors=True)
        train(pc, resume=False)
        proxy_wall = time.perf_counter() - t0
    records = runfiles.read_log(proxy_dir / runfiles.EVAL_FILE, runfiles.EVAL, names)
    init_rec = next(r for r in records if r["step"] == 0)
    pts = [r for r in records if r["step"] in set(pc.eval.points)]
    steps_at = np.array([r["step"] for r in pts], dtype=np.int64)
    tokens = steps_at * float(tokens_per_step)

    # LR areas: the proxy's schedule at its eval steps, and the main schedule at its end.
    proxy_steps = pc.train.steps
    S1p, S2p = laws.lr_areas(lr_schedule(pc, proxy_steps), warmup_steps(pc, proxy_steps))
    S1m, S2m = laws.lr_areas(lr_schedule(cfg, main_steps), warmup_steps(cfg, main_steps))
    proxy_run = (np.arange(1, proxy_steps + 1) * float(tokens_per_step), S1p, S2p)
    main_run = (np.arange(1, main_steps + 1) * float(tokens_per_step), S1m, S2m)
    doc = {"predictor": tc.predictor, "budget_tokens": float(budget), "proxy_fraction": tc.fraction,
           "proxy_schedule": tc.proxy_schedule, "proxy_points": int(tc.points),
           "proxy_tokens": float(proxy_steps * tokens_per_step), "proxy_steps": int(proxy_steps),
           "main_steps": int(main_steps), "proxy_wall_time_s": proxy_wall,
           "proxy_cost_share": proxy_steps / main_steps, "domains": {}}
    for n in names:
        losses = np.array([r["losses"][n] for r in pts], dtype=np.float64)
        entry, fit = fit_domain(
            n, tokens, losses, float(init_rec["losses"][n]), budget, tc.predictor,
            (S1p[steps_at - 1], S2p[steps_at - 1]), (float(S1m[-1]), float(S2m[-1])),
        )
        doc["domains"][n] = {**entry, **law_curves(fit, proxy_run, main_run, float(tokens[0]))}
    runfiles.write_targets(out, doc)
    runfiles.write_init_loss(init_loss_path(cfg, out), cfg.model.path or "fresh", names,
                             [init_rec["losses"][n] for n in names], [init_rec["tokens_evaluated"][n] for n in names])
    from velocitune.report import domain_colours, plot_targets

    plot_targets(runfiles.read_targets(out), names, [], domain_colours(names), None, out.with_suffix(".png"))
    return doc

