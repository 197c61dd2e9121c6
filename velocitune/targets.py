"""Stages A and B of DESIGN §3: the base model's initial loss, and target losses from a proxy run.

`init-loss` evaluates the base model on the fixed val sets. `targets` runs the same training loop on a
stratified subsample (fraction p) with static w0, the main run's batch size and peak LR and its LR schedule
compressed to the proxy's length, evaluates at n points over [0.1, 1] of the proxy, fits a law per domain
and extrapolates to the main run's budget. The maths lives in laws.py; this module only orchestrates.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np

from velocitune import dist, laws
import yaml

from velocitune.config import Config, to_dict
from velocitune.errors import FitError, VelocituneError
from velocitune.metrics import atomic_write_json, read_jsonl
from velocitune.shards import PreparedData

PREDICTORS = ("chinchilla", "cpt_law", "auto")
# compressed: the main run's LR schedule squeezed to the proxy's length (warm-up, peak, anneal);
# constant: warm-up then the peak LR throughout, no anneal (the paper's proxy, DESIGN §8).
PROXY_SCHEDULES = ("compressed", "constant")
# `velocitune targets` defaults (issue 9 §2 chose them: docs/study.md, benchmarks/target_study.py).
DEFAULT_FRACTION = 0.2
DEFAULT_POINTS = 20
DEFAULT_PREDICTOR = "cpt_law"
DEFAULT_SCHEDULE = "compressed"


def init_loss_main(cfg: Config, out: Optional[str] = None) -> int:
    """`velocitune init-loss`: write init_loss.json with the base model's per-domain val loss."""
    import torch

    from velocitune.evaluate import evaluate, load_val_set
    from velocitune.train import make_model

    env = dist.init(cfg.train.device, cfg.dist.backend)
    try:
        data = PreparedData(cfg.data.path)
        model = make_model(cfg, data).to(env.device)
        val = load_val_set(data, cfg.data.seq_len, cfg.eval.max_tokens)
        bf16 = env.device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else None
        t0 = time.perf_counter()
        losses = evaluate(model, val, env, cfg.eval.batch_size, cfg.train.loss_chunk_tokens, ctx)
        path = Path(out) if out else Path(cfg.run.out_dir) / "init_loss.json"
        if env.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(path, {
                "model": cfg.model.path or "fresh",
                "domains": {n: {"loss": float(l), "tokens": int(t)} for n, l, t in zip(val.names, losses, val.tokens)},
                "seconds": time.perf_counter() - t0,
            })
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


def proxy_config(cfg: Config, fraction: float, n_points: int, out_dir: Path, main_steps: int,
                 schedule: str = DEFAULT_SCHEDULE) -> Config:
    """The main run's config turned into its proxy: static w0 on a stratified fraction of every domain."""
    if schedule not in PROXY_SCHEDULES:
        raise VelocituneError(f"proxy schedule must be one of {PROXY_SCHEDULES}, got '{schedule}'")
    pc = copy.deepcopy(cfg)
    if schedule == "constant":
        pc.train.schedule = "constant"
    # At least one step per point, but never longer than the main run (tiny test runs).
    proxy_steps = min(main_steps, max(n_points, int(round(fraction * main_steps))))
    pc.data.subsample = fraction
    pc.train.steps = proxy_steps
    pc.train.tokens = None
    if cfg.train.warmup_steps >= 1:  # absolute warm-up: compress it with the schedule
        pc.train.warmup_steps = max(1.0, round(cfg.train.warmup_steps * proxy_steps / main_steps))
    pc.mixing.rule = "static"
    pc.mixing.weights = None
    pc.mixing.targets = None
    pc.mixing.target_values = None
    pc.eval.points = proxy_eval_steps(proxy_steps, n_points)
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
) -> dict:
    """Fit one domain's points and extrapolate to the main budget; record what was used and why."""
    entry: dict = {"init": float(init), "points": [[float(t), float(l)] for t, l in zip(tokens, losses)], "warnings": []}
    ok = np.isfinite(losses)
    if not ok.all():
        entry["warnings"].append(f"{int((~ok).sum())} NaN/inf loss point(s) dropped")
    tokens, losses = tokens[ok], losses[ok]
    S1, S2 = proxy_areas[0][ok], proxy_areas[1][ok]
    if len(losses) < 4:
        raise FitError(
            f"domain '{name}': only {len(losses)} usable proxy points (need >= 4); raise --points or the proxy "
            f"--fraction so that the proxy has more steps"
        )
    if losses[-1] >= losses[0]:
        entry["warnings"].append(
            f"the proxy loss does not decrease ({losses[0]:.4f} -> {losses[-1]:.4f}); the domain is predicted not to improve"
        )

    def chinchilla() -> dict:
        fit = laws.fit_data_law(tokens, losses)
        target = float(fit.predict(budget_tokens))
        lo, hi = fit.interval(budget_tokens)
        return {"predictor": "chinchilla", "target": target, "params": {"E": fit.E, "B": fit.B, "beta": fit.beta},
                "r2": fit.r2, "interval": [float(lo), float(hi)], "holdout_error": fit.holdout_error,
                "checks": laws.check_data_law(fit, float(losses[-1]), budget_tokens)}

    def cpt_law() -> dict:
        fit = laws.fit_cpt_law(S1, S2, losses, init)
        target = float(fit.predict(np.array([main_areas[0]]), np.array([main_areas[1]]))[0])
        lo, hi = fit.interval(np.array([main_areas[0]]), np.array([main_areas[1]]))
        return {"predictor": "cpt_law", "target": target, "params": fit.params, "r2": fit.r2,
                "interval": [float(np.ravel(lo)[0]), float(np.ravel(hi)[0])], "holdout_error": fit.holdout_error,
                "checks": laws.check_cpt_law(fit, losses, target)}

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
                          "params": {}, "r2": None, "interval": None, "holdout_error": None, "checks": []}
        else:
            entry["warnings"] += result["checks"]
    entry.update({k: v for k, v in result.items() if k != "checks"})
    entry["guarded"] = bool(entry["target"] >= init)
    if entry["guarded"]:
        entry["warnings"].append(
            f"target {entry['target']:.4f} >= initial loss {init:.4f}: predicted to get worse; training applies "
            f"the δ_min guard to this domain"
        )
    return entry


