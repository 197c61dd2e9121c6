"""Loss as a function of the learning-rate schedule in continual pre-training (docs/design.md §4.2).

- `lr_areas`: the forward area S1 and the annealing area S2 of a schedule, the law's inputs;
- `fit_cpt_law` (`CptLawFit`) and `check_cpt_law`: the anchored law
  `ℓ = ℓ_init + B·(1 − (1 + E·S1)^(−β)) − C·S2` fitted to one domain's proxy-run curve, and
  the checks its target must pass;
- `cpt_full_law`: the full law of Wang, Tissue et al. (2025) that the anchored one specialises.

The anchored law is fitted on the loss scale (it is a sum, not a power sum) by the engine of
`velocitune.laws.solver`, its residual bootstrap included.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.signal import lfilter

from velocitune.errors import FitError
from velocitune.laws.solver import (
    EXP_HI,
    R2_MIN,
    as_vector,
    bootstrap_problem,
    check_has_bootstrap,
    check_lengths,
    check_level,
    check_options,
    fit_problem,
    holdout_error,
    percentile_band,
    positive_scalar,
    r_squared,
    to_output,
)

_MIN_POINTS_CPT = 5


# ----------------------------------------------------------------------------------------------
# Learning-rate areas (docs/design.md §4.2)
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
    phase. docs/design.md's check — 100 steps, 10 warm-up, constant to step 80, linear decay to 1e-4 at
    step 100 — gives S1(100) = 0.08605, S2(80) = 0, S2(90) = 0.0024676, S2(100) = 0.0093904.
    """
    caller = "lr_areas"
    eta = as_vector(caller, "lr", lrs, sign="≥ 0")
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
# LR-aware CPT law (docs/design.md §4.2)
# ----------------------------------------------------------------------------------------------


def cpt_full_law(S1_pt, S2_pt, S1_cpt, S2_cpt, *, L0, A, alpha, C1, C2, B, E, beta):
    """The full CPT law of Wang, Tissue et al. (2025) in the notation of docs/design.md §4.2:

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
    return to_output(
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
        self.hi = np.array([np.inf, _CPT_LOG_E_BOUNDS[1], EXP_HI, c_hi])

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

    Sign convention as in docs/design.md §4.2: B < 0 for a falling loss (−B is the gain as S1 → ∞, before
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
        as_vector("predict", "S1", S1_.ravel(), sign="≥ 0")
        return to_output(
            _cpt_law(S1_, np.asarray(S2, float), self.loss_init, self.B, self.E, self.beta, self.C)
        )

    def interval(self, S1, S2, level: float = 0.9) -> tuple:
        """Bootstrap `level` confidence band (lo, hi) of the fitted curve at (S1, S2)."""
        check_level(level)
        check_has_bootstrap(self.bootstrap_params)
        S1_, S2_ = np.broadcast_arrays(np.asarray(S1, float), np.asarray(S2, float))
        as_vector("interval", "S1", S1_.ravel(), sign="≥ 0")
        p = self.bootstrap_params.reshape((-1, 4) + (1,) * S1_.ndim)
        samples = _cpt_law(S1_, S2_, self.loss_init, *(p[:, i] for i in range(4)))
        lo, hi = percentile_band(samples, level)
        return to_output(lo), to_output(hi)

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
# of a too-short proxy (5 % of the run, studies/target_study.py) asked for 4–7×.
_CPT_MAX_EXTRA_DROP = 3.0


def check_cpt_law(fit: CptLawFit, losses, target: float) -> list[str]:
    """Warnings (empty when the fit may be trusted) for a target of the anchored CPT law.

    `losses` are the proxy's loss points, in order. 1. `R² > 0.9`; 2. the target is positive;
    3. the extrapolation stays plausible: the target lies within 3× the proxy's own movement
    (the range of ℓ_init and its points) of the last proxy loss, in either direction.
    """
    losses = as_vector("check_cpt_law", "losses", np.asarray(losses, dtype=np.float64).ravel(), sign="> 0")
    last = float(losses[-1])
    warnings: list[str] = []
    if not fit.r2 > R2_MIN:
        warnings.append(f"R² = {fit.r2:.4f} is not above {R2_MIN}: the law does not fit")
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
    """Fit the anchored LR-aware CPT law (docs/design.md §4.2) to one domain's proxy-run loss curve.

    `S1`, `S2`: the proxy schedule's areas at the evaluated steps (`lr_areas(...)[k][step − 1]`);
    `losses`: the domain's val loss there; `loss_init`: its loss before CPT, the anchor
    (ℓ = loss_init exactly at S1 = S2 = 0). Objective: sum of Huber_δ on the *loss* scale (δ in
    nats: the law is a sum, not a power sum). Starts: E·max S1 ∈ {1e-2,…,1e4} × β ∈ {0.1,…,2}, with
    B and C by least squares at each; bounds β ∈ [0, 3], E·max S1 ∈ [1e-3, 1e6], C ≥ 0 (C = 0 when
    no point has annealing area: the fit then cannot foresee an anneal's gain). `holdout` = the
    points with the largest S1. Needs at least 5 points.
    """
    caller = "fit_cpt_law"
    s1 = as_vector(caller, "S1", S1, sign="≥ 0")
    s2 = as_vector(caller, "S2", S2, sign="any")
    L = as_vector(caller, "loss", losses, sign="> 0")
    n = check_lengths(caller, S1=s1, S2=s2, losses=L)
    check_options(
        caller, n, _MIN_POINTS_CPT, "the 4-parameter CPT law", holdout, bootstrap, huber_delta
    )
    loss_init = positive_scalar(caller, "loss_init", loss_init)
    if s1.max() <= 0:
        raise FitError(f"{caller}: every S1 is 0; evaluate points after training has started")
    order = np.argsort(s1, kind="stable")
    s1, s2, L = s1[order], s2[order], L[order]

    def fit(idx: slice) -> tuple[_CptProblem, np.ndarray, float]:
        p = _CptProblem(s1[idx], s2[idx], loss_init)
        return (p, *fit_problem(p, p.starts(L[idx]), L[idx], huber_delta))

    def fit_predict_tail(head: slice, tail: slice) -> np.ndarray:
        p, theta, _ = fit(head)
        return _cpt_law(s1[tail], s2[tail], loss_init, *p.natural(theta))

    problem, theta, f = fit(slice(None))
    B, E, beta, C = problem.natural(theta)
    boot = problem.natural(bootstrap_problem(problem, theta, L, bootstrap, seed, huber_delta))
    return CptLawFit(
        B=float(B),
        E=float(E),
        beta=float(beta),
        C=float(C),
        loss_init=loss_init,
        r2=r_squared(L, _cpt_law(s1, s2, loss_init, B, E, beta, C)),
        holdout_error=holdout_error(n, holdout, _MIN_POINTS_CPT, fit_predict_tail, L),
        n_points=n,
        loss=f * huber_delta**2,
        bootstrap_params=boot.reshape(-1, 4),
    )
