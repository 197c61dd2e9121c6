"""`velocitune plan`: predict any mixture's per-domain loss from a few short runs (docs/design.md §3 Stage P, §4.4).

1. Design: the corpus mixture w0, uniform, and a tilt toward each domain, (1 - t)·w0 + t·e_i (k + 2 runs).
2. Proxies: each mixture is an ordinary `velocitune train` run (the `targets` proxy recipe: a stratified
   subsample, the main schedule compressed) whose length makes all of them together `plan.budget` of the
   main run's steps. They run here one after another, or `--emit` writes their configs and commands for a
   cluster and `--collect` fits from the finished run directories.
3. Stage 1: every domain's loss at the main budget under every mixture m actually trained (the shares
   realised, which differ from the nominal where a domain ran out of data), L_i(r_m): by default
   (`plan.stage1: offset`) the loss at w0 at the main budget (the `targets` prediction) plus how far the
   proxy's end loss sits from the w0 proxy's; or (`extrapolate`) each proxy's own curve fitted with the
   targets predictor and extrapolated, which short proxies do badly (docs/study.md §7).
4. Stage 2: per domain, a mixture law over those points: Ye et al.'s mixing law (transfer between domains)
   or the share law (the D-CPT share term), chosen by leave-one-mixture-out error.
5. Recommendation: the mixture minimising the weighted mean of the predicted losses, inside the box of
   shares the proxies covered (no extrapolation beyond what was run), within each domain's repetition
   allowance and each `--max-rise` tolerance over the domain's predicted loss under w0.

plan.json holds all of it; `mixing.plan` in `velocitune train` reads the recommended mixture as the initial
weights and the predicted losses under it as the velocity targets.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import shutil
import sys
from pathlib import Path

import numpy as np

from velocitune import laws, runfiles
from velocitune.config import Config, check_resume_config, dump_yaml, load_config, to_dict
from velocitune.errors import ConfigError, DataError, FitError
from velocitune.fileio import atomic_write_text, output_file
from velocitune.schedule import lr_schedule, resolve_steps, warmup_steps
from velocitune.shards import PreparedData
from velocitune.targets import fit_domain, proxy_config

PROXIES_DIR = "proxies"
COMMANDS_FILE = "commands.sh"
LAWS = ("mixing", "share")


# --------------------------------------------------------------------------------------------- design


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


# ------------------------------------------------------------------------------------------ recommend


def fit_laws(R: np.ndarray, Y: np.ndarray, names: list[str], law: str) -> tuple[dict, list]:
    """Per-domain mixture laws over mixtures R (n, k) with losses at the main budget Y (n, k) (stage 1).

    Returns ({domain: {"law", "candidates"}}, [predict(r (m, k)) -> (m,) per domain]). With law "auto"
    each domain takes the candidate with the lower max |leave-one-out error|; a candidate that cannot be
    fitted (too few mixtures) is recorded with its reason.
    """
    fits, predictors = {}, []
    for i, n in enumerate(names):
        cands, preds = {}, {}
        try:
            f = laws.fit_mixing_law(R, Y[:, i])
            cands["mixing"] = {"params": {"c": f.c, "u": dict(zip(names, map(float, f.u)))}, "r2": _num(f.r2),
                               "rmse": f.rmse, "loo_errors": _nums(f.loo_errors), "max_loo_error": f.max_loo_error}
            preds["mixing"] = f.predict
        except FitError as e:
            cands["mixing"] = {"error": str(e)}
        try:
            g = laws.fit_share_law(R[:, i], Y[:, i])
            cands["share"] = {"params": {"E": g.E, "C": g.C, "gamma": g.gamma, "eps": laws.mixture_law.SHARE_EPS},
                              "r2": _num(g.r2), "rmse": g.rmse, "loo_errors": _nums(g.loo_errors),
                              "max_loo_error": g.max_loo_error}
            preds["share"] = lambda r, g=g, i=i: np.atleast_1d(g.predict(np.atleast_2d(r)[:, i]))
        except FitError as e:
            cands["share"] = {"error": str(e)}
        usable = [c for c in LAWS if c in preds]
        if law != "auto":
            if law not in preds:
                raise FitError(f"domain '{n}': the {law} law could not be fitted: {cands[law]['error']}")
            chosen = law
        elif not usable:
            raise FitError(f"domain '{n}': no mixture law could be fitted ({cands['mixing']['error']}); run more mixtures")
        else:  # the lowest max |LOO error|; a law without LOO errors only if no other has them
            chosen = min(usable, key=lambda c: cands[c]["max_loo_error"] if cands[c]["max_loo_error"] is not None
                         and np.isfinite(cands[c]["max_loo_error"]) else np.inf)
        fits[n] = {"law": chosen, "candidates": cands}
        predictors.append(lambda r, p=preds[chosen]: np.atleast_1d(np.asarray(p(np.atleast_2d(r)), dtype=np.float64)))
    return fits, predictors


def recommend(predictors: list, objective: np.ndarray, lo: np.ndarray, hi: np.ndarray, w0: np.ndarray,
              max_rise: dict[int, float], starts: list[np.ndarray]) -> np.ndarray:
    """The mixture r (k,) minimising Σ a_i L_i(r) / Σ a_i subject to Σ r = 1, lo <= r <= hi and
    L_j(r) <= L_j(w0) + tol_j for each j in max_rise. SLSQP from every start; w0 (feasible by construction
    when it lies in the box) is the fallback."""
    from scipy.optimize import minimize

    a = objective / objective.sum()

    def on_simplex(r):  # SLSQP steps off the simplex between iterations; the laws are defined on it
        r = np.clip(r, 0.0, None)
        return r / r.sum() if r.sum() > 0 else np.full(r.size, 1.0 / r.size)

    def losses(r):
        return np.array([p(on_simplex(r))[0] for p in predictors])

    base = losses(w0)
    cons = [{"type": "eq", "fun": lambda r: np.sum(r) - 1.0}]
    for j, tol in max_rise.items():
        cons.append({"type": "ineq", "fun": lambda r, j=j, tol=tol: base[j] + tol - predictors[j](on_simplex(r))[0]})

    def feasible(r):
        return (abs(r.sum() - 1) < 1e-6 and np.all(r >= lo - 1e-7) and np.all(r <= hi + 1e-7)
                and all(predictors[j](r)[0] <= base[j] + tol + 1e-6 for j, tol in max_rise.items()))

    best, best_f = w0.copy(), float(a @ base)
    for s in starts:
        x0 = np.clip(s, lo, hi)
        res = minimize(lambda r: float(a @ losses(r)), x0, method="SLSQP", bounds=list(zip(lo, hi)),
                       constraints=cons, options={"maxiter": 300, "ftol": 1e-10})
        r = np.clip(res.x, lo, hi)
        r = r / r.sum()
        if feasible(r) and float(a @ losses(r)) < best_f - 1e-9:
            best, best_f = r, float(a @ losses(r))
    return best


def plan_predict(doc: dict, domain: str, shares) -> np.ndarray:
    """A plan's prediction of `domain`'s loss at mixtures `shares` (m, k) from the law it chose: (m,)."""
    names = doc["domains"]
    fit = doc["fits"][domain]
    p = fit["candidates"][fit["law"]]["params"]
    r = np.atleast_2d(np.asarray(shares, dtype=np.float64))
    if fit["law"] == "mixing":
        return p["c"] + np.exp(r @ np.array([p["u"][n] for n in names]))
    return p["E"] + p["C"] * (r[:, names.index(domain)] + p["eps"]) ** (-p["gamma"])


def allowance_caps(cfg: Config, data: PreparedData, names: list[str], budget_tokens: float) -> np.ndarray:
    """Largest share of the main budget each domain can feed within data.max_repetition epochs, (k,)."""
    L = cfg.data.seq_len
    avail = np.array([data.train(n).n_windows(L) * L * cfg.data.max_repetition for n in names], dtype=np.float64)
    return np.minimum(1.0, avail / budget_tokens)


# --------------------------------------------------------------------------------------------- running


def _mixture_dirs(out: Path, design: list[tuple[str, np.ndarray]]) -> list[Path]:
    return [out / PROXIES_DIR / f"m{j}-{label}" for j, (label, _) in enumerate(design)]


def _proxy_done(run_dir: Path, pc: Config) -> bool:
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


def _extrapolate(cfg: Config, pc: Config, run_dir: Path, names: list[str], main_steps: int,
                 init: dict[str, float], fit: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(realised shares (k,), each domain's loss extrapolated to the main budget (k,; NaN unless `fit`), its
    loss at the proxy's end (k,), warnings) of one proxy."""
    summary = runfiles.read_summary(run_dir / runfiles.SUMMARY_FILE)
    toks = np.array([summary["tokens_per_domain"][n] for n in names], dtype=np.float64)
    shares = toks / toks.sum()
    records = runfiles.read_log(run_dir / runfiles.EVAL_FILE, runfiles.EVAL, names)
    pts = [r for r in records if r["step"] in set(pc.eval.points)]
    tokens_per_step = float(cfg.train.batch_size * cfg.data.seq_len)
    steps_at = np.array([r["step"] for r in pts], dtype=np.int64)
    S1p, S2p = laws.lr_areas(lr_schedule(pc, pc.train.steps), warmup_steps(pc, pc.train.steps))
    S1m, S2m = laws.lr_areas(lr_schedule(cfg, main_steps), warmup_steps(cfg, main_steps))
    final, warnings = np.full(len(names), np.nan), []
    for i, n in enumerate(names if fit else []):
        losses = np.array([r["losses"][n] for r in pts], dtype=np.float64)
        entry, _ = fit_domain(n, steps_at * tokens_per_step, losses, init[n], main_steps * tokens_per_step,
                              cfg.targets.predictor, (S1p[steps_at - 1], S2p[steps_at - 1]),
                              (float(S1m[-1]), float(S2m[-1])), bootstrap=0)
        final[i] = entry["target"]
        warnings += [f"{run_dir.name}/{n}: {w}" for w in entry["warnings"]]
    end = np.array([pts[-1]["losses"][n] for n in names], dtype=np.float64)
    return shares, final, end, warnings


