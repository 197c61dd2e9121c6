"""Tests for velocitune.sampler: quotas, caps, exact resume, rank slices, window order, exhaustion, subsets.

Through MixtureSampler and its caches; the pure recurrence alone is tested in tests/test_quota.py, the
permutations in tests/test_permutation.py, and the frozen token stream in tests/test_sampler_stream.py."""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from velocitune.errors import CheckpointError, ConfigError, DataError, DataExhausted
from velocitune.sampler import MixtureSampler, Plan, cap_weights, rank_slice

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BIG = 10**7  # windows per domain when the allowance must never bind


def run(sampler: MixtureSampler, steps: int, changes: dict[int, np.ndarray] | None = None) -> list[Plan]:
    """Plan steps 0..steps-1, applying `changes` {start_step: w} just before their step (as train.py does)."""
    plans = []
    for t in range(steps):
        if changes and t in changes and t > 0:
            sampler.set_weights(t, changes[t])
        plans.append(sampler.plan(t))
    return plans


def deviations(plans: list[Plan], batch: int) -> np.ndarray:
    """C_d(t) − E_d(t) per step, (T, k), with E recomputed here from the reported ŵ: E = Σ ŵ·B."""
    expected = np.cumsum([p.sampling_weights * batch for p in plans], axis=0)
    counts = np.array([p.consumed_after for p in plans])
    return counts - expected


def int_weights(k: int):
    """Weights with small integer ratios: exact ties and zero shares, the hard cases for rounding."""
    return st.lists(st.integers(0, 6), min_size=k, max_size=k).filter(lambda v: sum(v) > 0)


# --------------------------------------------------------------------------- quotas


def test_quota_worked_vector():
    # B = 4, w = (.5, .3, .2): owed (2, 1.2, .8) -> floors (2, 1, 0) + the one left to .8 -> (2, 1, 1);
    # step 1 owes (2, 1.4, .6) -> (2, 1, 1); step 2 (2, 1.6, .4) -> (2, 2, 0); step 3 (2, .8, 1.2) ->
    # (2, 1, 1); step 4 (2, 1, 1) -> (2, 1, 1), where C = E = (10, 6, 4) and the cycle starts again.
    plans = run(MixtureSampler(0, 4, [BIG] * 3, [0.5, 0.3, 0.2]), 10)
    assert [p.counts.tolist() for p in plans] == [[2, 1, 1], [2, 1, 1], [2, 2, 0], [2, 1, 1], [2, 1, 1]] * 2
    assert plans[2].consumed_after.tolist() == [6, 4, 2]
    for p in plans:
        assert np.bincount(p.domains, minlength=3).tolist() == p.counts.tolist()


@FAST
@given(st.data())
def test_constant_mixture_stays_within_one_sample(data):
    k = data.draw(st.integers(1, 7))
    B = data.draw(st.integers(1, 24))
    w = data.draw(int_weights(k) | st.lists(st.floats(0.001, 1), min_size=k, max_size=k))
    plans = run(MixtureSampler(data.draw(st.integers(0, 9)), B, [BIG] * k, w), 40)
    assert all(p.counts.sum() == B and p.counts.min() >= 0 for p in plans)
    assert np.abs(deviations(plans, B)).max() < 1 + 1e-6


def covering_weights(k: int, B: int):
    """Weights whose every share is at least one sample per step (ŵ_d·B >= 1)."""
    free = st.lists(st.integers(0, 5), min_size=k, max_size=k).filter(lambda v: sum(v) > 0)
    return free.map(lambda v: np.full(k, 1.0 / B) + (1 - k / B) * np.array(v) / sum(v))


@FAST
@given(st.data())
def test_within_one_sample_across_weight_changes_when_every_share_covers_a_sample(data):
    k = data.draw(st.integers(1, 6))
    B = data.draw(st.integers(k, 20))
    steps = 30
    starts = sorted(data.draw(st.sets(st.integers(1, steps - 1), max_size=8)))
    changes = {t: data.draw(covering_weights(k, B)) for t in starts}
    plans = run(MixtureSampler(3, B, [BIG] * k, data.draw(covering_weights(k, B))), steps, changes)
    assert np.abs(deviations(plans, B)).max() < 1 + 1e-6


