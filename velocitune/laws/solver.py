"""The robust-fitting engine that every scaling law of `velocitune.laws` shares.

Pure numpy/scipy in float64, no I/O and no printing: input validation, the Huber loss, the
two-stage optimiser below, the residual bootstrap, R², percentile bands, the held-out error, and
`PowerSum`, the log-space power-sum model behind the data, Chinchilla and D-CPT laws.

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

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import minimize

from velocitune.errors import FitError

# Stage 1 (vectorised Levenberg–Marquardt) and stage 2 (L-BFGS-B polish) settings.
_LM_MAX_ITER = 60  # enough to reach the basins: the polish does the rest (measured: 30 suffice)
_LM_STEP_CAP = 5.0  # largest change of any internal parameter in one step (a trust region)
_LM_BOOTSTRAP_ITER = 1000  # bootstrap refits have no polish: run the descent to convergence
_N_POLISHED = 3
_LBFGS_POLISH = {"ftol": 1e-15, "gtol": 1e-10, "maxiter": 1000, "maxfun": 2000}

# docs/design.md §4.1 start grid for the fixed-N law: e, b (= log B), β.
GRID_E = np.arange(-1.0, 1.01, 0.5)
GRID_LOG_COEF = np.arange(0.0, 25.1, 5.0)
GRID_EXPONENT = np.arange(0.0, 2.01, 0.5)
EXP_HI = 3.0  # upper bound on every power-law exponent (β, α, γ; |η|)
_LOG_RANGE = 20.0  # the floor and each term stay above e^−20 · min loss (see PowerSum.box)
N_SCREENED_STARTS = 256  # starts kept after screening a very large grid (Chinchilla, D-CPT)

# The least R² of a fit that may be trusted (check_data_law, check_cpt_law).
R2_MIN = 0.9


# ----------------------------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------------------------


def as_vector(caller: str, name: str, values, *, sign: str) -> np.ndarray:
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


def check_lengths(caller: str, **arrays: np.ndarray) -> int:
    """The common length of `arrays`; FitError naming them if they differ."""
    lengths = {name: len(a) for name, a in arrays.items()}
    if len(set(lengths.values())) != 1:
        detail = ", ".join(f"{k}: {v}" for k, v in lengths.items())
        raise FitError(f"{caller}: the inputs must have one entry per point, got {detail}")
    return next(iter(lengths.values()))


def check_options(caller: str, n: int, minimum: int, what: str, holdout, bootstrap, delta):
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


def positive_scalar(caller: str, name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise FitError(f"{caller}: {name} must be a number, got {value!r}") from None
    if not (math.isfinite(v) and v > 0):
        raise FitError(f"{caller}: {name} must be finite and > 0, got {value!r}")
    return v


def check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise FitError(f"interval: level must be strictly between 0 and 1, got {level!r}")


def check_has_bootstrap(params: np.ndarray) -> None:
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


def fit_problem(problem, starts: np.ndarray, targets: np.ndarray, delta: float):
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


def bootstrap_problem(
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


def r_squared(observed: np.ndarray, predicted: np.ndarray) -> float:
    """Coefficient of determination on the loss scale; NaN when the observations are all equal."""
    ss_tot = float(np.sum((observed - observed.mean()) ** 2))
    if ss_tot == 0.0:
        return math.nan
    return 1.0 - float(np.sum((observed - predicted) ** 2)) / ss_tot


def percentile_band(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Equal-tailed `level` band of `samples` (n_boot, …) along axis 0."""
    tail = 50.0 * (1.0 - level)
    return np.percentile(samples, tail, axis=0), np.percentile(samples, 100.0 - tail, axis=0)


def to_output(x: np.ndarray) -> float | np.ndarray:
    """A 0-d result as a float, anything else as an array."""
    return float(x) if np.ndim(x) == 0 else x


def positive_array(caller: str, name: str, values) -> np.ndarray:
    """An array argument of a predict/interval method, any shape, every entry finite and > 0."""
    arr = np.asarray(values, dtype=np.float64)
    as_vector(caller, name, arr.ravel(), sign="> 0")
    return arr


# ----------------------------------------------------------------------------------------------
# Power laws in log space
# ----------------------------------------------------------------------------------------------


class PowerSum:
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
        theta, f = fit_problem(self, self.to_internal(grid), log_y, delta)
        return self.to_natural(theta), f

    def screen(self, grid: np.ndarray, log_y: np.ndarray, delta: float, keep: int) -> np.ndarray:
        """The `keep` natural grid points with the lowest starting objective."""
        lo, hi = self.box(log_y)
        r, _ = self.residuals(np.clip(self.to_internal(grid), lo, hi), log_y, jacobian=False)
        values = _huber(r, delta)[0].sum(axis=1)
        return grid[np.argsort(values, kind="stable")[:keep]]

    def bootstrap(self, theta, log_y, n_boot: int, seed: int, delta: float) -> np.ndarray:
        """Natural θ of `n_boot` residual-bootstrap refits, (n_boot, P)."""
        internal = bootstrap_problem(self, self.to_internal(theta), log_y, n_boot, seed, delta)
        return self.to_natural(internal)


def holdout_error(
    n: int, holdout: int, minimum: int, fit_predict: Callable[[slice, slice], np.ndarray], L
) -> float | None:
    """Max |error| (nats) on the last `holdout` points of a fit made without them."""
    if holdout == 0 or n - holdout < minimum:
        return None
    tail = slice(n - holdout, n)
    return float(np.max(np.abs(fit_predict(slice(0, n - holdout), tail) - L[tail])))