def _domain_map(names: list[str], given: dict[str, float] | None, key: str, default: float | None) -> dict[str, float]:
    unknown = sorted(set(given or {}) - set(names))
    if unknown:
        raise ConfigError(f"{key} names unknown domain(s) {unknown}; the prepared data has {names}")
    if default is None:
        return dict(given or {})
    return {n: float((given or {}).get(n, default if given is None else 0.0)) for n in names}


def make_plan(cfg: Config, out: Path, mode: str = "run") -> dict | None:
    """Run (mode "run"), emit (mode "emit": configs + commands, no fit) or collect the proxies, then fit and
    write out/plan.json and out/plan.png. Returns the plan document (None when emitting)."""
    from velocitune.train import train

    data = PreparedData(cfg.data.path)
    names = data.domains
    if len(names) < 2:
        raise ConfigError(f"a plan needs at least two domains; the prepared data at {cfg.data.path} has {names}")
    objective = _domain_map(names, cfg.plan.objective, "plan.objective", 1.0)
    max_rise = _domain_map(names, cfg.plan.max_rise, "plan.max_rise", None)
    windows = [data.train(n).n_windows(cfg.data.seq_len) for n in names]
    main_steps = resolve_steps(cfg, windows)
    budget_tokens = float(main_steps * cfg.train.batch_size * cfg.data.seq_len)
    w0 = np.asarray(data.w0, dtype=np.float64)
    design = design_mixtures(names, w0, cfg.plan.tilt)
    steps = proxy_steps(main_steps, len(design), cfg.plan.budget, cfg.plan.points)
    dirs = _mixture_dirs(out, design)
    configs = [plan_proxy_config(cfg, d, main_steps, steps, r, names, label) for d, (label, r) in zip(dirs, design)]
    share = len(design) * steps / main_steps
    print(f"plan: {len(design)} proxy runs x {steps} steps = {share:.0%} of the main run's {main_steps} steps "
          f"(+ {sum(len(c.eval.points) for c in configs)} evaluations), each on {steps / main_steps:.1%} of every domain")

    if mode == "emit":
        lines = ["#!/bin/sh", "# One proxy per line: run them in any order or as a job array "
                 "(e.g. --array=1-N: sed -n \"$((SLURM_ARRAY_TASK_ID + 3))p\" commands.sh | sh),",
                 f"# then: velocitune plan CONFIG --out {shlex.quote(str(out))} --collect"]
        for d, pc in zip(dirs, configs):
            d.parent.mkdir(parents=True, exist_ok=True)
            path = d.parent / f"{d.name}.yaml"
            atomic_write_text(path, dump_yaml(pc))
            lines.append(f"velocitune train {shlex.quote(str(path))}")
        atomic_write_text(out / COMMANDS_FILE, "\n".join(lines) + "\n")
        print(f"wrote {len(dirs)} proxy configs under {out / PROXIES_DIR} and {out / COMMANDS_FILE}")
        return None

    init_file = out / runfiles.INIT_LOSS_FILE
    missing = []
    for j, (d, pc) in enumerate(zip(dirs, configs)):
        if _proxy_done(d, pc):
            continue
        if mode == "collect":
            missing.append(d)
            continue
        print(f"plan: proxy {j + 1}/{len(dirs)} ({pc.run.arm}) -> {d}")
        shutil.rmtree(d, ignore_errors=True)
        if init_file.exists():  # every proxy starts from the same model on the same val sets: measure ℓ_init once
            pc.mixing.init_loss = str(init_file)
        train(pc, resume=False)
        if not init_file.exists():
            runfiles.write_init_loss(init_file, cfg.model.path or "fresh", names,
                                     *_init_from(d, names))
    done = [j for j, d in enumerate(dirs) if d not in missing]
    if missing:
        print(f"plan: {len(missing)} proxy run(s) missing or unfinished: " + ", ".join(str(d) for d in missing),
              file=sys.stderr)
    if len(done) < 4:
        raise DataError(
            f"only {len(done)} of {len(dirs)} proxies have finished (need at least 4 to fit and check a law); run "
            f"the missing ones ({out / COMMANDS_FILE}) or `velocitune plan` without --collect"
        )
    if not init_file.exists():
        runfiles.write_init_loss(init_file, cfg.model.path or "fresh", names, *_init_from(dirs[done[0]], names))
    init = runfiles.read_init_loss(init_file, names)

    R, X, P, warnings, wall = [], [], [], [], 0.0
    for j in done:
        fit = needs_curve(cfg, design[j][0])
        shares, final, end, warns = _extrapolate(cfg, configs[j], dirs[j], names, main_steps, init, fit)
        R.append(shares)
        X.append(final)
        P.append(end)
        warnings += warns
        wall += float(runfiles.read_summary(dirs[j] / runfiles.SUMMARY_FILE)["wall_time_s"])
    R, X, P = np.array(R), np.array(X), np.array(P)
    Y, base_source, base_cost = _main_budget_losses(cfg, names, [design[j][0] for j in done], X, P)
    mixtures = [{"name": design[j][0], "nominal": dict(zip(names, map(float, design[j][1]))),
                 "shares": dict(zip(names, map(float, R[m]))), "run_dir": str(dirs[j]),
                 "proxy_end": dict(zip(names, map(float, P[m]))), "final": dict(zip(names, map(float, Y[m])))}
                for m, j in enumerate(done)]
    if missing:
        warnings.append(f"fitted on {len(done)} of {len(dirs)} proxies; missing: {[str(d) for d in missing]}")

    fits, predictors = fit_laws(R, Y, names, cfg.plan.law)
    # Stay where the proxies ran (the box of realised shares) and within each domain's repetition allowance.
    caps = allowance_caps(cfg, data, names, budget_tokens)
    lo, hi = R.min(axis=0), np.minimum(R.max(axis=0), np.maximum(caps, R.min(axis=0)))
    w0_fit = np.clip(w0, lo, hi)
    w0_fit /= w0_fit.sum()
    rise = {names.index(n): float(t) for n, t in max_rise.items()}
    a = np.array([objective[n] for n in names])
    rec = recommend(predictors, a, lo, hi, w0_fit, rise, [w0_fit, *R])
    predicted = np.array([p(rec)[0] for p in predictors])
    predicted_w0 = np.array([p(w0)[0] for p in predictors])
    doc = {"domains": names, "budget_tokens": budget_tokens, "main_steps": int(main_steps), "proxy_steps": int(steps),
           "cost_share": float(len(done) * steps / main_steps), "base_cost_share": base_cost,
           "proxy_wall_time_s": wall, "law": cfg.plan.law, "stage1": cfg.plan.stage1, "base": base_source,
           "objective": objective, "max_rise": max_rise, "mixtures": mixtures, "fits": fits,
           "init": init, "recommended": dict(zip(names, map(float, rec))),
           "predicted": dict(zip(names, map(float, predicted))),
           "predicted_w0": dict(zip(names, map(float, predicted_w0))),
           "box": {"lo": dict(zip(names, map(float, lo))), "hi": dict(zip(names, map(float, hi)))},
           "warnings": warnings}
    path = out / runfiles.PLAN_FILE
    runfiles.write_plan(path, doc)
    from velocitune.report import plot_plan

    plot_plan(doc, path.with_suffix(".png"))
    return doc


