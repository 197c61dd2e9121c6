"""The D-CPT mixture law: loss over tokens and the domain share r of the mixture (docs/design.md §4.3).

- `fit_dcpt_law` (`DcptFit`): `L(D, r) = E + B·r^η / D^β + C / (r + ε)^γ` (Que et al. 2024,
  N fixed), a power sum fitted in log space by the engine of `velocitune.laws.solver`;
- `suggest_domain_share`: the largest share r whose predicted general-loss rise stays within
  a tolerance;
- `fit_mixing_law` (`MixingLawFit`): Ye et al.'s data mixing law over the whole mixture at a
  fixed budget, and `fit_share_law` (`ShareLawFit`): the D-CPT share term alone; `velocitune plan`
  chooses between them per domain by leave-one-mixture-out error (§4.4);
- `plan_predict`: a plan.json's prediction of a domain's loss at any mixture, from the law it chose.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np

from velocitune.errors import FitError
from velocitune.laws.solver import (
    EXP_HI,
    GRID_E,
    GRID_EXPONENT,
    GRID_LOG_COEF,
    N_SCREENED_STARTS,
    PowerSum,
    as_vector,
    check_has_bootstrap,
    check_lengths,
    check_level,
    check_options,
    holdout_error,
    percentile_band,
    positive_array,
    positive_scalar,
    r_squared,
    to_output,
)

_MIN_POINTS_DCPT = 7


# ----------------------------------------------------------------------------------------------
# D-CPT law  L(D, r) = E + B·r^η / D^β + C / (r + ε)^γ   (docs/design.md §4.3, N fixed)
# ----------------------------------------------------------------------------------------------

# Natural θ = [e, b, β, η, c, γ]: term 1 = b − β·log D − η·(−log r), term 2 = c − γ·log(r + ε).
_DCPT_EXPONENT_BOUNDS = [[(0.0, EXP_HI), (-EXP_HI, EXP_HI)], [(0.0, EXP_HI)]]


def _dcpt_grid() -> np.ndarray:
    """Start grid (12,000, 6) for natural θ = [e, b, β, η, c, γ], screened before the descent."""
    axes = (
        GRID_E,
        GRID_LOG_COEF,
        GRID_EXPONENT,
        np.arange(-1.0, 1.01, 0.5),
        np.array([-6.0, -4.0, -2.0, 0.0]),
        np.arange(0.0, 1.51, 0.5),
    )
    return np.array(list(itertools.product(*axes)))


def _dcpt_law(D, r, E, B, eta, beta, C, gamma, eps):
    return E + B * np.power(r, eta) * np.power(D, -beta) + C * np.power(r + eps, -gamma)


def _dcpt_natural(theta: np.ndarray) -> np.ndarray:
    """(…, 6) rows [e, b, β, η, c, γ] → [E, B, η, β, C, γ] (the order of `_dcpt_law`)."""
    e, b, beta, eta, c, gamma = np.moveaxis(np.asarray(theta, dtype=np.float64), -1, 0)
    return np.stack([np.exp(e), np.exp(b), eta, beta, np.exp(c), gamma], axis=-1)


@dataclass(frozen=True, eq=False)
class DcptFit:
    """A fitted D-CPT law `L(D, r) = E + B·r^η / D^β + C / (r + ε)^γ` for one validation domain.

    `r` is the share of the CPT domain in the training mixture, `D` the CPT tokens; ε is fixed
    (not fitted); `r_range` is the (smallest, largest) fitted share. `bootstrap_params` rows are
    (E, B, η, β, C, γ).
    """

    E: float
    B: float
    eta: float
    beta: float
    C: float
    gamma: float
    eps: float
    r_range: tuple[float, float]
    r2: float
    holdout_error: float | None
    n_points: int
    loss: float
    bootstrap_params: np.ndarray = field(repr=False)

    def predict(self, D, r) -> float | np.ndarray:
        """Predicted loss at tokens D and domain share r > 0 (broadcast against each other)."""
        D_ = positive_array("predict", "D", D)
        r_ = positive_array("predict", "r", r)
        nat = (self.E, self.B, self.eta, self.beta, self.C, self.gamma)
        return to_output(_dcpt_law(D_, r_, *nat, self.eps))

    def interval(self, D, r, level: float = 0.9) -> tuple:
        """Bootstrap `level` confidence band (lo, hi) of the fitted surface at (D, r)."""
        check_level(level)
        check_has_bootstrap(self.bootstrap_params)
        D_, r_ = np.broadcast_arrays(
            positive_array("interval", "D", D), positive_array("interval", "r", r)
        )
        p = self.bootstrap_params.reshape((-1, 6) + (1,) * D_.ndim)
        samples = _dcpt_law(D_, r_, *(p[:, i] for i in range(6)), self.eps)
        lo, hi = percentile_band(samples, level)
        return to_output(lo), to_output(hi)

    @property
    def params(self) -> dict[str, float]:
        return {
            "E": self.E, "B": self.B, "eta": self.eta, "beta": self.beta,
            "C": self.C, "gamma": self.gamma, "eps": self.eps,
        }  # fmt: skip


def fit_dcpt_law(
    tokens,
    ratios,
    losses,
    *,
    eps: float = 0.01,
    huber_delta: float = 1e-3,
    bootstrap: int = 0,
    seed: int = 0,
    holdout: int = 0,
) -> DcptFit:
    """Fit the D-CPT law (Que et al. 2024, N fixed) to runs over tokens D and domain share r.

    Same engine as `fit_data_law` (log space, Huber), descending from the best 256 of a
    12,000-point start grid. Bounds β, γ ∈ [0, 3], η ∈ [−3, 3] (η < 0: the domain's own loss
    falls with r through the data term; η > 0: a general loss rises with r), E ≤ min loss.
    `ratios` must lie in (0, 1]: r^η is undefined at r = 0 for η < 0, so a run without the domain
    is the *reference* of `suggest_domain_share`, not a fitted point. Needs at least 7 points;
    `holdout` = the points with the largest D (off by default: grids of short runs are small).
    Bootstrap is off by default too: `suggest_domain_share` uses only the point fit.
    """
    caller = "fit_dcpt_law"
    D = as_vector(caller, "tokens", tokens, sign="> 0")
    r = as_vector(caller, "ratio", ratios, sign="> 0")
    L = as_vector(caller, "loss", losses, sign="> 0")
    n = check_lengths(caller, tokens=D, ratios=r, losses=L)
    check_options(
        caller, n, _MIN_POINTS_DCPT, "the 6-parameter D-CPT law", holdout, bootstrap, huber_delta
    )
    if np.any(r > 1.0):
        i = int(np.flatnonzero(r > 1.0)[0])
        raise FitError(f"{caller}: point {i} has ratio = {r[i]!r}; a domain share must be ≤ 1")
    if len(np.unique(r)) < 2 or len(np.unique(D)) < 2:
        raise FitError(
            f"{caller}: the runs must cover at least 2 domain shares and 2 token counts, got "
            f"{len(np.unique(r))} share(s) and {len(np.unique(D))} token count(s)"
        )
    eps = positive_scalar(caller, "eps", eps)
    order = np.argsort(D, kind="stable")
    D, r, L = D[order], r[order], L[order]

    def problem(idx: slice) -> PowerSum:
        feats = [np.column_stack([np.log(D[idx]), -np.log(r[idx])]), np.log(r[idx] + eps)[:, None]]
        return PowerSum(feats, _DCPT_EXPONENT_BOUNDS)

    def fit(idx: slice) -> tuple[np.ndarray, float]:
        p, log_y = problem(idx), np.log(L[idx])
        return p.fit(
            p.screen(_dcpt_grid(), log_y, huber_delta, N_SCREENED_STARTS), log_y, huber_delta
        )

    theta, f = fit(slice(None))
    nat = _dcpt_natural(theta)
    boot = problem(slice(None)).bootstrap(theta, np.log(L), bootstrap, seed, huber_delta)
    return DcptFit(
        *(float(x) for x in nat),
        eps=eps,
        r_range=(float(r.min()), float(r.max())),
        r2=r_squared(L, _dcpt_law(D, r, *nat, eps)),
        holdout_error=holdout_error(
            n,
            holdout,
            _MIN_POINTS_DCPT,
            lambda head, tail: _dcpt_law(D[tail], r[tail], *_dcpt_natural(fit(head)[0]), eps),
            L,
        ),
        n_points=n,
        loss=f * huber_delta**2,
        bootstrap_params=_dcpt_natural(boot).reshape(-1, 6),
    )


def suggest_domain_share(
    general_fit: DcptFit,
    general_loss_base: float,
    D: float,
    tolerance: float = 0.03,
    grid=None,
) -> float:
    """The largest domain share r that keeps the predicted general-loss rise within `tolerance`.

    rise(r) = general_fit.predict(D, r) / general_loss_base − 1, a relative rise (0.03 = 3 %),
    where `general_fit` is the D-CPT fit of the *general* validation loss, `general_loss_base`
    the reference general loss (the base model's, or a run without the domain) and D the main
    run's token budget. Scanning `grid` upwards, the answer is the last share before the first
    one whose rise exceeds the tolerance, so every smaller share on the grid is within it too.
    The default grid steps by 0.01 through the fitted shares `general_fit.r_range` only: the
    C/(r + ε)^γ term can blow up below the smallest fitted share, so the law is trusted to
    interpolate in r, not to extrapolate. FitError when even the smallest share exceeds it.
    """
    caller = "suggest_domain_share"
    base = positive_scalar(caller, "general_loss_base", general_loss_base)
    D = positive_scalar(caller, "D", D)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise FitError(f"{caller}: tolerance must be finite and ≥ 0, got {tolerance!r}")
    if grid is None:
        lo, hi = general_fit.r_range
        shares = np.arange(math.ceil(lo * 100 - 1e-9), math.floor(hi * 100 + 1e-9) + 1) / 100
        shares = shares if len(shares) else np.array([lo])
    else:
        shares = np.sort(as_vector(caller, "r", grid, sign="> 0"))
    if len(shares) == 0 or shares[-1] > 1.0:
        raise FitError(f"{caller}: grid must hold shares in (0, 1], got {grid!r}")
    rise = np.asarray(general_fit.predict(D, shares)) / base - 1.0
    over = rise > tolerance
    if over[0]:
        raise FitError(
            f"{caller}: even r = {shares[0]:.3g} raises the general loss by {rise[0]:.2%} "
            f"(> {tolerance:.2%}); raise the tolerance or use a finer grid near 0"
        )
    last_ok = int(np.argmax(over)) - 1 if over.any() else len(shares) - 1
    return float(shares[last_ok])


# ----------------------------------------------------------------------------------------------
# Data mixing law  L_i(r) = c_i + k_i·exp(Σ_j t_ij·r_j)   (Ye et al. 2024; docs/design.md §4.4)
# ----------------------------------------------------------------------------------------------

_SHARE_SUM_TOL = 1e-6


@dataclass(frozen=True, eq=False)
class MixingLawFit:
    """A fitted data mixing law for one validation domain at a fixed model and token budget.

    `L(r) = c + exp(u·r)` over the training mixture r (k shares summing to 1). Ye et al. write it
    `c + k·exp(Σ_j t_j r_j)`; since Σ r_j = 1, only u_j = t_j + log k is identifiable, so that is what
    is fitted: u_j < u_l means training on domain j lowers this loss more than training on domain l
    (transfer between domains). `loo_errors[m]`: the error (predicted − measured) at mixture m of a
    fit without it, None when there are too few mixtures to leave one out.
    """

    c: float
    u: np.ndarray
    r2: float
    rmse: float
    n_mixtures: int
    loo_errors: np.ndarray | None = field(repr=False)

    def predict(self, shares) -> float | np.ndarray:
        """Predicted loss at mixture(s) `shares`, shape (k,) or (m, k)."""
        r = _check_shares("predict", shares, len(self.u))
        out = self.c + np.exp(r @ self.u)  # (m,)
        return float(out[0]) if np.ndim(shares) == 1 else out

    @property
    def max_loo_error(self) -> float | None:
        return None if self.loo_errors is None else float(np.max(np.abs(self.loo_errors)))


def _check_shares(caller: str, shares, k: int | None = None) -> np.ndarray:
    """Mixtures as a float64 (m, k) array of non-negative rows summing to 1; FitError otherwise."""
    r = np.asarray(shares, dtype=np.float64)
    r = r[None, :] if r.ndim == 1 else r
    if r.ndim != 2 or (k is not None and r.shape[1] != k):
        raise FitError(f"{caller}: shares must have shape (mixtures, {k or 'domains'}), got {np.shape(shares)}")
    if not np.all(np.isfinite(r)) or np.any(r < 0):
        raise FitError(f"{caller}: shares must be finite and >= 0")
    bad = np.flatnonzero(np.abs(r.sum(axis=1) - 1.0) > _SHARE_SUM_TOL)
    if bad.size:
        raise FitError(f"{caller}: mixture {int(bad[0])} sums to {r[bad[0]].sum():.6g}; every mixture's shares must sum to 1")
    return r


def _fit_mixing(r: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(c, u) minimising Σ (c + exp(r·u) − y)², c in [0, min y): a profile over c, then a joint polish.

    For a fixed c, log(y − c) = r·u is linear least squares; the 1-D profile over c is searched on a
    grid and refined, then (c, u) are polished together in loss space.
    """
    from scipy.optimize import least_squares, minimize_scalar

    top = float(y.min()) * (1 - 1e-9)

    def inner(c: float) -> np.ndarray:
        return np.linalg.lstsq(r, np.log(y - c), rcond=None)[0]

    def sse(c: float) -> float:
        return float(np.sum((c + np.exp(r @ inner(c)) - y) ** 2))

    grid = top * (1 - np.geomspace(1e-4, 1.0, 60))  # dense near min y, where c usually sits
    grid = np.append(grid, 0.0)
    best = min(grid, key=sse)
    i = int(np.flatnonzero(grid == best)[0])
    lo, hi = grid[min(i + 1, grid.size - 1)], grid[max(i - 1, 0)]
    if hi > lo:
        best = float(minimize_scalar(sse, bounds=(lo, hi), method="bounded").x)
    x0 = np.concatenate([[best], inner(best)])
    res = least_squares(lambda x: x[0] + np.exp(r @ x[1:]) - y, x0,
                        bounds=([0.0] + [-np.inf] * r.shape[1], [top] + [np.inf] * r.shape[1]))
    if sse(best) < float(np.sum(res.fun**2)):
        return best, inner(best)
    return float(res.x[0]), res.x[1:].copy()


def fit_mixing_law(shares, losses) -> MixingLawFit:
    """Fit Ye et al.'s data mixing law to one domain's losses measured at n mixtures of k domains.

    shares (n, k): the mixtures tried (rows sum to 1); losses (n,): this domain's validation loss
    after each run (same model, tokens and schedule). Needs n >= k + 1 mixtures that span every
    direction of the simplex; with n >= k + 2 it also reports the leave-one-mixture-out errors.
    """
    caller = "fit_mixing_law"
    r = _check_shares(caller, shares)
    y = as_vector(caller, "loss", losses, sign="> 0")
    n, k = r.shape
    if y.size != n:
        raise FitError(f"{caller}: {n} mixtures but {y.size} losses")
    if n < k + 1:
        raise FitError(f"{caller}: {n} mixtures for {k} domains; the law has {k + 1} parameters, run at least {k + 1}")
    rank = np.linalg.matrix_rank(r)
    if rank < k:
        raise FitError(
            f"{caller}: the {n} mixtures span only {rank} of {k} directions (e.g. two domains always in the same "
            f"ratio); add mixtures that vary every domain's share"
        )
    c, u = _fit_mixing(r, y)
    pred = c + np.exp(r @ u)
    loo = None
    if n >= k + 2:
        errs = []
        for m in range(n):
            keep = np.arange(n) != m
            if np.linalg.matrix_rank(r[keep]) < k:
                errs.append(np.nan)  # this mixture alone spans a direction: it cannot be predicted
                continue
            cm, um = _fit_mixing(r[keep], y[keep])
            errs.append(cm + np.exp(r[m] @ um) - y[m])
        loo = np.array(errs)
    return MixingLawFit(c=c, u=u, r2=r_squared(y, pred), rmse=float(np.sqrt(np.mean((pred - y) ** 2))),
                        n_mixtures=n, loo_errors=loo)


# ----------------------------------------------------------------------------------------------
# Share law  L_i(r) = E + C·(r_i + ε)^(−γ)   (the D-CPT law's share term at a fixed budget; §4.4)
# ----------------------------------------------------------------------------------------------

SHARE_EPS = 0.01  # ε: keeps the law finite at a share of 0 (D-CPT's r' = r + ε, fixed instead of fitted)


@dataclass(frozen=True, eq=False)
class ShareLawFit:
    """`L(r) = E + C·(r + ε)^(−γ)` over one domain's own share r, at a fixed model and token budget.

    The D-CPT law at fixed D: its token term `B·r^η/D^β` folds into E and C, and ε is fixed
    (SHARE_EPS), leaving three parameters that a handful of mixtures can pin down. Unlike the
    mixing law it ignores transfer: only the domain's own share moves its loss.
    `loo_errors[m]`: the error (predicted − measured) at mixture m of a fit without it.
    """

    E: float
    C: float
    gamma: float
    r2: float
    rmse: float
    n_mixtures: int
    loo_errors: np.ndarray | None = field(repr=False)

    def predict(self, share) -> float | np.ndarray:
        """Predicted loss at the domain's share(s) `share` in [0, 1]."""
        r = np.asarray(share, dtype=np.float64)
        return to_output(self.E + self.C * (r + SHARE_EPS) ** (-self.gamma))

    @property
    def max_loo_error(self) -> float | None:
        return None if self.loo_errors is None else float(np.max(np.abs(self.loo_errors)))


def _fit_share(r: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(E, C, γ) minimising Σ (E + C·(r+ε)^−γ − y)²: a grid over γ (E, C linear), then a bounded polish."""
    from scipy.optimize import least_squares

    x = r + SHARE_EPS

    def linear(g: float) -> tuple[np.ndarray, float]:
        A = np.column_stack([np.ones_like(x), x ** (-g)])
        coef = np.linalg.lstsq(A, y, rcond=None)[0]
        if coef[1] < 0:  # a loss that rises with the domain's share: no power term, the mean
            coef = np.array([y.mean(), 0.0])
        return coef, float(np.sum((A @ coef - y) ** 2))

    gammas = np.geomspace(0.02, 3.0, 40)
    g0 = min(gammas, key=lambda g: linear(g)[1])
    (E0, C0), _ = linear(g0)
    res = least_squares(lambda p: p[0] + p[1] * x ** (-p[2]) - y, [E0, C0, g0],
                        bounds=([-np.inf, 0.0, 1e-3], [np.inf, np.inf, 5.0]))
    best = np.array([E0, C0, g0])
    if float(np.sum(res.fun**2)) <= linear(g0)[1]:
        best = res.x
    return best


def fit_share_law(shares, losses) -> ShareLawFit:
    """Fit the share law to one domain's losses at n mixtures: shares (n,) its own share in each, losses (n,).

    Needs n >= 3 mixtures with at least 3 distinct shares; with n >= 4 it also reports the
    leave-one-mixture-out errors.
    """
    caller = "fit_share_law"
    r = as_vector(caller, "share", shares, sign="≥ 0")
    y = as_vector(caller, "loss", losses, sign="> 0")
    if r.size != y.size:
        raise FitError(f"{caller}: {r.size} shares but {y.size} losses")
    if np.any(r > 1 + _SHARE_SUM_TOL):
        raise FitError(f"{caller}: a share is above 1")
    if np.unique(np.round(r, 9)).size < 3:
        raise FitError(f"{caller}: the law has 3 parameters; run mixtures with at least 3 distinct shares of this domain")
    E, C, g = _fit_share(r, y)
    pred = E + C * (r + SHARE_EPS) ** (-g)
    loo = None
    if r.size >= 4:
        errs = []
        for m in range(r.size):
            keep = np.arange(r.size) != m
            if np.unique(np.round(r[keep], 9)).size < 3:
                errs.append(np.nan)
                continue
            Em, Cm, gm = _fit_share(r[keep], y[keep])
            errs.append(Em + Cm * (r[m] + SHARE_EPS) ** (-gm) - y[m])
        loo = np.array(errs)
    return ShareLawFit(E=float(E), C=float(C), gamma=float(g), r2=r_squared(y, pred),
                       rmse=float(np.sqrt(np.mean((pred - y) ** 2))), n_mixtures=int(r.size), loo_errors=loo)


# ----------------------------------------------------------------------------------------------
# A plan's prediction  (plan.json "fits": the law each domain chose, with its parameters; §4.4)
# ----------------------------------------------------------------------------------------------


def plan_predict(doc: dict, domain: str, shares) -> np.ndarray:
    """A plan's prediction of `domain`'s loss at mixtures `shares` (m, k) from the law it chose: (m,).

    `doc`: a plan document (plan.json of `velocitune plan`) with "domains" and "fits"; the mixing law's
    parameters are {"c", "u": {domain: u_j}}, the share law's {"E", "C", "gamma", "eps"}.
    """
    names = doc["domains"]
    fit = doc["fits"][domain]
    p = fit["candidates"][fit["law"]]["params"]
    r = np.atleast_2d(np.asarray(shares, dtype=np.float64))  # (m, k)
    if fit["law"] == "mixing":
        return p["c"] + np.exp(r @ np.array([p["u"][n] for n in names]))
    return p["E"] + p["C"] * (r[:, names.index(domain)] + p["eps"]) ** (-p["gamma"])
