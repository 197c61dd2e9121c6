"""Tests for velocitune.quota, the sampler's pure step recurrence, on its own: ŵ (cap_weights), the grid,
the quotas, and the invariants of iterating `step_quotas` over any weight schedule and allowances.
tests/test_sampler.py checks the same guarantees through MixtureSampler and its caches."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from velocitune.errors import ConfigError, DataExhausted
from velocitune.quota import UNIT, cap_units, cap_weights, check_weights, quantize, quotas, step_quotas
from velocitune.sampler import MixtureSampler

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIG = 10**7  # draws per domain when the allowance must never bind


def int_weights(k: int):
    """Weights with small integer ratios: exact ties and zero shares, the hard cases for rounding."""
    return st.lists(st.integers(0, 6), min_size=k, max_size=k).filter(lambda v: sum(v) > 0)


def replay(weights: dict[int, list], allowance, batch: int, steps: int, floor: float = 0.0):
    """Iterate `step_quotas` from step 0 with the schedule {start_step: w}; the steps made, up to exhaustion.

    Returns (steps as StepQuotas, E(t) per step as exact ints in units (T, k)) — E is rebuilt here from
    the x of every step, independently of the recurrence's own excess.
    """
    allowance = np.asarray(allowance, dtype=np.int64)
    counts = excess = np.zeros(allowance.size, dtype=np.int64)
    w, out, expected, e = None, [], [], np.zeros(allowance.size, dtype=np.int64)
    for t in range(steps):
        w = np.asarray(weights.get(t, w), dtype=np.float64)
        try:
            s = step_quotas(w, allowance, counts, excess, batch, floor)
        except DataExhausted:
            break
        e = e + s.x
        out.append(s)
        expected.append(e)
        counts, excess = s.counts_after, s.excess_after
    return out, np.array(expected).reshape(-1, allowance.size)


def deviation_units(steps, expected) -> np.ndarray:
    """C_d(t)·UNIT − E_d(t) per step, (T, k) int64: exact, in units of 2**-32 samples."""
    counts = np.array([s.counts_after for s in steps]).reshape(-1, expected.shape[1])
    return counts * UNIT - expected


# --------------------------------------------------------------------------- cap_weights


def test_cap_weights_worked_vectors():
    # Domain 0 capped at 0.2: its excess 0.3 goes to domains 1, 2 in proportion 0.3 : 0.2.
    np.testing.assert_allclose(cap_weights([0.5, 0.3, 0.2], [0.2, 1, 1]), [0.2, 0.3 + 0.3 * 0.6, 0.2 + 0.3 * 0.4])
    # Floor 0.05 lifts domain 2; the others shrink by 0.95 / 0.99.
    np.testing.assert_allclose(cap_weights([0.9, 0.09, 0.01], [1, 1, 1], floor=0.05),
                               [0.9 * 0.95 / 0.99, 0.09 * 0.95 / 0.99, 0.05])
    # All the weight sits on a domain capped at 0.25: the rest is spread evenly over the domains with room.
    np.testing.assert_allclose(cap_weights([1, 0, 0], [0.25, 0.5, 0.5]), [0.25, 0.375, 0.375])
    # Cascading caps: capping domain 0 pushes domain 1 over its cap too.
    np.testing.assert_allclose(cap_weights([0.6, 0.3, 0.1], [0.3, 0.4, 1.0]), [0.3, 0.4, 0.3])
    # An exhausted domain (cap 0) gets nothing, even with a floor.
    np.testing.assert_allclose(cap_weights([0.5, 0.49, 0.01], [0, 1, 1], floor=0.1), [0, 0.9, 0.1])


def test_cap_weights_rejects_impossible_inputs():
    with pytest.raises(DataExhausted):
        cap_weights([0.5, 0.5], [0.3, 0.3])
    with pytest.raises(ConfigError):
        cap_weights([0.5, 0.5], [1, 1], floor=0.6)
    with pytest.raises(ConfigError):
        cap_weights([0.5, -0.1], [1, 1])


@FAST
@given(st.data())
def test_cap_weights_properties(data):
    k = data.draw(st.integers(2, 7))
    w = np.array(data.draw(st.lists(st.floats(0, 1), min_size=k, max_size=k)))
    if w.sum() <= 0:
        w[0] = 1.0
    caps = np.array(data.draw(st.lists(st.sampled_from([0.0, 0.01, 0.1, 0.3, 0.5, 1.0]) | st.floats(0, 1),
                                       min_size=k, max_size=k)))
    if caps.sum() < 1:
        caps[np.argmax(caps)] += 1 - caps.sum()
    floor = data.draw(st.sampled_from([0.0, 0.5 / k, 1.0 / k]) | st.floats(0, 1.0 / k))
    p = cap_weights(w, caps, floor)
    assert p.dtype == np.float64 and abs(p.sum() - 1) < 1e-12
    assert np.all(p <= caps + 1e-12) and np.all(p[caps == 0] == 0)
    assert np.all(p[caps > 0] >= np.minimum(floor, caps[caps > 0]) - 1e-12)
    # Capping: domains left below their cap keep the proportions of w.
    p0 = cap_weights(w, caps)
    inner = (w > 1e-12) & (p0 < caps - 1e-9)
    if inner.sum() >= 2:
        ratio = p0[inner] / w[inner]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)
    if np.all(w / w.sum() <= caps):
        np.testing.assert_allclose(p0, w / w.sum(), rtol=1e-12, atol=1e-15)
    # Floor: the domains it does not lift all shrink by one factor mu <= 1.
    f = np.where(caps > 0, np.minimum(floor, caps), 0)
    kept = (p0 > 1e-12) & (p > f + 1e-9)
    if kept.any():
        mu = p[kept] / p0[kept]
        np.testing.assert_allclose(mu, mu[0], rtol=1e-9)
        assert mu[0] <= 1 + 1e-12


def test_check_weights_keeps_the_weights_as_given():
    w = check_weights([3, 1, 0], 3, "weights")
    assert w.dtype == np.float64 and w.tolist() == [3.0, 1.0, 0.0]  # not normalised: the schedule keeps every bit
    with pytest.raises(ValueError, match="1-D vector of 2"):
        check_weights([1, 1, 1], 2, "weights")
    with pytest.raises(ConfigError, match="positive sum"):
        check_weights([0, 0], 2, "weights")


# --------------------------------------------------------------------------- the grid and the quotas


def test_cap_units_clamps_far_caps_to_one_constant():
    # B = 4, k = 2, L = B + k + 1 = 7 samples. Domain 0: 3 draws left, its expectation half a sample
    # past its draws (excess C·UNIT − E = −UNIT/2) -> 2.5 samples of room; domain 1: far from its
    # allowance -> clamped to L exactly, whatever its excess.
    allowance = np.array([10, 10**9])
    caps = cap_units(allowance, np.array([7, 5]), np.array([-UNIT // 2, UNIT // 3]), 4)
    assert caps.tolist() == [3 * UNIT - UNIT // 2, 7 * UNIT]
    assert cap_units(allowance, np.array([7, 10**6]), np.array([-UNIT // 2, -UNIT]), 4)[1] == 7 * UNIT
    # Exhausted domain (no draws left, not behind): no room.
    assert cap_units(np.array([4, 50]), np.array([4, 0]), np.array([0, 0]), 4)[0] == 0


@FAST
@given(st.data())
def test_quantize_sums_to_the_batch_and_respects_caps(data):
    k = data.draw(st.integers(1, 7))
    B = data.draw(st.integers(1, 64))
    w = np.array(data.draw(st.lists(st.floats(0, 1), min_size=k, max_size=k)))
    if w.sum() <= 0:
        w[0] = 1.0
    w_hat = w / w.sum()
    caps = np.full(k, (B + k + 1) * UNIT, dtype=np.int64)
    x = quantize(w_hat, B, caps)
    assert x.dtype == np.int64 and int(x.sum()) == B * UNIT
    assert np.all(np.abs(x - w_hat * B * UNIT) <= 2)  # within a unit of the target (+ its float rounding)
    tight = np.ceil(w_hat * B * UNIT).astype(np.int64)  # caps just at the target
    if tight.sum() >= B * UNIT:
        x = quantize(w_hat, B, tight)
        assert int(x.sum()) == B * UNIT and np.all(x <= tight)


def test_quotas_worked_vectors():
    # B = 4, x = (2, 1.2, .8) samples, nothing owed before: floors (2, 1, 0), one left; deficits reach a
    # sample after (1 − .2)/1.2 = .67 steps for domain 1 and (1 − .8)/.8 = .25 for domain 2: domain 2.
    x = np.array([2 * UNIT, int(1.2 * UNIT), 0])
    x[2] = 4 * UNIT - x[0] - x[1]
    assert quotas(x.copy(), x, 4).tolist() == [2, 1, 1]
    # Earliest deadline, not largest remainder: residuals .5 and .6, but domain 0 grows 10x faster.
    owed = np.array([UNIT // 2, UNIT * 6 // 10, 0])
    x = np.array([UNIT, UNIT // 10, 0])
    assert quotas(owed, x, 1).tolist() == [1, 0, 0]
    # A domain ahead of its expectation (owed < 0) gets nothing; the floors then overshoot B = 2 and the
    # surplus is taken back where the deficit left is smallest (domain 1: residual 0 after its floor).
    owed = np.array([-UNIT, 2 * UNIT, UNIT + UNIT // 2])
    x = np.array([0, UNIT, UNIT])
    q = quotas(owed, x, 2)
    assert q.tolist() == [0, 1, 1] and q.sum() == 2


def test_step_quotas_is_pure():
    w = np.array([0.5, 0.3, 0.2])
    allowance, counts, excess = np.array([20, 9, 30]), np.array([3, 5, 1]), np.array([UNIT // 3, -UNIT // 4, 7])
    before = [a.copy() for a in (w, allowance, counts, excess)]
    a = step_quotas(w, allowance, counts, excess, 4, 0.05)
    b = step_quotas(w, allowance, counts, excess, 4, 0.05)
    for got, want in zip((w, allowance, counts, excess), before):
        np.testing.assert_array_equal(got, want)  # inputs untouched
    for field in ("w_hat", "x", "counts", "counts_after", "excess_after"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert a.counts.sum() == 4 and np.array_equal(a.counts_after, counts + a.counts)
    assert np.array_equal(a.excess_after, excess + a.counts * UNIT - a.x)


# --------------------------------------------------------------------------- invariants of the recurrence


@FAST
@given(st.data())
def test_constant_mixture_stays_within_one_sample(data):
    k = data.draw(st.integers(1, 7))
    B = data.draw(st.integers(1, 24))
    w = data.draw(int_weights(k) | st.lists(st.floats(0.001, 1), min_size=k, max_size=k))
    steps, expected = replay({0: w}, [BIG] * k, B, 40)
    dev = deviation_units(steps, expected)
    assert all(s.counts.sum() == B and s.counts.min() >= 0 for s in steps)
    assert np.abs(dev).max() < UNIT  # exact: within one sample of Σ ŵ·B at every step


def covering_weights(k: int, B: int):
    """Weights whose every share is at least one sample per step (w_d·B >= 1)."""
    free = st.lists(st.integers(0, 5), min_size=k, max_size=k).filter(lambda v: sum(v) > 0)
    return free.map(lambda v: (np.full(k, 1.0 / B) + (1 - k / B) * np.array(v) / sum(v)).tolist())


@FAST
@given(st.data())
def test_within_one_sample_across_weight_changes_when_every_share_covers_a_sample(data):
    k = data.draw(st.integers(1, 6))
    B = data.draw(st.integers(k, 20))
    starts = data.draw(st.sets(st.integers(1, 29), max_size=8))
    schedule = {0: data.draw(covering_weights(k, B)), **{t: data.draw(covering_weights(k, B)) for t in starts}}
    steps, expected = replay(schedule, [BIG] * k, B, 30)
    dev = deviation_units(steps, expected)
    assert np.abs(dev).max() < UNIT
    # The proof's premise: no domain is owed a negative amount (a_d = q·UNIT − excess after >= 0, up to
    # the grid's rounding of a share of exactly one sample), so no step takes a surplus back.
    assert min(int((s.counts * UNIT - s.excess_after).min()) for s in steps) > -k


@FAST
@given(st.data())
def test_never_a_sample_ahead_and_caps_respected_for_any_schedule(data):
    # Weights may jump every step, with zeros; allowances small enough to bind, a floor or not.
    k = data.draw(st.integers(1, 6))
    B = data.draw(st.integers(1, 9))
    allowance = np.array(data.draw(st.lists(st.integers(0, 40), min_size=k, max_size=k)))
    floor = data.draw(st.sampled_from([0.0, 0.5 / k, 1.0 / k]))
    schedule = {t: data.draw(int_weights(k)) for t in [0, *data.draw(st.sets(st.integers(1, 60), max_size=10))]}
    steps, expected = replay(schedule, allowance, B, 10**4, floor)
    dev = deviation_units(steps, expected)
    # The run lasts exactly while a whole batch is left.
    assert len(steps) == allowance.sum() // B
    for s, e in zip(steps, expected):
        assert s.counts.sum() == B and s.counts.min() >= 0
        assert np.all(s.counts_after <= allowance)  # caps: never past the allowance...
        assert np.all(e <= allowance * UNIT)  # ...nor is the expectation
        done = e - s.x >= allowance * UNIT  # expectation already at the allowance before this step
        assert np.all(s.w_hat[done] == 0)  # an exhausted domain gets no share, floor or not
        if floor > 0:  # every domain with room gets at least min(floor, its cap)
            room = (allowance - (s.counts_after - s.counts)) > B + 2 * k
            assert np.all(s.w_hat[room] >= floor - 1e-12)
    if len(steps):
        assert dev.max() < UNIT  # never a whole sample ahead
        assert -dev.min() < max(k - 1, 1) * UNIT  # deficits stay < k − 1 samples (< 1 for k = 1)


def test_exhaustion_is_raised_when_a_batch_cannot_be_filled():
    allowance = np.array([3, 2])
    steps, _ = replay({0: [0.5, 0.5]}, allowance, 2, 10)
    assert len(steps) == 2 and steps[-1].counts_after.tolist() in ([2, 2], [3, 1])
    with pytest.raises(DataExhausted, match="only 1 remain"):
        step_quotas(np.array([0.5, 0.5]), allowance, steps[-1].counts_after, steps[-1].excess_after, 2)


# --------------------------------------------------------------------------- the sampler is this recurrence


@pytest.mark.parametrize("windows, rep, floor", [([BIG] * 4, 1.0, 0.0), ([400, 90, 2500, 60], 1.5, 0.03)])
def test_the_sampler_plans_exactly_the_recurrence(windows, rep, floor):
    # MixtureSampler's caches (cursor, snapshots, ŵ cache, free runs) must not change a single quota.
    rng = np.random.default_rng(5)
    schedule = {0: [0.1, 0.5, 0.2, 0.2], **{int(t): rng.dirichlet(np.ones(4) * 0.7).tolist()
                                             for t in rng.choice(np.arange(1, 250), 8, replace=False)}}
    sampler = MixtureSampler(3, 16, windows, schedule[0], max_repetition=rep, floor=floor)
    steps, _ = replay(schedule, sampler.allowance, 16, 250, floor)
    assert len(steps) >= 100
    for t, s in enumerate(steps):
        if t in schedule and t > 0:
            sampler.set_weights(t, schedule[t])
        plan = sampler.plan(t)
        np.testing.assert_array_equal(plan.counts, s.counts)
        np.testing.assert_array_equal(plan.consumed_after, s.counts_after)
        np.testing.assert_array_equal(plan.sampling_weights, s.w_hat)