def _main_budget_losses(cfg: Config, names: list[str], labels: list[str], X: np.ndarray,
                        P: np.ndarray) -> tuple[np.ndarray, str | None, float]:
    """Each proxy's per-domain loss at the main budget, (n, k), by plan.stage1; where the base came from; and
    the cost of the targets proxy behind it (a share of the main run's steps; 0 without one).

    "extrapolate": each proxy's own law fit carried to the main budget (X). "offset": the loss at w0 at the
    main budget (the targets of mixing.targets when it names a file, else the w0 proxy's own extrapolation)
    plus how far each proxy's end loss sits from the w0 proxy's (P − P_w0): the mixture's effect measured
    where it was run, moved to the main run's level, without extrapolating each short curve on its own.
    """
    if cfg.plan.stage1 == "extrapolate":
        return X, None, 0.0
    if "w0" not in labels:
        raise DataError("plan.stage1 'offset' measures every mixture against the w0 proxy, which has not finished; "
                        "run it, or set plan.stage1=extrapolate")
    w = labels.index("w0")
    cost = 0.0
    if cfg.mixing.targets and Path(cfg.mixing.targets).is_file():
        doc = runfiles.read_targets(cfg.mixing.targets)
        found = runfiles.target_values(doc)
        missing = [n for n in names if n not in found]
        if missing:
            raise DataError(f"mixing.targets {cfg.mixing.targets} has no target for {missing}; re-run `velocitune targets`")
        base, source, cost = np.array([found[n] for n in names]), str(cfg.mixing.targets), float(doc.get("proxy_cost_share", 0.0))
    else:
        base, source = X[w], "the w0 proxy"
    return base[None, :] + (P - P[w][None, :]), source, cost