@FAST
@given(st.data())
def test_general_bounds_for_arbitrary_weight_changes(data):
    # Weights may jump every step, with zeros: no domain is ever a sample ahead; deficits stay < k - 1.
    k = data.draw(st.integers(2, 7))
    B = data.draw(st.integers(1, 12))
    steps = 25
    changes = {t: data.draw(int_weights(k)) for t in range(1, steps)}
    plans = run(MixtureSampler(1, B, [BIG] * k, data.draw(int_weights(k))), steps, changes)
    dev = deviations(plans, B)
    assert all(p.counts.sum() == B and p.counts.min() >= 0 for p in plans)
    assert dev.max() < 1 + 1e-6
    assert -dev.min() < k - 1 + 1e-6


def test_within_one_is_impossible_online_for_arbitrary_changes():
    # The docstring's example (k=6, B=5): whatever step 0 does within one sample, a step-1 mixture that
    # puts 1/3 on three of the domains left behind forces a deficit >= 7/6 on one of them.
    w0, B = [Fraction(3, 10)] * 2 + [Fraction(1, 10)] * 4, 5
    e0 = [x * B for x in w0]
    firsts = [q for q in itertools.product(range(3), repeat=6)
              if sum(q) == B and all(abs(c - e) < 1 for c, e in zip(q, e0))]
    assert firsts
    for q0 in firsts:
        behind = [d for d in range(6) if q0[d] < e0[d]][:3]
        e1 = [e + (Fraction(5, 3) if d in behind else 0) for d, e in enumerate(e0)]
        best = min(max(abs(q0[d] + q1[d] - e1[d]) for d in range(6))
                   for q1 in itertools.product(range(B + 1), repeat=6) if sum(q1) == B)
        assert best >= Fraction(7, 6)


# --------------------------------------------------------------------------- purity, resume, ranks


def random_schedule(rng: np.random.Generator, k: int, steps: int, n: int) -> dict[int, np.ndarray]:
    return {int(t): rng.dirichlet(np.ones(k) * 0.7) for t in rng.choice(np.arange(1, steps), n, replace=False)}


def assert_same_plans(a: list[Plan], b: list[Plan]):
    assert len(a) == len(b)
    for p, q in zip(a, b):
        assert p.step == q.step
        for field in ("domains", "windows", "counts", "sampling_weights", "consumed_after"):
            np.testing.assert_array_equal(getattr(p, field), getattr(q, field))


@FAST
@given(st.integers(0, 2**32), st.integers(1, 39), st.integers(0, 10**6))
def test_resume_at_any_step_equals_the_uninterrupted_stream(seed, stop, rng_seed):
    rng = np.random.default_rng(rng_seed)
    k, B, steps = 4, 6, 40
    windows = [37, 5, 300, 11]  # small domains: epochs roll over and allowances bind
    changes = random_schedule(rng, k, steps, 4)
    args = dict(seed=seed, global_batch=B, windows_per_domain=windows, initial_weights=[0.4, 0.3, 0.2, 0.1],
                max_repetition=3.0, floor=0.02)
    full = run(MixtureSampler(**args), steps, changes)
    first = MixtureSampler(**args)
    run(first, stop, changes)
    for t, w in changes.items():  # a weight update decided at the end of step stop-1 is in the checkpoint
        if t == stop:
            first.set_weights(t, w)
    resumed = MixtureSampler(**{**args, "seed": 12345})  # the checkpoint's seed wins
    resumed.load_state_dict(first.state_dict())
    rest = []
    for t in range(stop, steps):
        if t in changes and t > stop:
            resumed.set_weights(t, changes[t])
        rest.append(resumed.plan(t))
    assert_same_plans(full[stop:], rest)


def test_random_access_equals_sequential_across_snapshots():
    rng = np.random.default_rng(0)
    k, B, steps = 5, 3, 2600  # crosses two snapshot points (every 1,024 steps)
    changes = random_schedule(rng, k, steps, 6)
    args = dict(seed=7, global_batch=B, windows_per_domain=[900, 3000, 50, 7000, 2000],
                initial_weights=[0.2] * 5, max_repetition=2.0)
    seq = MixtureSampler(**args)
    plans = run(seq, steps, changes)
    order = rng.permutation(steps)[:40].tolist() + [steps - 1, 0, 1025, 1024, 1023, 2048]
    for t in order:  # the same sampler, jumping back and forth
        assert_same_plans([seq.plan(t)], [plans[t]])
    fresh = MixtureSampler(**args)
    fresh.load_state_dict(seq.state_dict())
    for t in order[:20]:
        assert_same_plans([fresh.plan(t)], [plans[t]])
    np.testing.assert_array_equal(fresh.consumed(steps), plans[-1].consumed_after)
    np.testing.assert_array_equal(fresh.consumed(777), plans[776].consumed_after)


