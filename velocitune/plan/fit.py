"""Stages 1 and 2 of a plan and its recommendation (docs/design.md §4.4): every proxy's per-domain loss at
the main budget, a mixture law per domain over them, and the mixture minimising the objective within the
shares the proxies covered and each domain's repetition allowance; `plan_document` is plan.json's content.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from velocitune import laws, runfiles
from velocitune.config import Config
from velocitune.errors import DataError, FitError
from velocitune.plan.design import PlanSetup
from velocitune.plan.proxies import ProxyResults
from velocitune.schedule import subsampled_windows

LAWS = ("mixing", "share")


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


def allowance_caps(cfg: Config, windows: list[int], budget_tokens: float) -> np.ndarray:
    """Largest share of the main budget each domain can feed within data.max_repetition epochs, (k,).

    `windows`: each domain's training windows as prepared; an epoch is what the main run samples from, after
    data.subsample."""
    L = cfg.data.seq_len
    kept = np.array(subsampled_windows(windows, cfg.data.subsample), dtype=np.float64)
    return np.minimum(1.0, kept * L * cfg.data.max_repetition / budget_tokens)


def plan_document(s: PlanSetup, res: ProxyResults) -> dict:
    """plan.json's content: stage 1 (each proxy's losses at the main budget), stage 2 (a law per domain) and the
    recommended mixture with its predicted losses, from the plan's set-up and what its proxies gave."""
    cfg, names = s.cfg, s.names
    labels = [s.labels[j] for j in res.done]
    Y, base_source, base_cost = main_budget_losses(cfg, names, labels, res.X, res.P)
    fits, predictors = fit_laws(res.R, Y, names, cfg.plan.law)
    lo, hi, rec = _recommendation(s, res.R, predictors)
    predicted = np.array([p(rec)[0] for p in predictors])
    predicted_w0 = np.array([p(s.w0)[0] for p in predictors])

    def per_domain(v) -> dict[str, float]:  # (k,) -> {domain: value}
        return dict(zip(names, map(float, v)))

    mixtures = [{"name": s.labels[j], "nominal": per_domain(s.design[j][1]), "shares": per_domain(res.R[m]),
                 "run_dir": str(s.dirs[j]), "proxy_end": per_domain(res.P[m]), "final": per_domain(Y[m])}
                for m, j in enumerate(res.done)]
    return {"domains": names, "budget_tokens": s.budget_tokens, "main_steps": int(s.main_steps),
            "proxy_steps": int(s.steps), "cost_share": float(len(res.done) * s.steps / s.main_steps),
            "base_cost_share": base_cost, "proxy_wall_time_s": res.wall, "law": cfg.plan.law,
            "stage1": cfg.plan.stage1, "base": base_source, "objective": s.objective, "max_rise": s.max_rise,
            "mixtures": mixtures, "fits": fits, "init": res.init, "recommended": per_domain(rec),
            "predicted": per_domain(predicted), "predicted_w0": per_domain(predicted_w0),
            "box": {"lo": per_domain(lo), "hi": per_domain(hi)}, "warnings": res.warnings}


def _recommendation(s: PlanSetup, R: np.ndarray, predictors: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo (k,), hi (k,), the recommended mixture (k,)): stay where the proxies ran (the box of realised shares
    R (n, k)) and within each domain's repetition allowance."""
    names = s.names
    caps = allowance_caps(s.cfg, s.windows, s.budget_tokens)
    lo, hi = R.min(axis=0), np.minimum(R.max(axis=0), np.maximum(caps, R.min(axis=0)))
    w0_fit = np.clip(s.w0, lo, hi)
    w0_fit /= w0_fit.sum()
    rise = {names.index(n): float(t) for n, t in s.max_rise.items()}
    a = np.array([s.objective[n] for n in names])
    return lo, hi, recommend(predictors, a, lo, hi, w0_fit, rise, [w0_fit, *R])


def main_budget_losses(cfg: Config, names: list[str], labels: list[str], X: np.ndarray,
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


def _num(x) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def _nums(xs) -> list | None:
    return None if xs is None else [_num(x) for x in xs]
