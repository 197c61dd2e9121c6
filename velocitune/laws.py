"""Scaling-law fits that turn short runs into predicted losses (DESIGN §3 Stage B and §4).

Pure numpy/scipy in float64, no I/O and no printing. What is here:

- `fit_data_law`: the fixed-model-size Chinchilla law `L(D) = E + B/D^β`, and `check_data_law`,
  the sanity checks a target must pass before training trusts it (§3 Stage B step 4);
- `fit_chinchilla`: the full law `L(N, D) = E + A/N^α + B/D^β` with the same machinery;
- `lr_areas`, `fit_cpt_law`, `cpt_full_law`: the LR-schedule-aware CPT law (§4.2);
- `fit_dcpt_law`, `suggest_domain_share`: the D-CPT law over the domain share `r` (§4.3);
- `loglinear_extrapolate`: the last-resort fallback predictor.

How every fit is made. The power laws (data, Chinchilla, D-CPT) are written as
`log L̂ = logsumexp(e, c_1 − p_1·x_1, …)` — a floor `E = e^e` plus positive power-law terms — and
fitted by minimising the *sum* of Huber_δ(log L̂ − log L) (Hoffmann et al. 2022, appendix D.2);
the CPT law is fitted the same way on the loss scale. The optimisation has two stages:
1. from *every* start of the grid at once (for the large Chinchilla and D-CPT grids, the 256
   starts with the lowest starting objective), at most 60 iterations of a vectorised
   Levenberg–Marquardt descent with Huber (IRLS) weights — one numpy pass per iteration for all
   starts. (One L-BFGS-B run per start needs ~90 evaluations at ~100 µs of scipy overhead each:
   1–3 s per fit for the 150-point grid alone, against ~0.1 s this way, with the same optimum
   on every synthetic curve we compared);
2. the best three distinct end points are polished by scipy's L-BFGS-B with the analytic gradient
   and tight tolerances (ftol 1e-15, gtol 1e-10 on the objective divided by δ², whose values are
   O(1) per point); the best polished point is the fit.
Bounds are enforced in both stages (projection in stage 1, L-BFGS-B's box in stage 2).

Uncertainty: every fit can carry a residual bootstrap. Each replicate adds residuals of the fit
(in the space it was fitted: log loss, or loss for the CPT law), drawn with replacement, centred
and inflated by sqrt(n / (n − p)) for p parameters, to the fitted values, and refits by stage 1
started from the best fit (not the grid). `interval(...)` returns percentiles of the replicates'
predictions: a confidence band of the fitted curve, not of a single noisy future measurement.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.signal import lfilter

from velocitune.errors import FitError

# Stage 1 (vectorised Levenberg–Marquardt) and stage 2 (L-BFGS-B polish) settings.
_LM_MAX_ITER = 60  # enough to reach the basins: the polish does the rest (measured: 30 suffice)
_LM_STEP_CAP = 5.0  # largest change of any internal parameter in one step (a trust region)
_LM_BOOTSTRAP_ITER = 1000  # bootstrap refits have no polish: run the descent to convergence
_N_POLISHED = 3
_LBFGS_POLISH = {"ftol": 1e-15, "gtol": 1e-10, "maxiter": 1000, "maxfun": 2000}

# DESIGN §4.1 start grid for the fixed-N law: e, b (= log B), β.
_GRID_E = np.arange(-1.0, 1.01, 0.5)
_GRID_LOG_COEF = np.arange(0.0, 25.1, 5.0)
_GRID_EXPONENT = np.arange(0.0, 2.01, 0.5)
_EXP_HI = 3.0  # upper bound on every power-law exponent (β, α, γ; |η|)
_LOG_RANGE = 20.0  # the floor and each term stay above e^−20 · min loss (see _PowerSum.box)
_N_SCREENED_STARTS = 256  # starts kept after screening a very large grid (Chinchilla, D-CPT)

_MIN_POINTS_DATA = 4
_MIN_POINTS_CHINCHILLA = 6
_MIN_POINTS_CPT = 5
_MIN_POINTS_DCPT = 7

# check_data_law thresholds (documented there).
_BETA_LOW, _BETA_HIGH = 0.05, 2.0
_R2_MIN = 0.9
_PLATEAU_FRACTION = 0.05


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


def _vector(caller: str, name: str, values, *, sign: str) -> np.ndarray:
    """`values` as a 1-D float64 array of finite numbers that are "> 0", "≥ 0" or "any"."""
    try:
        arr = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise FitError(f"{caller}: {name} must be a sequence of numbers ({exc})") from None
    if arr.ndim != 1:
        raise FitError(f"{caller}: {name} must be one-dimensional, got shape {arr.shape}")
    bad = ~np.isfinite(arr)
    if sign == "> 0":
        bad |= ~(arr > 0)
    elif sign == "≥ 0":
        bad |= ~(arr >= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise FitError(
            f"{caller}: point {i} has {name} = {arr[i]!r}; every {name} must be finite"
            f"{'' if sign == 'any' else ' and ' + sign}. Drop or fix that point."
        )
    return arr


def _check_lengths(caller: str, **arrays: np.ndarray) -> int:
    """The common length of `arrays`; FitError naming them if they differ."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        detail = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise FitError(f"{caller}: the inputs must have one entry per point, got {detail}")
    return next(iter(lengths.values()))


