"""The per-domain fits of `velocitune targets` (docs/design.md §3 Stage B, §4): a proxy's loss points fitted
with a law from `velocitune.laws` (Chinchilla's data law, the LR-aware CPT law, or the log-linear fallback),
extrapolated to the main run's budget, with warnings; and each fit drawn with its own law."""

from __future__ import annotations

import numpy as np

from velocitune import laws
from velocitune.errors import FitError

# Points on each domain's drawn curves (targets.json "fit_curve" and "prediction_curve").
CURVE_POINTS = 64


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

    if predictor == "cpt_law":
        result = _cpt_law(S1, S2, losses, init, main_areas, bootstrap)
        entry["warnings"] += [f"cpt_law: {c}" for c in result["checks"]]
    else:
        result = _chinchilla(tokens, losses, budget_tokens, bootstrap)
        if predictor == "auto" and result["checks"]:
            entry["warnings"] += [f"chinchilla: {c}" for c in result["checks"]]
            try:
                result = _cpt_law(S1, S2, losses, init, main_areas, bootstrap)
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


def _chinchilla(tokens: np.ndarray, losses: np.ndarray, budget_tokens: float, bootstrap: int) -> dict:
    """The data law L(D) = E + B/D^β over the proxy's points (tokens (n,), losses (n,)), at the main budget."""
    fit = laws.fit_data_law(tokens, losses, bootstrap=bootstrap)
    target = float(fit.predict(budget_tokens))
    interval = [float(x) for x in fit.interval(budget_tokens)] if bootstrap else None
    return {"predictor": "chinchilla", "target": target, "params": {"E": fit.E, "B": fit.B, "beta": fit.beta},
            "r2": fit.r2, "interval": interval, "holdout_error": fit.holdout_error,
            "checks": laws.check_data_law(fit, float(losses[-1]), budget_tokens), "fit": fit}


def _cpt_law(S1: np.ndarray, S2: np.ndarray, losses: np.ndarray, init: float, main_areas: tuple[float, float],
             bootstrap: int) -> dict:
    """The LR-aware CPT law over the proxy's points (its LR areas S1, S2 (n,) at each), at the main run's areas."""
    fit = laws.fit_cpt_law(S1, S2, losses, init, bootstrap=bootstrap)
    at = (np.array([main_areas[0]]), np.array([main_areas[1]]))
    target = float(fit.predict(*at)[0])
    interval = [float(np.ravel(x)[0]) for x in fit.interval(*at)] if bootstrap else None
    return {"predictor": "cpt_law", "target": target, "params": fit.params, "r2": fit.r2,
            "interval": interval, "holdout_error": fit.holdout_error,
            "checks": laws.check_cpt_law(fit, losses, target), "fit": fit}


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