def _init_from(run_dir: Path, names: list[str]) -> tuple[list[float], list[int]]:
    """ℓ_init and the tokens it was measured on, from a proxy's step-0 evaluation."""
    records = runfiles.read_log(run_dir / runfiles.EVAL_FILE, runfiles.EVAL, names)
    first = next((r for r in records if r["step"] == 0), None)
    if first is None:
        raise DataError(f"{run_dir}: no step-0 evaluation (ℓ_init) in {runfiles.EVAL_FILE}; re-run this proxy")
    return [first["losses"][n] for n in names], [first["tokens_evaluated"][n] for n in names]


def _num(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _nums(xs) -> list | None:
    return None if xs is None else [_num(x) for x in xs]


# ---------------------------------------------------------------------------------------------- command


def _pairs(flag: str, text: str) -> dict[str, float]:
    """'code=2,math=1' -> {'code': 2.0, 'math': 1.0}."""
    out = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ConfigError(f"{flag}: '{part}' is not DOMAIN=NUMBER (e.g. {flag} code=2,math=1)")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="the plan's directory: proxies/, plan.json, plan.png, init_loss.json")
    p.add_argument("--objective", help="per-domain weights of the loss to minimise, e.g. code=2,math=1 "
                                       "(plan.objective; default: every domain 1, the mean loss)")
    p.add_argument("--max-rise", help="largest rise (nats) a domain may take over its predicted loss under w0, "
                                      "e.g. replay=0.05 (plan.max_rise)")
    p.add_argument("--budget", type=float, help="the proxies' steps together as a share of the main run's "
                                                "(plan.budget, default 0.5)")
    p.add_argument("--law", choices=["auto", *LAWS], help="mixture law per domain (plan.law, default auto: "
                                                          "the lower leave-one-mixture-out error)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--emit", action="store_true", help="write each proxy's config and commands.sh instead "
                                                          "of running them (a cluster runs them; then --collect)")
    mode.add_argument("--collect", action="store_true", help="run nothing: fit from the finished proxy run "
                                                             "directories (missing ones are listed and skipped)")