def test_fast_paths_match_the_step_by_step_computation():
    class Reference(MixtureSampler):
        """Every step through cap_weights with that step's caps: no weights cache, no free runs."""

        def _step_weights(self, step, cursor):
            self._weights_cache.clear()
            return super()._step_weights(step, cursor)

        def _free_run_weights(self, cursor, step):
            return None

    rng = np.random.default_rng(1)
    args = dict(seed=3, global_batch=16, windows_per_domain=[400, 90, 2500, 60], initial_weights=[0.1, 0.5, 0.2, 0.2],
                max_repetition=1.5, floor=0.03)
    changes = random_schedule(rng, 4, 250, 8)
    fast, ref = MixtureSampler(**args), Reference(**args)
    plans = run(fast, 250, changes)
    assert_same_plans(plans, run(ref, 250, changes))
    assert plans[-1].consumed_after[3] == 90  # the small domain ran out: caps did bind
    fresh = MixtureSampler(**args)
    fresh.load_state_dict(fast.state_dict())
    np.testing.assert_array_equal(fresh.consumed(250), plans[-1].consumed_after)  # free runs on replay


def test_rank_slices_rebuild_the_global_batch():
    plan = MixtureSampler(0, 12, [50, 80], [0.5, 0.5]).plan(3)
    for world in (1, 2, 3, 4):
        for n_micro in (1, 2, 3):
            if 12 % (world * n_micro):
                with pytest.raises(ConfigError, match="multiple"):
                    rank_slice(12, 0, world, 0, n_micro)
                continue
            parts = [rank_slice(12, r, world, j, n_micro) for r in range(world) for j in range(n_micro)]
            np.testing.assert_array_equal(np.concatenate([plan.domains[s] for s in parts]), plan.domains)
            np.testing.assert_array_equal(np.concatenate([plan.windows[s] for s in parts]), plan.windows)
            assert {s.stop - s.start for s in parts} == {12 // (world * n_micro)}
    with pytest.raises(ValueError):
        rank_slice(12, 2, 2)


# --------------------------------------------------------------------------- windows


def test_no_window_repeats_within_an_epoch():
    windows = [7, 13, 50]
    s = MixtureSampler(5, 8, windows, [0.3, 0.3, 0.4], max_repetition=6.0)  # 420 draws allowed
    # Draws in order: the n-th draw of domain d, for n over several epochs.
    for d, m in enumerate(windows):
        draws = s._windows(np.full(4 * m, d, dtype=np.int64), np.arange(4 * m, dtype=np.int64))
        epochs = draws.reshape(4, m)
        for e in epochs:
            assert sorted(e.tolist()) == list(range(m))
        if m >= 13:
            assert len({tuple(e) for e in epochs}) == 4  # every epoch is reshuffled
    # Through the planner: at every step each window's count is floor(C/W) or one more.
    seen = [np.zeros(m, dtype=np.int64) for m in windows]
    for t in range(52):  # every full batch of the 420 allowed draws
        p = s.plan(t)
        for d, m in enumerate(windows):
            np.add.at(seen[d], p.windows[p.domains == d], 1)
            c = p.consumed_after[d]
            assert seen[d].sum() == c
            assert seen[d].min() == c // m and seen[d].max() == -(-c // m)


def test_large_domain_windows_are_distinct_and_in_range():
    W = 10**8
    s = MixtureSampler(11, 256, [W, 3 * W], [0.5, 0.5])
    plans = [s.plan(t) for t in range(20)]
    for d, Wd in enumerate((W, 3 * W)):
        drawn = np.concatenate([p.windows[p.domains == d] for p in plans])
        assert drawn.size == plans[-1].consumed_after[d]
        assert drawn.min() >= 0 and drawn.max() < Wd and np.unique(drawn).size == drawn.size
        assert drawn.max() > Wd // 2  # spread over the corpus, not its first windows


def test_different_seeds_give_different_streams():
    a = MixtureSampler(0, 32, [1000, 1000], [0.5, 0.5]).plan(0)
    b = MixtureSampler(1, 32, [1000, 1000], [0.5, 0.5]).plan(0)
    assert not np.array_equal(a.windows, b.windows) and not np.array_equal(a.domains, b.domains)


# --------------------------------------------------------------------------- subsample


def test_subsample_is_a_fixed_stratified_subset():
    windows, p = [1000, 37, 5], 0.1
    sizes = [math.ceil(p * w) for w in windows]  # 100, 4, 1
    subsets = []
    for seed in (0, 1, 2):
        s = MixtureSampler(seed, 5, windows, [0.9, 0.08, 0.02], subsample=p, max_repetition=2.0)
        assert s.subset_sizes.tolist() == sizes
        got = []
        for d, m in enumerate(sizes):
            one_epoch = s._windows(np.full(m, d, dtype=np.int64), np.arange(m, dtype=np.int64))
            two_epochs = s._windows(np.full(2 * m, d, dtype=np.int64), np.arange(2 * m, dtype=np.int64))
            assert sorted(two_epochs[m:].tolist()) == sorted(one_epoch.tolist())  # epoch 2: same subset again
            got.append(sorted(one_epoch.tolist()))
        subsets.append(got)
        # Planned windows stay inside the subset.
        for t in range(30):
            plan = s.plan(t)
            for d in range(3):
                assert set(plan.windows[plan.domains == d].tolist()) <= set(got[d])
    assert subsets[0] == subsets[1] == subsets[2]
    # Stratified: exactly one window in each of the m equal blocks of the domain (1000 / 100 = 10 each).
    assert [w // 10 for w in subsets[0][0]] == list(range(100))
    assert len(set(subsets[0][0])) == 100 and len(subsets[0][1]) == 4


def test_subsample_allowance_counts_subset_windows():
    s = MixtureSampler(0, 4, [100, 100], [0.5, 0.5], subsample=0.2, max_repetition=1.0)
    assert s.allowance.tolist() == [20, 20]
    run(s, 10)  # 40 draws = one epoch of both 20-window subsets
    np.testing.assert_allclose(s.epochs(10), [1.0, 1.0])
    with pytest.raises(DataExhausted):
        s.plan(10)


# --------------------------------------------------------------------------- exhaustion


def test_exhaustion_caps_then_stops():
    windows, B = [12, 40], 5
    s = MixtureSampler(0, B, windows, [0.8, 0.2], max_repetition=1.0, names=["math", "code"])
    plans = run(s, 10)  # 52 windows in all: 10 full batches
    counts = np.array([p.consumed_after for p in plans])
    assert counts[-1].tolist() == [12, 38] and np.all(counts <= windows)
    # Independent check of ŵ: w capped at (allowance − E(t−1)) / B, E rebuilt from the reported ŵ.
    expected = np.zeros(2)
    for p in plans:
        ref = cap_weights([0.8, 0.2], (np.array(windows) - expected) / B)
        np.testing.assert_allclose(p.sampling_weights, ref, atol=1e-9)
        expected += p.sampling_weights * B
    assert plans[-1].sampling_weights[0] == 0  # math exhausted: nothing more from it
    assert plans[0].sampling_weights.tolist() == pytest.approx([0.8, 0.2])
    message = r"step 10.*math: 12 windows = 1\.00 epochs.*code: 38 windows.*max_repetition"
    with pytest.raises(DataExhausted, match=message):
        s.plan(10)


@FAST
@given(st.data())
def test_quotas_never_exceed_the_allowance(data):
    k = data.draw(st.integers(1, 5))
    B = data.draw(st.integers(1, 9))
    windows = data.draw(st.lists(st.integers(1, 30), min_size=k, max_size=k))
    rep = data.draw(st.sampled_from([0.5, 1.0, 1.7, 3.0]))
    s = MixtureSampler(0, B, windows, data.draw(int_weights(k)), max_repetition=rep,
                       floor=data.draw(st.sampled_from([0.0, 0.5 / k])))
    allowance = np.array([math.floor(Fraction(str(rep)) * w) for w in windows])
    changes = {t: data.draw(int_weights(k)) for t in data.draw(st.sets(st.integers(1, 60), max_size=5))}
    plans = []
    with pytest.raises(DataExhausted):
        for t in range(10**6):
            if t in changes:
                s.set_weights(t, changes[t])
            plans.append(s.plan(t))
    # Training can go on exactly while a whole batch is left.
    assert len(plans) == allowance.sum() // B
    counts = np.array([p.consumed_after for p in plans]).reshape(-1, k)
    assert np.all(counts <= allowance)
    assert all(p.counts.sum() == B for p in plans)
    if plans:
        assert deviations(plans, B).max() < 1 + 1e-6


# --------------------------------------------------------------------------- schedule and state


def test_set_weights_rules():
    s = MixtureSampler(0, 4, [BIG] * 2, [0.5, 0.5])
    w_hat = s.set_weights(0, [0.75, 0.25])  # replaces the initial weights before anything is planned
    np.testing.assert_allclose(w_hat, [0.75, 0.25])
    s.plan(0)
    s.plan(1)
    with pytest.raises(ValueError, match="already planned"):
        s.set_weights(1, [0.5, 0.5])
    np.testing.assert_allclose(s.set_weights(5, [0.1, 0.9]), [0.1, 0.9])
    np.testing.assert_allclose(s.set_weights(5, [0.2, 0.8]), [0.2, 0.8])  # same start, not planned: replaced
    with pytest.raises(ValueError, match="appended"):
        s.set_weights(4, [0.5, 0.5])
    assert [t for t, _ in s.schedule] == [0, 5]
    np.testing.assert_allclose(s.plan(5).sampling_weights, [0.2, 0.8])
    np.testing.assert_allclose(s.weights_at(4), [0.75, 0.25])
    with pytest.raises(ConfigError):
        s.set_weights(9, [0.0, 0.0])


def test_state_dict_round_trips_and_validates():
    s = MixtureSampler(9, 8, [100, 200], [0.5, 0.5], names=["a", "b"])
    s.set_weights(3, [0.25, 0.75])
    sd = s.state_dict()
    assert set(sd) >= {"seed", "schedule"} and sd["seed"] == 9
    other = MixtureSampler(0, 8, [100, 200], [0.9, 0.1], names=["a", "b"])
    other.load_state_dict(sd)
    assert other.seed == 9 and [t for t, _ in other.schedule] == [0, 3]
    for change in (dict(global_batch=16), dict(windows_per_domain=[100, 201]), dict(subsample=0.5),
                   dict(max_repetition=2.0), dict(names=["a", "c"])):
        args = dict(seed=9, global_batch=8, windows_per_domain=[100, 200], initial_weights=[0.5, 0.5], names=["a", "b"])
        bad = MixtureSampler(**{**args, **change})
        with pytest.raises(CheckpointError, match=next(iter(change))):
            bad.load_state_dict(sd)
    with pytest.raises(CheckpointError):
        other.load_state_dict({**sd, "schedule": [[2, [0.5, 0.5]]]})
    with pytest.raises(CheckpointError):
        other.load_state_dict({"seed": 1})


def test_constructor_errors_name_the_problem():
    with pytest.raises(DataError, match="'tiny'"):
        MixtureSampler(0, 4, [10, 0], [0.5, 0.5], names=["big", "tiny"])
    with pytest.raises(ConfigError, match="sampling_floor"):
        MixtureSampler(0, 4, [10, 10], [0.5, 0.5], floor=0.6)
    with pytest.raises(ConfigError, match="batch_size"):
        MixtureSampler(0, 0, [10, 10], [0.5, 0.5])
    with pytest.raises(ConfigError, match="subsample"):
        MixtureSampler(0, 4, [10, 10], [0.5, 0.5], subsample=0.0)
    with pytest.raises(ConfigError, match="max_repetition"):
        MixtureSampler(0, 4, [10, 10], [0.5, 0.5], max_repetition=0.0)


def test_resume_replay_of_many_steps_is_fast_enough_to_run_here():
    # 20k steps of B=1024 over 20 domains replayed from scratch (a resume); the benchmark times 100k.
    w = np.random.default_rng(0).dirichlet(np.ones(20))
    s = MixtureSampler(0, 1024, [10**8] * 20, w)
    consumed = s.consumed(20_000)
    assert consumed.sum() == 20_000 * 1024
    np.testing.assert_allclose(consumed / (20_000 * 1024), w, atol=1 / (20_000 * 1024))
