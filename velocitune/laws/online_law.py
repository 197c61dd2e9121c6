"""The online law: one domain's loss against the LR area of its own tokens, refitted while the main run trains
(docs/design.md §3, "Online targets").

The anchored CPT law of `cpt_law` with the forward area counted in the domain's own tokens,

    ℓ(x, S2) = ℓ_init + B·(1 − (1 + E·x)^(−β)) − C·S2,    x = Σ_s η_s·w_s,

where w_s is the domain's sampling share at step s (under static w0, x = w0·S1, so the `targets` proxy's law
carries over with E/w0). It is fitted to the run's own validation points and one pseudo-point, the
`targets` proxy's prediction at the static allocation, which is the prior: each point weighs 1/noise_sd²,
the prior 1/prior_sd², and the annealing gain C·S2(T) has a prior of sd `anneal_sd` around the proxy's own
C·S2(T) (`prior_C`: the proxy's fitted C when its predictor was the CPT law, else 0), so that a run whose LR
has not decayed yet does not explain away the prior's miss as annealing it cannot see. For fixed (E, β) the law is linear in
(B, C): the fit is an exhaustive grid over (E, β) with a weighted linear solve at each node (C ≥ 0), so it
is deterministic, cheap (k domains × 100 nodes × n points) and reproducible bit for bit on resume.

Pure numpy in float64: no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# log10 of E·x_ref over the grid (x_ref: the largest area the fit sees) and the exponents β.
_LOG_E_GRID = np.linspace(-2.0, 4.0, 25)
_BETA_GRID = np.array([0.25, 0.5, 1.0, 2.0])


@dataclass(frozen=True)
class OnlineLaw:
    """ℓ(x, S2) = init + B·(1 − (1 + E·x)^(−β)) − C·S2 for one domain; B < 0 for a loss its data lowers."""

    init: float
    B: float
    E: float
    beta: float
    C: float
    points: int  # the run's own points the fit used (0: the prior alone)

    def predict(self, x, s2) -> np.ndarray:
        """The law at areas x (its tokens' LR area) and S2 (the run's annealing area); broadcasts."""
        x, s2 = np.asarray(x, dtype=np.float64), np.asarray(s2, dtype=np.float64)
        # A cross-entropy is >= 0; a law fitted to a fast-falling domain may extrapolate below it (seen on the
        # second domain set's JSON logs): the prediction stops at 0.
        return np.maximum(self.init + self.B * (1.0 - np.power(1.0 + self.E * x, -self.beta)) - self.C * s2, 0.0)

    @property
    def learns(self) -> bool:
        """More of its own data lowers its loss (B < 0). False: a forgetting domain (docs/design.md §3)."""
        return self.B < 0

    def area_for(self, loss: float, s2: float) -> float:
        """The smallest own-token area x at which the law reaches `loss` at annealing area s2: 0 when it is
        reached with no data, inf when no amount of data reaches it (or the domain does not learn)."""
        if float(self.predict(0.0, s2)) <= loss:
            return 0.0
        if not self.learns:
            return math.inf
        # init − b + b·(1 + E·x)^(−β) − C·s2 <= loss  <=>  (1 + E·x)^(−β) <= r, with b = −B > 0.
        b = -self.B
        r = (loss - self.init + b + self.C * s2) / b
        if r <= 0.0:
            return math.inf  # below the law's floor init − b − C·s2
        return (r ** (-1.0 / self.beta) - 1.0) / self.E


def fit_online_law(x: Sequence[float], s2: Sequence[float], losses: Sequence[float], init: float, *,
                   prior_x: float, prior_s2: float, prior_loss: float, prior_C: float = 0.0,
                   noise_sd: float = 0.02, prior_sd: float = 0.1, anneal_sd: float = 0.05) -> OnlineLaw:
    """The MAP fit of the online law to the run's points (x, s2, loss) and the prior pseudo-point.

    x, s2, losses: (n,) the domain's own-token LR area, the annealing area and the validation loss at each
    update so far (n may be 0: the law then passes through the prior). prior_x, prior_s2, prior_loss: the
    static allocation's areas at the end of the run and the proxy's predicted loss there. Minimises
        Σ_j ((ℓ̂_j − ℓ_j)/noise_sd)² + ((ℓ̂(prior) − prior_loss)/prior_sd)² + ((C − prior_C)·prior_s2/anneal_sd)²
    over B (free sign), C ≥ 0 and the (E, β) grid.
    """
    x = np.asarray(x, dtype=np.float64).reshape(-1)
    s2 = np.asarray(s2, dtype=np.float64).reshape(-1)
    y = np.asarray(losses, dtype=np.float64).reshape(-1)
    if not (x.shape == s2.shape == y.shape):
        raise ValueError(f"x, s2 and losses must have one entry per point, got {x.shape}, {s2.shape}, {y.shape}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y)) and np.all(np.isfinite(s2))):
        raise ValueError("the online law's points must be finite")
    for name, v in (("noise_sd", noise_sd), ("prior_sd", prior_sd), ("anneal_sd", anneal_sd)):
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be a positive number, got {v}")
    xs = np.concatenate([x, [prior_x]])  # (n + 1,): the run's points, then the prior's
    ss = np.concatenate([s2, [prior_s2]])
    rise = np.concatenate([y, [prior_loss]]) - init  # ℓ − ℓ_init, what B·f − C·S2 must explain
    wt = np.concatenate([np.full(y.size, 1.0 / noise_sd), [1.0 / prior_sd]])  # row weights (n + 1,)
    x_ref = float(xs.max()) if xs.max() > 0 else 1.0
    ridge = prior_s2 / anneal_sd  # the C row: (C − prior_C)·prior_s2/anneal_sd ~ N(0, 1)
    best: tuple[float, float, float, float, float] | None = None  # (objective, B, E, β, C)
    for log_e in _LOG_E_GRID:
        E = 10.0 ** log_e / x_ref
        for beta in _BETA_GRID:
            f = 1.0 - np.power(1.0 + E * xs, -beta)  # (n + 1,)
            # Weighted rows of [f, −S2] @ (B, C) = rise, plus the ridge row [0, ridge] @ (B, C) = ridge·prior_C.
            A = np.vstack([np.column_stack([f * wt, -ss * wt]), [[0.0, ridge]]])
            b = np.concatenate([rise * wt, [ridge * prior_C]])
            (B, C), *_ = np.linalg.lstsq(A, b, rcond=None)
            if C < 0.0:  # annealing never raises the loss: C = 0 and B alone
                fw = f * wt
                C = 0.0
                B = float(fw @ (rise * wt) / (fw @ fw)) if fw @ fw > 0 else 0.0
            obj = float(np.sum((A @ np.array([B, C]) - b) ** 2))
            if best is None or obj < best[0]:
                best = (obj, float(B), float(E), float(beta), float(C))
    assert best is not None
    _, B, E, beta, C = best
    return OnlineLaw(init=float(init), B=B, E=E, beta=beta, C=C, points=int(y.size))


def own_area(cum_lr: np.ndarray, schedule: Sequence[tuple[int, Sequence[float]]], step: int) -> np.ndarray:
    """Σ_{s < step} η_s·w_s per domain: the LR area of each domain's own tokens after `step` steps, (k,).

    cum_lr: (T + 1,) with cum_lr[t] = Σ_{s < t} η_s (cum_lr[0] = 0). schedule: the sampler's (first step, w)
    entries in step order, each w in force until the next entry's step.
    """
    step = int(min(step, cum_lr.size - 1))
    k = len(schedule[0][1])
    out = np.zeros(k, dtype=np.float64)
    for j, (start, w) in enumerate(schedule):
        end = schedule[j + 1][0] if j + 1 < len(schedule) else step
        a, b = min(int(start), step), min(int(end), step)
        if b > a:
            out += np.asarray(w, dtype=np.float64) * (cum_lr[b] - cum_lr[a])
    return out


__all__ = ["OnlineLaw", "fit_online_law", "own_area"]