def targets_main(cfg: Config, args) -> int:
    """`velocitune targets`: proxy run, per-domain fits, targets.json and targets.png."""
    fraction = args.fraction if args.fraction is not None else DEFAULT_FRACTION
    n_points = args.points if args.points is not None else DEFAULT_POINTS
    predictor = args.predictor or DEFAULT_PREDICTOR
    if not 0 < fraction <= 1:
        raise VelocituneError(f"--fraction must be in (0, 1], got {fraction}")
    if n_points < 4:
        raise VelocituneError(f"--points must be >= 4 to fit a law, got {n_points}")
    out = Path(args.out) if args.out else Path(cfg.run.out_dir) / "targets.json"
    result = estimate_targets(cfg, fraction, n_points, predictor, out, args.proxy_schedule or DEFAULT_SCHEDULE)
    print(f"wrote {out}")
    for n, d in result["domains"].items():
        flag = "  [guarded]" if d["guarded"] else ""
        print(f"{n:>20s}  init {d['init']:.4f}  target {d['target']:.4f}  ({d['predictor']}){flag}")
        for w in d["warnings"]:
            print(f"{'':>22s}warning: {w}")
    return 0


def _proxy_reusable(proxy_dir: Path, pc: Config) -> bool:
    summary, saved = proxy_dir / "summary.json", proxy_dir / "config.yaml"
    if not (summary.is_file() and saved.is_file()):
        return False
    from velocitune.errors import ConfigError
    from velocitune.train import check_resume_config

    try:  # the same keys that may change on resume (threads, logging, ...) do not change the proxy either
        check_resume_config(yaml.safe_load(saved.read_text()), to_dict(pc))
    except ConfigError:
        return False
    return bool(json.loads(summary.read_text()).get("complete", False))


def estimate_targets(cfg: Config, fraction: float, n_points: int, predictor: str, out: Path,
                     schedule: str = DEFAULT_SCHEDULE) -> dict:
    """Run the proxy, fit each domain, write targets.json (+ targets.png beside it); return the document."""
    from velocitune.train import lr_schedule, resolve_steps, train, warmup_steps

    if predictor not in PREDICTORS:
        raise VelocituneError(f"predictor must be one of {PREDICTORS}, got '{predictor}'")
    data = PreparedData(cfg.data.path)
    names = data.domains
    windows = [data.train(n).n_windows(cfg.data.seq_len) for n in names]
    main_steps = resolve_steps(cfg, windows)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    budget = main_steps * tokens_per_step
    proxy_dir = out.parent / "proxy"
    pc = proxy_config(cfg, fraction, n_points, proxy_dir, main_steps, schedule)
    t0 = time.perf_counter()
    if _proxy_reusable(proxy_dir, pc):  # same proxy already run (e.g. refitting with another predictor)
        proxy_wall = float(json.loads((proxy_dir / "summary.json").read_text())["wall_time_s"])
    else:
        shutil.rmtree(proxy_dir, ignore_errors=True)
        train(pc, resume=False)
        proxy_wall = time.perf_counter() - t0
    records = read_jsonl(proxy_dir / "eval.jsonl")
    init_rec = next(r for r in records if r["step"] == 0)
    pts = [r for r in records if r["step"] in set(pc.eval.points)]
    steps_at = np.array([r["step"] for r in pts], dtype=np.int64)
    tokens = steps_at * float(tokens_per_step)

    # LR areas: the proxy's schedule at its eval steps, and the main schedule at its end.
    proxy_steps = pc.train.steps
    S1p, S2p = laws.lr_areas(lr_schedule(pc, proxy_steps), warmup_steps(pc, proxy_steps))
    S1m, S2m = laws.lr_areas(lr_schedule(cfg, main_steps), warmup_steps(cfg, main_steps))
    doc = {"version": 1, "predictor": predictor, "budget_tokens": float(budget), "proxy_fraction": fraction,
           "proxy_schedule": schedule, "proxy_points": int(n_points),
           "proxy_tokens": float(proxy_steps * tokens_per_step), "proxy_steps": int(proxy_steps),
           "main_steps": int(main_steps), "proxy_wall_time_s": proxy_wall,
           "proxy_cost_share": proxy_steps / main_steps, "domains": {}}
    for n in names:
        losses = np.array([r["losses"][n] for r in pts], dtype=np.float64)
        doc["domains"][n] = fit_domain(
            n, tokens, losses, float(init_rec["losses"][n]), budget, predictor,
            (S1p[steps_at - 1], S2p[steps_at - 1]), (float(S1m[-1]), float(S2m[-1])),
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, doc)
    atomic_write_json(out.parent / "init_loss.json", {
        "model": cfg.model.path or "fresh",
        "domains": {n: {"loss": float(init_rec["losses"][n]), "tokens": int(init_rec["tokens_evaluated"][n])} for n in names},
    })
    from velocitune.report import domain_colours, plot_targets

    plot_targets(doc, names, [], domain_colours(names), None, out.with_suffix(".png"))
    return doc