def main(args: argparse.Namespace, overrides: list[str], config: str | None) -> int:
    """`velocitune plan CONFIG --out DIR`: flags become plan.* overrides (a flag wins over the file)."""
    import json

    flags = {"objective": args.objective and _pairs("--objective", args.objective),
             "max_rise": args.max_rise and _pairs("--max-rise", args.max_rise),
             "budget": args.budget, "law": args.law}
    overrides = overrides + [f"--plan.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    cfg = load_config(config, overrides)
    out = Path(args.out)
    output_file(out / runfiles.PLAN_FILE, "the plan directory (--out)")
    doc = make_plan(cfg, out, "emit" if args.emit else "collect" if args.collect else "run")
    if doc is None:
        return 0
    names = doc["domains"]
    print(f"wrote {out / runfiles.PLAN_FILE} and {out / 'plan.png'}  (proxies: {doc['cost_share']:.0%} of the main "
          f"run's steps, {doc['proxy_wall_time_s']:.0f} s" + (f"; with the targets proxy that gave w0's losses: "
          f"{doc['cost_share'] + doc['base_cost_share']:.0%}" if doc.get("base_cost_share") else "") + ")")
    print(f"{'domain':>20s}  {'law':>6s}  {'LOO err':>8s}  {'w0':>6s}  {'plan':>6s}  {'loss @w0':>9s}  {'loss @plan':>10s}")
    for n in names:
        f = doc["fits"][n]
        loo = f["candidates"][f["law"]].get("max_loo_error")
        print(f"{n:>20s}  {f['law']:>6s}  {loo if loo is not None else float('nan'):8.4f}  "
              f"{doc['mixtures'][0]['shares'][n] if doc['mixtures'][0]['name'] == 'w0' else float('nan'):6.3f}  "
              f"{doc['recommended'][n]:6.3f}  {doc['predicted_w0'][n]:9.4f}  {doc['predicted'][n]:10.4f}")
    for w in doc["warnings"]:
        print(f"warning: {w}")
    print(f"use it: velocitune train CONFIG --mixing.plan={out / runfiles.PLAN_FILE}  (add --mixing.rule=static "
          f"for the planned mixture, fixed)")
    return 0