def _check_options(caller: str, n: int, minimum: int, what: str, holdout, bootstrap, delta):
    if n < minimum:
        raise FitError(
            f"{caller}: got {n} point(s), need at least {minimum} to fit {what}; "
            f"evaluate more checkpoints."
        )
    for name, value in (("holdout", holdout), ("bootstrap", bootstrap)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise FitError(f"{caller}: {name} must be an integer ≥ 0, got {value!r}")
    if not (math.isfinite(delta) and delta > 0):
        raise FitError(f"{caller}: huber_delta must be finite and > 0, got {delta!r}")


def _positive_scalar(caller: str, name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise FitError(f"{caller}: {name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise FitError(f"{caller}: {name} must be finite and > 0, got {value!r}")
    return v


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise FitError(f"interval: level must be strictly between 0 and 1, got {level!r}")


def _check_has_bootstrap(params: np.ndarray) -> None:
    if len(params) == 0:
        raise FitError("interval: this fit was made with bootstrap=0; refit with bootstrap > 0")


# ----------------------------------------------------------------------------------------------
# The fitting engine (see the module docstring)
#
# A "problem" supplies residuals(θ (m, P), targets (n,) or (m, n)) → (r (m, n), J (m, n, P)),
# the residuals of the law at internal parameters θ and their Jacobian, and box(targets) → (lo, hi)
# bounds of shape (P,) or (m, P) (the floor bound e ≤ log min L depends on the targets).
# ----------------------------------------------------------------------------------------------


def _huber(r: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray]:
    """Huber_δ(r) and its derivative ψ(r), both shaped like r."""
    a = np.abs(r)
    quad = a <= delta
    value = np.where(quad, 0.5 * r * r, delta * (a - 0.5 * delta))
    psi = np.where(quad, r, np.copysign(delta, r))
    return value, psi


def _huber_lm(
    residuals: Callable,
    theta0: np.ndarray,
    targets: np.ndarray,
    lo,
    hi,
    delta: float,
    max_iter: int = _LM_MAX_ITER,
) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1: Levenberg–Marquardt with Huber IRLS weights from every row of θ0 (m, P) at once.

    Returns the end points (m, P) and their objectives Σ Huber_δ / δ² (m,). Rows run until an
    accepted step gains less than 1e-10 relative, the damping saturates, or `max_iter`.
    """
    m, P = theta0.shape
    lo = np.broadcast_to(lo, (m, P))
    hi = np.broadcast_to(hi, (m, P))
    per_row = targets.ndim == 2
    diag_idx = np.arange(P)

    def evaluate(theta, rows):
        r, J = residuals(theta, targets[rows] if per_row else targets)
        with np.errstate(invalid="ignore"):
            value = _huber(r, delta)[0].sum(axis=-1) / delta**2
        return np.where(np.isfinite(value), value, np.inf), r, J

    theta = np.clip(theta0, lo, hi)
    f, r, J = evaluate(theta, slice(None))
    damping = np.full(m, 1e-3)
    active = np.isfinite(f)
    for _ in range(max_iter):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        ra, Ja = r[rows], J[rows]  # (a, n), (a, n, P)
        a = np.abs(ra)
        # IRLS weight ψ(r)/r: 1 inside the quadratic zone, δ/|r| outside; majorises Huber.
        w = np.where(a <= delta, 1.0, delta / np.maximum(a, delta))
        JtW = Ja.transpose(0, 2, 1) * w[:, None, :]  # (a, P, n)
        g = np.matmul(JtW, ra[..., None])[..., 0]  # Jᵀ W r, (a, P)
        H = np.matmul(JtW, Ja)  # Jᵀ W J, (a, P, P)
        d = H[:, diag_idx, diag_idx]  # (a, P)
        ridge = 1e-12 * (1.0 + d.max(axis=1, keepdims=True))
        H[:, diag_idx, diag_idx] += damping[rows, None] * d + ridge
        ok = np.isfinite(H).all(axis=(1, 2)) & np.isfinite(g).all(axis=1)
        step = np.zeros_like(g)
        if ok.any():
            step[ok] = np.linalg.solve(H[ok], -g[ok][..., None])[..., 0]
        step /= np.maximum(1.0, np.abs(step).max(axis=1) / _LM_STEP_CAP)[:, None]
        cand = np.clip(theta[rows] + step, lo[rows], hi[rows])
        fc, rc, Jc = evaluate(cand, rows)
        better = ok & (fc < f[rows])
        gain = f[rows] - fc
        won = rows[better]
        theta[won], r[won], J[won], f[won] = cand[better], rc[better], Jc[better], fc[better]
        damping[rows] = np.where(better, np.maximum(damping[rows] * 0.3, 1e-12), damping[rows] * 10)
        done = (better & (gain <= 1e-10 * f[rows])) | (damping[rows] > 1e10) | ~ok
        active[rows[done]] = False
    return theta, f


def _scalar_objective(residuals: Callable, targets: np.ndarray, delta: float) -> Callable:
    """Σ Huber_δ / δ² and its gradient at one θ (P,), for L-BFGS-B."""

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        r, J = residuals(theta[None, :], targets)
        value, psi = _huber(r[0], delta)
        if not np.all(np.isfinite(value)):
            return math.inf, np.zeros_like(theta)
        return float(value.sum() / delta**2), J[0].T @ psi / delta**2

    return objective


def _fit_problem(problem, starts: np.ndarray, targets: np.ndarray, delta: float):
    """Both stages from the internal `starts` (m, P): best internal θ (P,) and its objective."""
    lo, hi = problem.box(targets)
    theta, f = _huber_lm(problem.residuals, starts, targets, lo, hi, delta)
    if not np.isfinite(f).any():
        raise FitError("the law gives no finite prediction from any start; check the points")
    objective = _scalar_objective(problem.residuals, targets, delta)
    bounds = [(None if np.isinf(a) else a, None if np.isinf(b) else b) for a, b in zip(lo, hi)]
    best_x, best_f = None, math.inf
    chosen: list[np.ndarray] = []
    for i in np.argsort(f, kind="stable"):
        if len(chosen) == _N_POLISHED or not np.isfinite(f[i]):
            break
        if any(np.max(np.abs(theta[i] - c)) < 1e-4 for c in chosen):
            continue  # the same optimum reached from another start
        chosen.append(theta[i])
        res = minimize(
            objective, theta[i], jac=True, method="L-BFGS-B", bounds=bounds, options=_LBFGS_POLISH
        )
        x, fx = (res.x, float(res.fun)) if res.fun <= f[i] else (theta[i], float(f[i]))
        if fx < best_f:
            best_x, best_f = np.asarray(x, dtype=np.float64), fx
    return best_x, best_f


def _bootstrap_problem(
    problem, theta: np.ndarray, targets: np.ndarray, n_boot: int, seed: int, delta: float
) -> np.ndarray:
    """Residual bootstrap (module docstring): internal θ of `n_boot` refits, (n_boot, P)."""
    P = len(theta)
    if n_boot == 0:
        return np.empty((0, P))
    resid = problem.residuals(theta[None, :], targets)[0][0]  # (n,)
    fitted = targets - resid
    n = len(resid)
    inflate = math.sqrt(n / (n - P)) if n > P else 1.0
    centred = (resid - resid.mean()) * inflate
    draws = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    replicate_targets = fitted + centred[draws]  # (n_boot, n)
    lo, hi = problem.box(replicate_targets)
    starts = np.broadcast_to(theta, (n_boot, P))
    thetas, _ = _huber_lm(
        problem.residuals, starts, replicate_targets, lo, hi, delta, _LM_BOOTSTRAP_ITER
    )
    return thetas


def _r2(observed: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination on the loss scale; NaN when the observations are all equal."""
    ss_tot = float(np.sum((observed - observed.mean()) ** 2))
    if ss_tot == 0.0:
        return math.nan
    return 1.0 - float(np.sum((observed - predicted) ** 2)) / ss_tot


def _percentile_band(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Equal-tailed `level` band of `samples` (n_boot, …) along axis 0."""
    tail = 50.0 * (1.0 - level)
    return np.percentile(samples, tail, axis=0), np.percentile(samples, 100.0 - tail, axis=0)


def _out(x: np.ndarray) -> float | np.ndarray:
    """A 0-d result as a float, anything else as an array."""
    return float(x) if np.ndim(x) == 0 else x


def _positive_array(caller: str, name: str, values) -> np.ndarray:
    """An array argument of a predict/interval method, any shape, every entry finite and > 0."""
    arr = np.asarray(values, dtype=np.float64)
    _vector(caller, name, arr.ravel(), sign="> 0")
    return arr


# ----------------------------------------------------------------------------------------------
# Power laws in log space
# ----------------------------------------------------------------------------------------------


class _PowerSum:
    """`log L̂ = logsumexp(e, c_1 − p_1·x_1, …, c_J − p_J·x_J)` on fixed points.

    Term j has log-features X_j (n, k_j) and exponents p_j (k_j,); the natural parameters are
    θ = [e, c_1, p_1…, c_2, p_2…] with E = e^e and coefficients e^{c_j}. Internally the features
    are centred (x − x̄) and each c_j is shifted to c_j − p_j·x̄_j: the same model, but c and p
    are no longer almost collinear (log D ≈ 20 makes them move together). Residuals are
    log L̂ − log L.
    """

    def __init__(self, feats: Sequence[np.ndarray], exponent_bounds: Sequence[Sequence[tuple]]):
        self.centres = [X.mean(axis=0) for X in feats]  # (k_j,) each
        self.X = [X - c for X, c in zip(feats, self.centres)]  # (n, k_j) each
        self.layout: list[tuple[int, slice]] = []  # (index of c_j, slice of p_j) per term
        lo, hi = [-np.inf], [np.inf]  # e: the upper bound log min L is set per targets in box()
        i = 1
        for X, exp_bounds in zip(feats, exponent_bounds):
            k = X.shape[1]
            self.layout.append((i, slice(i + 1, i + 1 + k)))
            lo += [-np.inf] + [b[0] for b in exp_bounds]
            hi += [np.inf] + [b[1] for b in exp_bounds]
            i += 1 + k
        self.n_params = i
        self.lo, self.hi = np.array(lo), np.array(hi)

    def _shift(self, theta: np.ndarray, sign: float) -> np.ndarray:
        out = np.array(theta, dtype=np.float64, copy=True)
        for (ic, sp), centre in zip(self.layout, self.centres):
            out[..., ic] += sign * (out[..., sp] @ centre)
        return out

    def to_internal(self, theta: np.ndarray) -> np.ndarray:
        return self._shift(theta, -1.0)

    def to_natural(self, theta: np.ndarray) -> np.ndarray:
        return self._shift(theta, +1.0)

    def box(self, log_y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bounds (P,) or (m, P) for targets (n,) or (m, n).

        e ≤ log(min L) keeps the floor E at or below every observed loss. The floor and every
        term's value at the centre of the data are also kept within [e^−20·min L, e·max L]:
        a fitted term can never exceed the loss it sums to (by convexity, its value at the
        centre is at most its largest value at a point), and below e^−20 it is zero to the
        last digit that matters; without this box the optimiser crawls towards e = −∞ when a
        term is not needed.
        """
        shape = log_y.shape[:-1] + (self.n_params,)
        lo = np.broadcast_to(self.lo, shape).copy()
        hi = np.broadcast_to(self.hi, shape).copy()
        low, high = log_y.min(axis=-1) - _LOG_RANGE, log_y.max(axis=-1) + 1.0
        coef = [0] + [ic for ic, _ in self.layout]  # e and each c_j
        lo[..., coef] = low[..., None]
        hi[..., coef] = high[..., None]
        hi[..., 0] = log_y.min(axis=-1)
        return lo, hi

    def residuals(
        self, theta: np.ndarray, log_y: np.ndarray, jacobian: bool = True
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """log L̂ − log L (m, n) and its Jacobian (m, n, P) at internal θ (m, P)."""
        m, n = theta.shape[0], self.X[0].shape[0]
        Z = np.empty((m, len(self.layout) + 1, n))  # per-term logs
        Z[:, 0, :] = theta[:, :1]
        for j, ((ic, sp), X) in enumerate(zip(self.layout, self.X), start=1):
            Z[:, j, :] = theta[:, ic : ic + 1] - theta[:, sp] @ X.T
        top = Z.max(axis=1, keepdims=True)
        ex = np.exp(Z - top)
        total = ex.sum(axis=1, keepdims=True)
        r = top[:, 0, :] + np.log(total[:, 0, :]) - log_y
        if not jacobian:
            return r, None
        weights = ex / total  # ∂ log L̂ / ∂ term j, (m, J+1, n)
        J = np.empty((m, n, self.n_params))
        J[:, :, 0] = weights[:, 0, :]
        for j, ((ic, sp), X) in enumerate(zip(self.layout, self.X), start=1):
            J[:, :, ic] = weights[:, j, :]
            J[:, :, sp] = -weights[:, j, :, None] * X
        return r, J

    def fit(self, grid: np.ndarray, log_y: np.ndarray, delta: float) -> tuple[np.ndarray, float]:
        """Natural θ fitted from the natural start `grid` (m, P), and its scaled objective."""
        theta, f = _fit_problem(self, self.to_internal(grid), log_y, delta)
        return self.to_natural(theta), f

    def screen(self, grid: np.ndarray, log_y: np.ndarray, delta: float, keep: int) -> np.ndarray:
        """The `keep` natural grid points with the lowest starting objective."""
        lo, hi = self.box(log_y)
        r, _ = self.residuals(np.clip(self.to_internal(grid), lo, hi), log_y, jacobian=False)
        values = _huber(r, delta)[0].sum(axis=1)
        return grid[np.argsort(values, kind="stable")[:keep]]

    def bootstrap(self, theta, log_y, n_boot: int, seed: int, delta: float) -> np.ndarray:
        """Natural θ of `n_boot` residual-bootstrap refits, (n_boot, P)."""
        internal = _bootstrap_problem(self, self.to_internal(theta), log_y, n_boot, seed, delta)
        return self.to_natural(internal)


def _holdout_error(
    n: int, holdout: int, minimum: int, fit_predict: Callable[[slice, slice], np.ndarray], L
) -> float | None:
    """Max |error| (nats) on the last `holdout` points of a fit made without them."""
    if holdout == 0 or n - holdout < minimum:
        return None
    tail = slice(n - holdout, n)
    return float(np.max(np.abs(fit_predict(slice(0, n - holdout), tail) - L[tail])))


# ----------------------------------------------------------------------------------------------
# 1. Fixed-model-size data law  L(D) = E + B / D^β
# ----------------------------------------------------------------------------------------------

_DATA_EXPONENT_BOUNDS = [[(0.0, _EXP_HI)]]


def _data_grid() -> np.ndarray:
    """The DESIGN §4.1 grid as natural θ = [e, b, β] rows (150, 3)."""
    return np.array(list(itertools.product(_GRID_E, _GRID_LOG_COEF, _GRID_EXPONENT)))


def _data_problem(tokens: np.ndarray) -> _PowerSum:
    return _PowerSum([np.log(tokens)[:, None]], _DATA_EXPONENT_BOUNDS)


def _data_law(tokens, E, B, beta):
    """E + B / D^β with numpy broadcasting."""
    return E + B * np.power(tokens, -beta)


@dataclass(frozen=True, eq=False)
class DataLawFit:
    """A fitted `L(D) = E + B / D^β` with its diagnostics.

    `tokens`/`losses` are the fitted points sorted by tokens; `bootstrap_params` holds one
    (E, B, β) row per bootstrap replicate (empty when fitted with bootstrap=0); `loss` is the
    minimised sum of Huber_δ residuals; `holdout_error` is None when it was not computed.
    """

    E: float
    B: float
    beta: float
    r2: float
    holdout_error: float | None
    n_points: int
    loss: float
    tokens: np.ndarray = field(repr=False)
    losses: np.ndarray = field(repr=False)
    bootstrap_params: np.ndarray = field(repr=False)

    def predict(self, tokens) -> float | np.ndarray:
        """Predicted loss (nats) at `tokens` (a number or an array; every entry > 0)."""
        D = _positive_array("predict", "tokens", tokens)
        return _out(_data_law(D, self.E, self.B, self.beta))

    def interval(self, tokens, level: float = 0.9) -> tuple:
        """Bootstrap `level` confidence band (lo, hi) of the fitted curve at `tokens`."""
        _check_level(level)
        _check_has_bootstrap(self.bootstrap_params)
        D = _positive_array("interval", "tokens", tokens)
        p = self.bootstrap_params.reshape((-1, 3) + (1,) * D.ndim)  # (n_boot, 3, 1, …)
        lo, hi = _percentile_band(_data_law(D, p[:, 0], p[:, 1], p[:, 2]), level)
        return _out(lo), _out(hi)

    @property
    def params(self) -> dict[str, float]:
        """{"E", "B", "beta"} as plain floats (the `params` of targets.json)."""
        return {"E": self.E, "B": self.B, "beta": self.beta}


def fit_data_law(
    tokens,
    losses,
    *,
    huber_delta: float = 1e-3,
    bootstrap: int = 200,
    seed: int = 0,
    holdout: int = 2,
) -> DataLawFit:
    """Fit `L(D) = E + B / D^β` to (tokens, loss) points (DESIGN §4.1).

    Log space, sum of Huber_δ residuals, started from each of the 150 grid points
    e ∈ {−1,…,1}, b ∈ {0,5,…,25}, β ∈ {0,0.5,…,2} (module docstring: vectorised descent, then
    L-BFGS-B polish); bounds β ∈ [0, 3], E ≤ min observed loss. `bootstrap` replicates give
    `interval`; `holdout_error` = max |error| (nats) on the `holdout` largest-token points of a
    fit made without them (same grid), None if fewer than 4 points would remain.
    Needs at least 4 points, every tokens and loss finite and > 0.
    """
    caller = "fit_data_law"
    D = _vector(caller, "tokens", tokens, sign="> 0")
    L = _vector(caller, "loss", losses, sign="> 0")
    n = _check_lengths(caller, tokens=D, losses=L)
    _check_options(caller, n, _MIN_POINTS_DATA, "E + B/D^beta", holdout, bootstrap, huber_delta)
    order = np.argsort(D, kind="stable")
    D, L = D[order], L[order]

    def fit(idx: slice) -> tuple[np.ndarray, float]:
        return _data_problem(D[idx]).fit(_data_grid(), np.log(L[idx]), huber_delta)

    def natural(theta: np.ndarray) -> np.ndarray:
        """(…, 3) rows [e, b, β] → [E, B, β]."""
        return np.stack([np.exp(theta[..., 0]), np.exp(theta[..., 1]), theta[..., 2]], axis=-1)

    theta, f = fit(slice(None))
    E, B, beta = natural(theta)
    boot = _data_problem(D).bootstrap(theta, np.log(L), bootstrap, seed, huber_delta)
    return DataLawFit(
        E=float(E),
        B=float(B),
        beta=float(beta),
        r2=_r2(L, _data_law(D, E, B, beta)),
        holdout_error=_holdout_error(
            n,
            holdout,
            _MIN_POINTS_DATA,
            lambda head, tail: _data_law(D[tail], *natural(fit(head)[0])),
            L,
        ),
        n_points=n,
        loss=f * huber_delta**2,
        tokens=D,
        losses=L,
        bootstrap_params=natural(boot).reshape(-1, 3),
    )


def check_data_law(fit: DataLawFit, last_loss: float, target_tokens: float) -> list[str]:
    """Warnings (empty when the fit may be trusted) for a data-law target (DESIGN §3 B.4, §8).

    With `target = fit.predict(target_tokens)` and `last_loss` the last proxy loss:
    1. `E < target < last_loss`;
    2. `0.05 ≤ β ≤ 2` — stricter than DESIGN's 0.01 because fits with β ≈ 0.01–0.02 passed
       that bound in the prototype: such a curve is practically a straight line in log D, its
       floor E is not identified, and the "target" is a log-linear extrapolation;
    3. `R² > 0.9` (an undefined R², from all-equal losses, fails);
    4. `target_tokens` beyond the last fitted point (otherwise this is not an extrapolation);
    5. plateau: the predicted drop per decade of tokens from the last fitted point to
       `target_tokens` must be at least 5 % of the fitted drop per decade over the fitted range.
       For a power law and equal spans this ratio is 10^(−β) (0.5 at β = 0.3), so the rule
       flags β > 1.3 there: curves that have all but stopped, like a constant-LR proxy that
       has plateaued, whose target sits just under the last loss (the "too easy" targets of
       DESIGN §8).
    """
    last_loss = _positive_scalar("check_data_law", "last_loss", last_loss)
    target_tokens = _positive_scalar("check_data_law", "target_tokens", target_tokens)
    warnings: list[str] = []
    target = float(fit.predict(target_tokens))
    if not fit.E < target:
        warnings.append(f"target {target:.4f} is not above the fitted floor E = {fit.E:.4f}")
    if not target < last_loss:
        warnings.append(
            f"target {target:.4f} is not below the last proxy loss {last_loss:.4f}: "
            f"the fit predicts no further progress"
        )
    if fit.beta < _BETA_LOW:
        warnings.append(
            f"near-flat fit: beta = {fit.beta:.4f} < {_BETA_LOW} (a straight line in log D; "
            f"the floor E is not identified)"
        )
    if fit.beta > _BETA_HIGH:
        warnings.append(f"beta = {fit.beta:.4f} > {_BETA_HIGH}: implausibly fast convergence")
    if not fit.r2 > _R2_MIN:
        warnings.append(f"R² = {fit.r2:.4f} is not above {_R2_MIN}: the law does not fit")
    d_first, d_last = float(fit.tokens[0]), float(fit.tokens[-1])
    if target_tokens <= d_last:
        warnings.append(
            f"target_tokens {target_tokens:.4g} is not beyond the last fitted point {d_last:.4g}"
        )
    elif d_last > d_first:
        fitted_rate = (fit.predict(d_first) - fit.predict(d_last)) / math.log10(d_last / d_first)
        ahead_rate = (fit.predict(d_last) - target) / math.log10(target_tokens / d_last)
        if fitted_rate > 0 and ahead_rate < _PLATEAU_FRACTION * fitted_rate:
            warnings.append(
                f"plateau: the predicted drop beyond the last point, {ahead_rate:.4g} nats per "
                f"decade of tokens, is under {_PLATEAU_FRACTION:.0%} of the fitted "
                f"{fitted_rate:.4g} nats per decade"
            )
    return warnings


# ----------------------------------------------------------------------------------------------
# 2. Full Chinchilla law  L(N, D) = E + A / N^α + B / D^β
# ----------------------------------------------------------------------------------------------

_CHINCHILLA_EXPONENT_BOUNDS = [[(0.0, _EXP_HI)], [(0.0, _EXP_HI)]]


def _chinchilla_grid() -> np.ndarray:
    """Hoffmann et al.'s grid as natural θ = [e, a, α, b, β] rows (4500, 5)."""
    axes = (_GRID_E, _GRID_LOG_COEF, _GRID_EXPONENT, _GRID_LOG_COEF, _GRID_EXPONENT)
    return np.array(list(itertools.product(*axes)))


def _chinchilla_law(N, D, E, A, alpha, B, beta):
    return E + A * np.power(N, -alpha) + B * np.power(D, -beta)


def _chinchilla_natural(theta: np.ndarray) -> np.ndarray:
    """(…, 5) rows [e, a, α, b, β] → [E, A, α, B, β]."""
    out = np.array(theta, dtype=np.float64, copy=True)
    out[..., [0, 1, 3]] = np.exp(out[..., [0, 1, 3]])
    return out


@dataclass(frozen=True, eq=False)
class ChinchillaFit:
    """A fitted `L(N, D) = E + A/N^α + B/D^β`; `bootstrap_params` rows are (E, A, α, B, β)."""

    E: float
    A: float
    alpha: float
    B: float
    beta: float
    r2: float
    holdout_error: float | None
    n_points: int
    loss: float
    bootstrap_params: np.ndarray = field(repr=False)

    def predict(self, N, D) -> float | np.ndarray:
        """Predicted loss at model size N and tokens D (broadcast against each other)."""
        N_ = _positive_array("predict", "N", N)
        D_ = _positive_array("predict", "D", D)
        return _out(_chinchilla_law(N_, D_, self.E, self.A, self.alpha, self.B, self.beta))

    def interval(self, N, D, level: float = 0.9) -> tuple:
        """Bootstrap `level` confidence band (lo, hi) of the fitted surface at (N, D)."""
        _check_level(level)
        _check_has_bootstrap(self.bootstrap_params)
        N_, D_ = np.broadcast_arrays(
            _positive_array("interval", "N", N), _positive_array("interval", "D", D)
        )
        p = self.bootstrap_params.reshape((-1, 5) + (1,) * N_.ndim)
        samples = _chinchilla_law(N_, D_, *(p[:, i] for i in range(5)))
        lo, hi = _percentile_band(samples, level)
        return _out(lo), _out(hi)

    @property
    def params(self) -> dict[str, float]:
        return {"E": self.E, "A": self.A, "alpha": self.alpha, "B": self.B, "beta": self.beta}


def fit_chinchilla(
    params_N,
    tokens,
    losses,
    *,
    huber_delta: float = 1e-3,
    bootstrap: int = 200,
    seed: int = 0,
    holdout: int = 2,
) -> ChinchillaFit:
    """Fit `L(N, D) = E + A/N^α + B/D^β` (Hoffmann et al. 2022) with the data-law machinery.

    Start grid: e ∈ {−1,…,1}, a, b ∈ {0,5,…,25}, α, β ∈ {0,0.5,…,2} (4,500 points). The grid is
    thinned for speed: all of it is scored by its starting objective in one vectorised pass and
    the descent runs from the best 256. Bounds α, β ∈ [0, 3], E ≤ min loss. `holdout` = the
    points with the largest N·D. Needs at least 6 points.
    """
    caller = "fit_chinchilla"
    N = _vector(caller, "params_N", params_N, sign="> 0")
    D = _vector(caller, "tokens", tokens, sign="> 0")
    L = _vector(caller, "loss", losses, sign="> 0")
    n = _check_lengths(caller, params_N=N, tokens=D, losses=L)
    what = "E + A/N^alpha + B/D^beta"
    _check_options(caller, n, _MIN_POINTS_CHINCHILLA, what, holdout, bootstrap, huber_delta)
    order = np.argsort(N * D, kind="stable")
    N, D, L = N[order], D[order], L[order]

    def problem(idx: slice) -> _PowerSum:
        return _PowerSum(
            [np.log(N[idx])[:, None], np.log(D[idx])[:, None]], _CHINCHILLA_EXPONENT_BOUNDS
        )

    def fit(idx: slice) -> tuple[np.ndarray, float]:
        p, log_y = problem(idx), np.log(L[idx])
        starts = p.screen(_chinchilla_grid(), log_y, huber_delta, _N_SCREENED_STARTS)
        return p.fit(starts, log_y, huber_delta)

    theta, f = fit(slice(None))
    nat = _chinchilla_natural(theta)
    boot = problem(slice(None)).bootstrap(theta, np.log(L), bootstrap, seed, huber_delta)
    return ChinchillaFit(
        *(float(x) for x in nat),
        r2=_r2(L, _chinchilla_law(N, D, *nat)),
        holdout_error=_holdout_error(
            n,
            holdout,
            _MIN_POINTS_CHINCHILLA,
            lambda head, tail: _chinchilla_law(
                N[tail], D[tail], *_chinchilla_natural(fit(head)[0])
            ),
            L,
        ),
        n_points=n,
        loss=f * huber_delta**2,
        bootstrap_params=_chinchilla_natural(boot).reshape(-1, 5),
    )


# ----------------------------------------------------------------------------------------------
# 3. Learning-rate areas (DESIGN §4.2)
# ----------------------------------------------------------------------------------------------


def lr_areas(lrs, warmup_steps: int, lam: float = 0.999) -> tuple[np.ndarray, np.ndarray]:
    """Forward area S1 and annealing area S2 of an LR schedule, one entry per step.

    Indexing: steps are numbered t = 1..T and `lrs[t − 1]` is the LR used by step t (so a linear
    warm-up of W steps to η_peak has `lrs[t − 1] = t/W · η_peak`). `S1[t − 1]` and `S2[t − 1]` are
    the areas after step t; before any step both are 0.
      S1(t) = Σ_{s ≤ t} η_s
      S2(t) = Σ_{s ≤ t} m_s,   m_s = λ·m_{s−1} + (η_{s−1} − η_s) for s > W,   m_s = 0 for s ≤ W,
    where η_W (the "previous" LR of the first post-warm-up step) is η_peak = max(lrs): the
    momentum starts after warm-up at the peak, so S2 is 0 through warm-up and any constant
    phase. DESIGN's check — 100 steps, 10 warm-up, constant to step 80, linear decay to 1e-4 at
    step 100 — gives S1(100) = 0.08605, S2(80) = 0, S2(90) = 0.0024676, S2(100) = 0.0093904.
    """
    caller = "lr_areas"
    eta = _vector(caller, "lr", lrs, sign="≥ 0")
    T = len(eta)
    if T == 0:
        raise FitError(f"{caller}: the schedule is empty; pass one learning rate per step")
    if (
        isinstance(warmup_steps, bool)
        or not isinstance(warmup_steps, (int, np.integer))
        or not 0 <= warmup_steps <= T
    ):
        raise FitError(
            f"{caller}: warmup_steps must be an integer in [0, {T}], got {warmup_steps!r}"
        )
    if not 0.0 <= lam < 1.0:
        raise FitError(f"{caller}: lam must be in [0, 1), got {lam!r}")
    # drops[k] = η_{s−1} − η_s for the post-warm-up steps s = W+1..T, the first from η_peak.
    drops = -np.diff(np.concatenate([[eta.max()], eta[warmup_steps:]]))
    momentum = np.zeros(T)
    momentum[warmup_steps:] = lfilter([1.0], [1.0, -lam], drops)  # m_s = λ·m_{s−1} + drop_s
    return np.cumsum(eta), np.cumsum(momentum)


# ----------------------------------------------------------------------------------------------
# 4. LR-aware CPT law (DESIGN §4.2)
# ----------------------------------------------------------------------------------------------


def cpt_full_law(S1_pt, S2_pt, S1_cpt, S2_cpt, *, L0, A, alpha, C1, C2, B, E, beta):
    """The full CPT law of Wang, Tissue et al. (2025) in the notation of DESIGN §4.2:

        L = L0 + A·(S1_pt + S1_cpt)^(−α) − C1·S2_pt − C2·S2_cpt + B·(1 − (1 + E·S1_cpt)^(−β))

    `S1_pt, S2_pt` are the pre-training areas (fixed once pre-training ended), `S1_cpt, S2_cpt`
    the areas accumulated in CPT (`lr_areas` of the CPT schedule). The first four terms continue
    the pre-training curve; the last is the shift to the new distribution (B < 0 when the
    domain's loss falls in CPT, B > 0 when it rises, e.g. forgetting on replay data).
    Broadcasts its array arguments. `fit_cpt_law` fits the anchored special case, which needs
    no pre-training quantities: the base model's loss on the domain stands for the first terms.
    """
    S1_pt, S2_pt, S1_cpt, S2_cpt = (
        np.asarray(x, np.float64) for x in (S1_pt, S2_pt, S1_cpt, S2_cpt)
    )
    return _out(
        L0
        + A * np.power(S1_pt + S1_cpt, -alpha)
        - C1 * S2_pt
        - C2 * S2_cpt
        + B * (1.0 - np.power(1.0 + E * S1_cpt, -beta))
    )


def _cpt_law(S1, S2, loss_init, B, E, beta, C):
    """ℓ_init + B·(1 − (1 + E·S1)^(−β)) − C·S2 with numpy broadcasting."""
    return loss_init + B * (1.0 - np.power(1.0 + E * S1, -beta)) - C * S2


# Internal CPT parameters θ = [B, log E', β, C'] with E' = E·max S1 and C' = C·max |S2|, so every
# component is O(1) whatever the LR scale (S1 ~ steps·η, S2 ~ 1e-2).
_CPT_LOG_E_GRID = np.log([1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4])
_CPT_BETA_GRID = np.array([0.1, 0.25, 0.5, 1.0, 2.0])
_CPT_LOG_E_BOUNDS = (math.log(1e-3), math.log(1e6))


class _CptProblem:
    """The anchored CPT law on fixed points, with areas normalised by their largest magnitude.

    Residuals are on the loss scale: ℓ̂ − ℓ. C is pinned to 0 when no point has annealing area.
    """

    n_params = 4

    def __init__(self, S1: np.ndarray, S2: np.ndarray, loss_init: float):
        self.s1_scale = float(S1.max())
        self.s2_scale = float(np.abs(S2).max()) or 1.0
        self.s1, self.s2 = S1 / self.s1_scale, S2 / self.s2_scale
        self.loss_init = loss_init
        c_hi = np.inf if self.s2.any() else 0.0
        self.lo = np.array([-np.inf, _CPT_LOG_E_BOUNDS[0], 0.0, 0.0])
        self.hi = np.array([np.inf, _CPT_LOG_E_BOUNDS[1], _EXP_HI, c_hi])

    def box(self, targets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.lo, self.hi

    def natural(self, theta: np.ndarray) -> np.ndarray:
        """Internal rows (…, 4) → (B, E, β, C)."""
        out = np.array(theta, dtype=np.float64, copy=True)
        out[..., 1] = np.exp(out[..., 1]) / self.s1_scale
        out[..., 3] /= self.s2_scale
        return out

    def residuals(self, theta: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """ℓ̂ − ℓ (m, n) and its Jacobian (m, n, 4) at internal θ (m, 4)."""
        B, log_e, beta, c = (theta[:, i : i + 1] for i in range(4))  # (m, 1) each
        e = np.exp(log_e)
        base = 1.0 + e * self.s1  # (m, n)
        decay = np.power(base, -beta)
        with np.errstate(over="ignore", invalid="ignore"):
            r = self.loss_init + B * (1.0 - decay) - c * self.s2 - y
            J = np.stack(
                [
                    1.0 - decay,
                    B * beta * decay / base * e * self.s1,
                    B * decay * np.log(base),
                    np.broadcast_to(-self.s2, base.shape),
                ],
                axis=-1,
            )
        return r, J

    def starts(self, y: np.ndarray) -> np.ndarray:
        """Starts (35, 4): each (E', β) of the grid, with B and C' ≥ 0 by linear least squares."""
        rise = y - self.loss_init  # the law is linear in (B, C') once (E', β) are fixed
        starts = []
        for log_e, beta in itertools.product(_CPT_LOG_E_GRID, _CPT_BETA_GRID):
            f = 1.0 - np.power(1.0 + math.exp(log_e) * self.s1, -beta)
            B, c = 0.0, 0.0
            if self.s2.any():
                (B, c), *_ = np.linalg.lstsq(np.column_stack([f, -self.s2]), rise, rcond=None)
            if c <= 0.0:
                c = 0.0
                B = float(f @ rise / (f @ f)) if f @ f > 0 else 0.0
            starts.append([B, log_e, beta, c])
        return np.array(starts)


@dataclass(frozen=True, eq=False)
class CptLawFit:
    """A fitted anchored CPT law `ℓ(S1, S2) = loss_init + B·(1 − (1 + E·S1)^(−β)) − C·S2`.

    Sign convention as in DESIGN §4.2: B < 0 for a falling loss (−B is the gain as S1 → ∞, before
    annealing), B > 0 for a rising one; C ≥ 0 is the gain per unit of annealing area (0 when the
    fitted points had no annealing). `bootstrap_params` rows are (B, E, β, C).
    """

    B: float
    E: float
    beta: float
    C: float
    loss_init: float
    r2: float
    holdout_error: float | None
    n_points: int
    loss: float
    bootstrap_params: np.ndarray = field(repr=False)

    def predict(self, S1, S2) -> float | np.ndarray:
        """Predicted loss at areas (S1 ≥ 0, S2), e.g. `lr_areas` of the main run's schedule."""
        S1_ = np.asarray(S1, dtype=np.float64)
        _vector("predict", "S1", S1_.ravel(), sign="≥ 0")
        return _out(
            _cpt_law(S1_, np.asarray(S2, float), self.loss_init, self.B, self.E, self.beta, self.C)
        )

    def interval(self, S1, S2, level: float = 0.9) -> tuple:
        """Bootstrap `level` confidence band (lo, hi) of the fitted curve at (S1, S2)."""
        _check_level(level)
        _check_has_bootstrap(self.bootstrap_params)
        S1_, S2_ = np.broadcast_arrays(np.asarray(S1, float), np.asarray(S2, float))
        _vector("interval", "S1", S1_.ravel(), sign="≥ 0")
        p = self.bootstrap_params.reshape((-1, 4) + (1,) * S1_.ndim)
        samples = _cpt_law(S1_, S2_, self.loss_init, *(p[:, i] for i in range(4)))
        lo, hi = _percentile_band(samples, level)
        return _out(lo), _out(hi)

    @property
    def params(self) -> dict[str, float]:
        return {
            "B": self.B,
            "E": self.E,
            "beta": self.beta,
            "C": self.C,
            "loss_init": self.loss_init,
        }


# A CPT-law target may fall below the last proxy loss by at most this multiple of the drop the proxy
# itself saw (ℓ_init − last). Measured on the demo: accurate fits need ≤ 0.6×; the wild extrapolations
# of a too-short proxy (5 % of the run, benchmarks/target_study.py) asked for 4–7×.
_CPT_MAX_EXTRA_DROP = 3.0


def check_cpt_law(fit: "CptLawFit", losses, target: float) -> list[str]:
    """Warnings (empty when the fit may be trusted) for a target of the anchored CPT law.

    `losses` are the proxy's loss points, in order. 1. `R² > 0.9`; 2. the target is positive;
    3. the extrapolation stays plausible: the target lies within 3× the proxy's own movement
    (the range of ℓ_init and its points) of the last proxy loss, in either direction.
    """
    losses = _vector("check_cpt_law", "losses", np.asarray(losses, dtype=np.float64).ravel(), sign="> 0")
    last = float(losses[-1])
    warnings: list[str] = []
    if not fit.r2 > _R2_MIN:
        warnings.append(f"R² = {fit.r2:.4f} is not above {_R2_MIN}: the law does not fit")
    if not target > 0:
        warnings.append(f"target {target:.4f} is not positive")
    moved = float(max(losses.max(), fit.loss_init) - min(losses.min(), fit.loss_init))
    extra = last - target  # > 0: the target asks for more than the proxy reached
    if abs(extra) > _CPT_MAX_EXTRA_DROP * moved:
        where = "below" if extra > 0 else "above"
        warnings.append(
            f"implausible extrapolation: the target {target:.4f} is {abs(extra):.3f} nats {where} the last proxy "
            f"loss, more than {_CPT_MAX_EXTRA_DROP:g}x the {moved:.3f} nats the proxy itself moved; use a longer "
            f"proxy (--fraction) or another predictor"
        )
    return warnings


def fit_cpt_law(
    S1,
    S2,
    losses,
    loss_init: float,
    *,
    huber_delta: float = 1e-3,
    bootstrap: int = 200,
    seed: int = 0,
    holdout: int = 2,
) -> CptLawFit:
    """Fit the anchored LR-aware CPT law (DESIGN §4.2) to one domain's proxy-run loss curve.

    `S1`, `S2`: the proxy schedule's areas at the evaluated steps (`lr_areas(...)[k][step − 1]`);
    `losses`: the domain's val loss there; `loss_init`: its loss before CPT, the anchor
    (ℓ = loss_init exactly at S1 = S2 = 0). Objective: sum of Huber_δ on the *loss* scale (δ in
    nats: the law is a sum, not a power sum). Starts: E·max S1 ∈ {1e-2,…,1e4} × β ∈ {0.1,…,2}, with
    B and C by least squares at each; bounds β ∈ [0, 3], E·max S1 ∈ [1e-3, 1e6], C ≥ 0 (C = 0 when
    no point has annealing area: the fit then cannot foresee an anneal's gain). `holdout` = the
    points with the largest S1. Needs at least 5 points.
    """
    caller = "fit_cpt_law"
    s1 = _vector(caller, "S1", S1, sign="≥ 0")
    s2 = _vector(caller, "S2", S2, sign="any")
    L = _vector(caller, "loss", losses, sign="> 0")
    n = _check_lengths(caller, S1=s1, S2=s2, losses=L)
    _check_options(
        caller, n, _MIN_POINTS_CPT, "the 4-parameter CPT law", holdout, bootstrap, huber_delta
    )
    loss_init = _positive_scalar(caller, "loss_init", loss_init)
    if s1.max() <= 0:
        raise FitError(f"{caller}: every S1 is 0; evaluate points after training has started")
    order = np.argsort(s1, kind="stable")
    s1, s2, L = s1[order], s2[order], L[order]

    def fit(idx: slice) -> tuple[_CptProblem, np.ndarray, float]:
        p = _CptProblem(s1[idx], s2[idx], loss_init)
        return (p, *_fit_problem(p, p.starts(L[idx]), L[idx], huber_delta))

    def fit_predict_tail(head: slice, tail: slice) -> np.ndarray:
        p, theta, _ = fit(head)
        return _cpt_law(s1[tail], s2[tail], loss_init, *p.natural(theta))

    problem, theta, f = fit(slice(None))
    B, E, beta, C = problem.natural(theta)
    boot = problem.natural(_bootstrap_problem(problem, theta, L, bootstrap, seed, huber_delta))
    return CptLawFit(
        B=float(B),
        E=float(E),
        beta=float(beta),
        C=float(C),
        loss_init=loss_init,
        r2=_r2(L, _cpt_law(s1, s2, loss_init, B, E, beta, C)),
        holdout_error=_holdout_error(n, holdout, _MIN_POINTS_CPT, fit_predict_tail, L),
        n_points=n,
        loss=f * huber_delta**2,
        bootstrap_params=boot.reshape(-1, 4),
    )


# ----------------------------------------------------------------------------------------------
# 5. D-CPT law  L(D, r) = E + B·r^η / D^β + C / (r + ε)^γ   (DESIGN §4.3, N fixed)
# ----------------------------------------------------------------------------------------------

# Natural θ = [e, b, β, η, c, γ]: term 1 = b − β·log D − η·(−log r), term 2 = c − γ·log(r + ε).
_DCPT_EXPONENT_BOUNDS = [[(0.0, _EXP_HI), (-_EXP_HI, _EXP_HI)], [(0.0, _EXP_HI)]]


def _dcpt_grid() -> np.ndarray:
    """Start grid (12,000, 6) for natural θ = [e, b, β, η, c, γ], screened before the descent."""
    axes = (
        _GRID_E,
        _GRID_LOG_COEF,
        _GRID_EXPONENT,
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
        D_ = _positive_array("predict", "D", D)
        r_ = _positive_array("predict", "r", r)
        nat = (self.E, self.B, self.eta, self.beta, self.C, self.gamma)
        return _out(_dcpt_law(D_, r_, *nat, self.eps))

    def interval(self, D, r, level: float = 0.9) -> tuple:
        """Bootstrap `level` confidence band (lo, hi) of the fitted surface at (D, r)."""
        _check_level(level)
        _check_has_bootstrap(self.bootstrap_params)
        D_, r_ = np.broadcast_arrays(
            _positive_array("interval", "D", D), _positive_array("interval", "r", r)
        )
        p = self.bootstrap_params.reshape((-1, 6) + (1,) * D_.ndim)
        samples = _dcpt_law(D_, r_, *(p[:, i] for i in range(6)), self.eps)
        lo, hi = _percentile_band(samples, level)
        return _out(lo), _out(hi)

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
    D = _vector(caller, "tokens", tokens, sign="> 0")
    r = _vector(caller, "ratio", ratios, sign="> 0")
    L = _vector(caller, "loss", losses, sign="> 0")
    n = _check_lengths(caller, tokens=D, ratios=r, losses=L)
    _check_options(
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
    eps = _positive_scalar(caller, "eps", eps)
    order = np.argsort(D, kind="stable")
    D, r, L = D[order], r[order], L[order]

    def problem(idx: slice) -> _PowerSum:
        feats = [np.column_stack([np.log(D[idx]), -np.log(r[idx])]), np.log(r[idx] + eps)[:, None]]
        return _PowerSum(feats, _DCPT_EXPONENT_BOUNDS)

    def fit(idx: slice) -> tuple[np.ndarray, float]:
        p, log_y = problem(idx), np.log(L[idx])
        return p.fit(
            p.screen(_dcpt_grid(), log_y, huber_delta, _N_SCREENED_STARTS), log_y, huber_delta
        )

    theta, f = fit(slice(None))
    nat = _dcpt_natural(theta)
    boot = problem(slice(None)).bootstrap(theta, np.log(L), bootstrap, seed, huber_delta)
    return DcptFit(
        *(float(x) for x in nat),
        eps=eps,
        r_range=(float(r.min()), float(r.max())),
        r2=_r2(L, _dcpt_law(D, r, *nat, eps)),
        holdout_error=_holdout_error(
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
    base = _positive_scalar(caller, "general_loss_base", general_loss_base)
    D = _positive_scalar(caller, "D", D)
    if not (math.isfinite(tolerance) and tolerance >= 0):
        raise FitError(f"{caller}: tolerance must be finite and ≥ 0, got {tolerance!r}")
    if grid is None:
        lo, hi = general_fit.r_range
        shares = np.arange(math.ceil(lo * 100 - 1e-9), math.floor(hi * 100 + 1e-9) + 1) / 100
        shares = shares if len(shares) else np.array([lo])
    else:
        shares = np.sort(_vector(caller, "r", grid, sign="> 0"))
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
# 6. Fallback
# ----------------------------------------------------------------------------------------------


def loglinear_extrapolate(tokens, losses, target_tokens: float) -> float:
    """Loss at `target_tokens` from a straight line L = a + s·log D through the last half.

    The line is a least-squares fit to the last ⌈n/2⌉ points by tokens (at least 2). The result is
    clamped at 0 (a cross-entropy cannot be negative) and, for a falling line (s ≤ 0), at the
    last observed loss, so the fallback never predicts that a decreasing curve goes back up.
    A rising line (e.g. forgetting on a replay domain) is extrapolated as it is.
    """
    caller = "loglinear_extrapolate"
    D = _vector(caller, "tokens", tokens, sign="> 0")
    L = _vector(caller, "loss", losses, sign="> 0")
    n = _check_lengths(caller, tokens=D, losses=L)
    if n < 2:
        raise FitError(f"{caller}: got {n} point(s), need at least 2 to draw a line")
    target_tokens = _positive_scalar(caller, "target_tokens", target_tokens)
    order = np.argsort(D, kind="stable")
    D, L = D[order], L[order]
    tail = slice(n // 2, n)  # the last ⌈n/2⌉ points
    x, y = np.log(D[tail]), L[tail]
    if np.ptp(x) == 0:
        raise FitError(f"{caller}: the last half of the points all have tokens = {D[-1]:.4g}")
    slope, intercept = np.polyfit(x, y, 1)
    pred = max(float(intercept + slope * math.log(target_tokens)), 0.0)
    if slope <= 0:
        pred = min(pred, float(L[-1]))
    return pred
