"""Quotas: how many sequences of each domain fill one global batch, the sampler's pure step recurrence.

Pure numpy on (k,) arrays, no state, no caching, no I/O: `step_quotas` maps the update state `w`, the
domains' allowances and the state before step t (cumulative draws C(t−1) and their excess over the
expectation) to the step's quotas and the state after it. `velocitune.sampler.MixtureSampler` iterates
it, memoising what repeats (docs/design.md §6 rule 5); tests/test_quota.py checks it alone.

One step t of B sequences:

1. **Caps.** Domain d may still take `A_d − E_d(t−1)` samples (its allowance A_d = floor(max_repetition ·
   W_d) draws, less its expectation so far); `cap_units` expresses that on the grid below.
2. **Weights.** The *sampling* distribution `ŵ(t) = cap_weights(w, caps, floor)` caps every domain at
   that room / B, redistributes the excess and applies the optional floor. `w` and `ŵ` are kept apart:
   only `w` is stored in the schedule, `ŵ` is recomputed.
3. **Expectation.** `x_d = ŵ_d·B` is put on a grid of 2**-32 samples (`quantize`); from there on the
   arithmetic is exact integers, so rounding ties fall the same way on every machine.
   E_d(t) = Σ_{s<=t} x_d(s) is the cumulative expectation, C_d(t) the cumulative draws.
4. **Quotas.** Domain d is owed a_d = E_d(t) − C_d(t−1) and gets floor(a_d) (at least 0); the samples
   still missing go to the domains whose deficit would reach a whole sample soonest, (1 − frac(a_d)) /
   x_d steps away (ties: lower index). Plain largest-remainder is not enough: it hands spare samples to
   slow domains, which then stay ahead for many steps; with B=1 and w ∝ (1,1,1,1,.156,.156) a deficit
   passes one sample. When domains ahead of their expectation get no share (a_d < 0) the floors can add
   up to more than B; the surplus is taken back where it leaves the smallest deficit.

Guarantees (tests/test_quota.py and tests/test_sampler.py check each):
- Σ quotas = B; no quota exceeds the domain's remaining allowance; E_d(t) never exceeds it either;
- C_d(t) − E_d(t) < 1 always: no domain is ever a whole sample ahead of its expectation;
- |C_d(t) − E_d(t)| < 1 at every step when every share is at least one sample per step (ŵ_d·B >= 1),
  across any number of weight changes (proof: no a_d < 0, so no surplus); the same holds for a constant
  mixture of any shares (not proven: property tests and an exhaustive search of small cases);
- in general E_d(t) − C_d(t) < k − 1. Within one sample cannot be promised for arbitrary weight changes
  by any sampler that does not know future weights: with k=6, B=5, w=(.3,.3,.1,.1,.1,.1) then
  (0,0,0,⅓,⅓,⅓), step 0 must leave three domains half a sample ahead and three half behind; step 1 then
  owes the three behind 13/6 each, 2 samples each to stay within one, 6 for 5 slots.

The state between steps is (C, excess) with excess = C·UNIT − E in grid units, both int64 (k,).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from velocitune.errors import ConfigError, DataExhausted

__all__ = ["UNIT", "StepQuotas", "cap_units", "cap_weights", "check_weights", "quantize", "quotas", "step_quotas"]

UNIT = 1 << 32  # grid of the per-step expectations: 2**32 units per sample
_SHIFT = 32  # log2(UNIT): `>> _SHIFT` is floor division by UNIT, also for negative values


# --------------------------------------------------------------------------- the sampling distribution ŵ


def check_weights(weights: Sequence[float] | np.ndarray, k: int | None, what: str) -> np.ndarray:
    """Weights as a new float64 (k,) array, finite, >= 0, positive sum (ConfigError otherwise); not normalised.

    The sampler stores weights exactly as given and normalises them only inside `cap_weights`:
    normalising twice can move the last bit, and a restored schedule must reproduce every bit.
    """
    w = np.array(weights, dtype=np.float64)
    if w.ndim != 1 or (k is not None and w.size != k):
        raise ValueError(f"{what} must be a 1-D vector of {k if k is not None else 'k'} weights, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ConfigError(f"{what} must be finite and >= 0, got {w.tolist()}")
    if math.fsum(w) <= 0:
        raise ConfigError(f"{what} must have a positive sum, got {w.tolist()}")
    return w


def _water_fill(weights: np.ndarray, room: np.ndarray, budget: float) -> np.ndarray:
    """min(room, λ·weights) with λ chosen so the sum is `budget`, or every weighted domain at its room.

    Domains that would pass their room are pinned there and the rest is re-spread in proportion to the
    remaining weights, until none passes. Shapes (k,).
    """
    pinned = np.zeros(weights.shape, dtype=bool)
    while True:
        free = ~pinned & (weights > 0)
        mass = math.fsum(weights[free])
        left = budget - math.fsum(room[pinned])
        if mass <= 0 or left <= 0:
            return np.where(pinned, room, 0.0)
        trial = np.zeros_like(weights)
        trial[free] = weights[free] / mass * left  # w/mass <= 1 on the free domains: no overflow for tiny masses
        over = free & (trial > room)
        if not over.any():
            return np.where(pinned, room, trial)
        pinned |= over


def _apply_floor(p: np.ndarray, caps: np.ndarray, floor: float) -> np.ndarray:
    """max(f, μ·p) with μ <= 1 chosen so the sum is 1; f = min(floor, cap) for non-exhausted domains.

    Shrinking the others (μ <= 1) can only move them further below their caps, so caps still hold.
    """
    f = np.where(caps > 0, np.minimum(floor, caps), 0.0)
    raised = p < f
    while True:
        mass = math.fsum(p[~raised])
        mu = (1.0 - math.fsum(f[raised])) / mass if mass > 0 else 0.0
        more = ~raised & (mu * p < f)
        if not more.any():
            return np.where(raised, f, mu * p)
        raised |= more


def cap_weights(
    weights: Sequence[float] | np.ndarray, caps: Sequence[float] | np.ndarray, floor: float = 0.0
) -> np.ndarray:
    """The sampling distribution ŵ: `weights` capped at `caps`, then floored. float64 (k,), sums to 1.

    weights: the update state w (normalised here). caps: the largest share of a batch each domain may
    take (its remaining allowance / B; 0 = exhausted); they must sum to >= 1. Capped domains' excess is
    redistributed to the others in proportion to their weights (water-filling until no cap is
    violated); if the weighted domains cannot absorb it all, the rest is spread evenly over the domains
    with room left. Then every non-exhausted domain gets at least min(floor, cap), the others shrinking
    proportionally. Exhausted domains get 0.
    """
    w = check_weights(weights, None, "weights")
    w = w / math.fsum(w)
    c = np.asarray(caps, dtype=np.float64)
    if c.shape != w.shape or not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError(f"caps must be finite, >= 0 and of shape {w.shape}, got {c.tolist()}")
    if math.fsum(c) < 1.0 - 1e-12:
        raise DataExhausted(f"the domains' caps sum to {math.fsum(c):.6g} < 1: not enough data left for one batch")
    if not 0.0 <= floor <= 1.0 / w.size:
        raise ConfigError(f"the sampling floor must be in [0, 1/k] = [0, {1.0 / w.size:.4g}], got {floor}")
    out = _water_fill(w, c, 1.0)
    short = 1.0 - math.fsum(out)
    if short > 1e-12:
        room = c - out
        out = out + _water_fill((room > 0).astype(np.float64), room, short)
    if floor > 0:
        out = _apply_floor(out, c, floor)
    return out / math.fsum(out)


# --------------------------------------------------------------------------- the integer recurrence


def cap_units(allowance: np.ndarray, counts: np.ndarray, excess: np.ndarray, batch: int) -> np.ndarray:
    """min(A − E(t−1), L) in units, int64 (k,): the allowance left over the expectation so far.

    allowance A, counts C(t−1), excess C·UNIT − E(t−1): int64 (k,). L = B + k + 1 samples, far above any
    share: the clamp keeps int64 safe for huge allowances and makes the caps of domains far from their
    allowance exactly constant (so a caller can cache ŵ on them). With R = A − C >= B + 2k the unclamped
    value is > L (C − E > −(k − 1)), so it is computed exactly only below that. The caller checks first
    that Σ R >= B (a batch can still be filled).
    """
    k = allowance.size
    remaining = allowance - counts  # (k,) draws left
    return np.minimum(np.minimum(remaining, batch + 2 * k) * UNIT + excess, (batch + k + 1) * UNIT)


def quantize(w_hat: np.ndarray, batch: int, caps: np.ndarray) -> np.ndarray:
    """ŵ·B on the 2**-32 grid: int64 (k,) units summing to exactly B·UNIT, none above `caps` (units).

    Floors first, then one unit each to the largest fractional parts (ties: lower index) among the
    domains below their cap; the caps sum to >= B·UNIT, so there is always room.
    """
    target = w_hat * float(batch * UNIT)
    x = np.minimum(np.floor(target).astype(np.int64), caps)
    short = batch * UNIT - int(x.sum())
    frac = target - np.floor(target)
    idx = np.arange(x.size)
    if short > 0:
        order = np.lexsort((idx, -frac))
        order = order[x[order] < caps[order]]
        x[order[:short]] += 1
    elif short < 0:  # only from float rounding of a sum just above 1: take from the smallest fractions
        order = np.lexsort((idx, frac))
        order = order[x[order] > 0]
        x[order[:-short]] -= 1
    return x


def quotas(owed: np.ndarray, x: np.ndarray, batch: int) -> np.ndarray:
    """Samples per domain for one step: int64 (k,) summing to `batch`.

    owed: a_d = E_d(t) − C_d(t−1) = x − excess; x: this step's expectation x_d; both int64 (k,) in units.
    floor(a_d) clipped at 0, then the missing samples by earliest deadline (see the module docstring);
    if the floors overshoot, take back where the deficit stays smallest.
    """
    q = np.maximum(owed >> _SHIFT, 0)  # floor(a_d) (arithmetic shift = floor division by UNIT), at least 0
    residual = owed - (q << _SHIFT)  # (k,) what stays owed, in units; in [0, UNIT) unless a_d < 0
    short = batch - int(q.sum())
    if short > 0:
        # At least `short` residuals are positive (they sum to >= short·UNIT); only those are eligible,
        # so nobody gets more than ceil(a_d). Deadline: steps until the deficit reaches one sample;
        # a deficit with no share never grows (1e300), the ineligible come last (inf).
        positive = residual > 0
        deadline = np.where(positive & (x > 0), (UNIT - residual) / np.maximum(x, 1),
                            np.where(positive, 1e300, np.inf))
        q[np.argsort(deadline, kind="stable")[:short]] += 1  # stable: ties go to the lower index
    for _ in range(-short):
        d = int(np.argmin(np.where(q > 0, residual, np.iinfo(np.int64).max)))
        q[d] -= 1
        residual[d] += UNIT
    return q


# --------------------------------------------------------------------------- one whole step


@dataclass(frozen=True)
class StepQuotas:
    """One step of the recurrence: what it drew and the state after it. Arrays (k,)."""

    w_hat: np.ndarray  # float64: the sampling distribution ŵ(t)
    x: np.ndarray  # int64 units: the step's expectation ŵ·B on the grid, Σ = B·UNIT
    counts: np.ndarray  # int64: the step's quotas q(t), Σ = B
    counts_after: np.ndarray  # int64: C(t) = C(t−1) + q(t)
    excess_after: np.ndarray  # int64 units: C(t)·UNIT − E(t)


def step_quotas(w: np.ndarray, allowance: np.ndarray, counts: np.ndarray, excess: np.ndarray,
                batch: int, floor: float = 0.0) -> StepQuotas:
    """One step from the state before it: caps -> ŵ -> x -> quotas -> state after. Pure; inputs untouched.

    w: the update state in effect (float64 (k,), not normalised); allowance A, counts C(t−1), excess
    C(t−1)·UNIT − E(t−1): int64 (k,). Start a run from counts = excess = 0. DataExhausted when the draws
    left (Σ (A − C)) cannot fill a batch.
    """
    left = int((allowance - counts).sum())
    if left < batch:
        raise DataExhausted(f"a batch needs {batch} sequences but only {left} remain within the allowances")
    caps = cap_units(allowance, counts, excess, batch)  # (k,) units
    w_hat = cap_weights(w, caps / float(batch * UNIT), floor)  # (k,) shares, each <= its cap
    x = quantize(w_hat, batch, caps)  # (k,) units, Σ = B·UNIT
    q = quotas(x - excess, x, batch)  # owed a = E(t) − C(t−1) = x − excess
    return StepQuotas(w_hat, x, q, counts + q, excess + (q << _SHIFT) - x)
