"""Loss as a power law of the training tokens (and model size), and the fallback predictor.

- `fit_data_law`: the fixed-model-size Chinchilla law `L(D) = E + B/D^β` (docs/design.md §4.1), and
  `check_data_law`, the sanity checks a target must pass before training trusts it (docs/design.md §3
  Stage B step 4);
- `fit_chinchilla`: the full law `L(N, D) = E + A/N^α + B/D^β` with the same machinery;
- `loglinear_extrapolate`: the last-resort fallback predictor.

Both laws are power sums fitted in log space by the engine of `velocitune.laws.solver` (its
module docstring: a vectorised descent from every start, then an L-BFGS-B polish), whose
residual bootstrap gives `interval(...)`.
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
    R2_MIN,
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

_MIN_POINTS_DATA = 4
_MIN_POINTS_CHINCHILLA = 6

# check_data_law thresholds (documented there).
_BETA_LOW, _BETA_HIGH = 0.05, 2.0
_PLATEAU_FRACTION = 0.05


# ----------------------------------------------------------------------------------------------
# Fixed-model-size data law  L(D) = E + B / D^β
# ----------------------------------------------------------------------------------------------

_DATA_EXPONENT_BOUNDS = [[(0.0, EXP_HI)]]


def _data_grid() -> np.ndarray:
    """The docs/design.md §4.1 grid as natural θ = [e, b, β] rows (150, 3)."""
    return np.array(list(itertools.product(GRID_E, GRID_LOG_COEF, GRID_EXPONENT)))


def _data_problem(tokens: np.ndarray) -> PowerSum:
    return PowerSum([np.log(tokens)[:, None]], _DATA_EXPONENT_BOUNDS)


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
        D = positive_array("predict", "tokens", tokens)
        return to_output(_data_law(D, self.E, self.B, self.beta))

    def interval(self, tokens, level: float = 0.9) -> tuple:
        """Bootstrap `level` confidence band (lo, hi) of the fitted curve at `tokens`."""
        check_level(level)
        check_has_bootstrap(self.bootstrap_params)
        D = positive_array("interval", "tokens", tokens)
        p = self.bootstrap_params.reshape((-1, 3) + (1,) * D.ndim)  # (n_boot, 3, 1, …)
        lo, hi = percentile_band(_data_law(D, p[:, 0], p[:, 1], p[:, 2]), level)
        return to_output(lo), to_output(hi)

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
    """Fit `L(D) = E + B / D^β` to (tokens, loss) points (docs/design.md §4.1).

    Log space, sum of Huber_δ residuals, started from each of the 150 grid points
    e ∈ {−1,…,1}, b ∈ {0,5,…,25}, β ∈ {0,0.5,…,2} (module docstring: vectorised descent, then
    L-BFGS-B polish); bounds β ∈ [0, 3], E ≤ min observed loss. `bootstrap` replicates give
    `interval`; `holdout_error` = max |error| (nats) on the `holdout` largest-token points of a
    fit made without them (same grid), None if fewer than 4 points would remain.
    Needs at least 4 points, every tokens and loss finite and > 0.
    """
    caller = "fit_data_law"
    D = as_vector(caller, "tokens", tokens, sign="> 0")
    L = as_vector(caller, "loss", losses, sign="> 0")
    n = check_lengths(caller, tokens=D, losses=L)
    check_options(caller, n, _MIN_POINTS_DATA, "E + B/D^beta", holdout, bootstrap, huber_delta)
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
        r2=r_squared(L, _data_law(D, E, B, beta)),
        holdout_error=holdout_error(
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
    """Warnings (empty when the fit may be trusted) for a data-law target (docs/design.md §3 B.4, §8).

    With `target = fit.predict(target_tokens)` and `last_loss` the last proxy loss:
    1. `E < target < last_loss`;
    2. `0.05 ≤ β ≤ 2` — stricter than docs/design.md's 0.01 because fits with β ≈ 0.01–0.02 passed
       that bound in the prototype: such a curve is practically a straight line in log D, its
       floor E is not identified, and the "target" is a log-linear extrapolation;
    3. `R² > 0.9` (an undefined R², from all-equal losses, fails);
    4. `target_tokens` beyond the last fitted point (otherwise this is not an extrapolation);
    5. plateau: the predicted drop per decade of tokens from the last fitted point to
       `target_tokens` must be at least 5 % of the fitted drop per decade over the fitted range.
       For a power law and equal spans this ratio is 10^(−β) (0.5 at β = 0.3), so the rule
       flags β > 1.3 there: curves that have all but stopped, like a constant-LR proxy that
       has plateaued, whose target sits just under the last loss (the "too easy" targets of
       docs/design.md §8).
    """
    last_loss = positive_scalar("check_data_law", "last_loss", last_loss)
    target_tokens = positive_scalar("check_data_law", "target_tokens", target_tokens)
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
    if not fit.r2 > R2_MIN:
        warnings.append(f"R² = {fit.r2:.4f} is not above {R2_MIN}: the law does not fit")
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
# Full Chinchilla law  L(N, D) = E + A / N^α + B / D^β
# ----------------------------------------------------------------------------------------------

_CHINCHILLA_EXPONENT_BOUNDS = [[(0.0, EXP_HI)], [(0.0, EXP_HI)]]


def _chinchilla_grid() -> np.ndarray:
    """Hoffmann et al.'s grid as natural θ = [e, a, α, b, β] rows (4500, 5)."""
    axes = (GRID_E, GRID_LOG_COEF, GRID_EXPONENT, GRID_LOG_COEF, GRID_EXPONENT)
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
        N_ = positive_array("predict", "N", N)
        D_ = positive_array("predict", "D", D)
        return to_output(_chinchilla_law(N_, D_, self.E, self.A, self.alpha, self.B, self.beta))

    def interval(self, N, D, level: float = 0.9) -> tuple:
        """Bootstrap `level` confidence band (lo, hi) of the fitted surface at (N, D)."""
        check_level(level)
        check_has_bootstrap(self.bootstrap_params)
        N_, D_ = np.broadcast_arrays(
            positive_array("interval", "N", N), positive_array("interval", "D", D)
        )
        p = self.bootstrap_params.reshape((-1, 5) + (1,) * N_.ndim)
        samples = _chinchilla_law(N_, D_, *(p[:, i] for i in range(5)))
        lo, hi = percentile_band(samples, level)
        return to_output(lo), to_output(hi)

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
    N = as_vector(caller, "params_N", params_N, sign="> 0")
    D = as_vector(caller, "tokens", tokens, sign="> 0")
    L = as_vector(caller, "loss", losses, sign="> 0")
    n = check_lengths(caller, params_N=N, tokens=D, losses=L)
    what = "E + A/N^alpha + B/D^beta"
    check_options(caller, n, _MIN_POINTS_CHINCHILLA, what, holdout, bootstrap, huber_delta)
    order = np.argsort(N * D, kind="stable")
    N, D, L = N[order], D[order], L[order]

    def problem(idx: slice) -> PowerSum:
        return PowerSum(
            [np.log(N[idx])[:, None], np.log(D[idx])[:, None]], _CHINCHILLA_EXPONENT_BOUNDS
        )

    def fit(idx: slice) -> tuple[np.ndarray, float]:
        p, log_y = problem(idx), np.log(L[idx])
        starts = p.screen(_chinchilla_grid(), log_y, huber_delta, N_SCREENED_STARTS)
        return p.fit(starts, log_y, huber_delta)

    theta, f = fit(slice(None))
    nat = _chinchilla_natural(theta)
    boot = problem(slice(None)).bootstrap(theta, np.log(L), bootstrap, seed, huber_delta)
    return ChinchillaFit(
        *(float(x) for x in nat),
        r2=r_squared(L, _chinchilla_law(N, D, *nat)),
        holdout_error=holdout_error(
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
# Fallback
# ----------------------------------------------------------------------------------------------


def loglinear_extrapolate(tokens, losses, target_tokens: float) -> float:
    """Loss at `target_tokens` from a straight line L = a + s·log D through the last half.

    The line is a least-squares fit to the last ⌈n/2⌉ points by tokens (at least 2). The result is
    clamped at 0 (a cross-entropy cannot be negative) and, for a falling line (s ≤ 0), at the
    last observed loss, so the fallback never predicts that a decreasing curve goes back up.
    A rising line (e.g. forgetting on a replay domain) is extrapolated as it is.
    """
    caller = "loglinear_extrapolate"
    D = as_vector(caller, "tokens", tokens, sign="> 0")
    L = as_vector(caller, "loss", losses, sign="> 0")
    n = check_lengths(caller, tokens=D, losses=L)
    if n < 2:
        raise FitError(f"{caller}: got {n} point(s), need at least 2 to draw a line")
    target_tokens = positive_scalar(caller, "target_tokens", target_tokens)
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
