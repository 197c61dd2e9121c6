"""Tests for velocitune.mixing: worked vectors from docs/design.md §3, independent references, invariants."""

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from velocitune.errors import CheckpointError, ConfigError, DataError, TrainingError
from velocitune.mixing import (
    PRESETS,
    RULE_PARAMS,
    make_rule,
    normalize,
    replay_weights_from_records,
    update_weights,
    velocity,
)

NAMES = ["math", "code", "replay"]
W = [0.5, 0.3, 0.2]
INIT = [2.0, 1.5, 3.0]
TARGET = [1.6, 1.2, 2.0]
LOSS = [1.8, 1.2, 2.9]
ALL_RULES = list(RULE_PARAMS)


def _rule(name, w0=W, names=NAMES, **params):
    if name == "replay" and "replay_weights" not in params:
        params["replay_weights"] = [0.2, 0.3, 0.5]
    return make_rule(name, w0, names, **params)


def _simplex(k_min=2, k_max=6):
    """Hypothesis strategy: a probability vector with every entry > 0."""
    return st.integers(k_min, k_max).flatmap(
        lambda k: arrays(np.float64, k, elements=st.floats(1e-6, 1.0)).map(lambda a: a / a.sum())
    )


# ---------------------------------------------------------------------------------- worked vectors


def test_worked_vector_velocitune():
    v = velocity(LOSS, INIT, TARGET)
    np.testing.assert_allclose(v, [0.5, 0.0, 0.9], atol=1e-12)
    np.testing.assert_allclose(update_weights(W, v), [0.510035, 0.185611, 0.304353], atol=1e-6)
    upd = _rule("velocitune").update(1, LOSS, INIT, TARGET)
    np.testing.assert_allclose(upd.weights, [0.510035, 0.185611, 0.304353], atol=1e-6)
    np.testing.assert_allclose(upd.velocity, [0.5, 0.0, 0.9], atol=1e-12)
    assert not upd.skipped and upd.guarded == [] and upd.warnings == []


def test_worked_vector_dbl():
    # docs/design.md's dbl vector [0.435400, 0.213885, 0.350715] is the value before smoothing: with
    # c = 1e-4 every entry moves by ~1e-5, beyond the 1e-6 check. So check it at c = 0, and the
    # default c = 1e-4 as exactly (1 - c)·v + c/k of it.
    expected = np.array([0.435400, 0.213885, 0.350715])
    raw = _rule("dbl", smoothing=0.0).update(1, LOSS, None, TARGET)
    np.testing.assert_allclose(raw.weights, expected, atol=1e-6)
    np.testing.assert_allclose(raw.velocity, [0.2, 0.0, 0.9], atol=1e-12)
    default = _rule("dbl").update(1, LOSS, None, TARGET)
    np.testing.assert_allclose(default.weights, (1 - 1e-4) * raw.weights + 1e-4 / 3, atol=1e-12)
    np.testing.assert_allclose(default.weights, (1 - 1e-4) * expected + 1e-4 / 3, atol=1e-6)
    # Below its reference loss a domain is penalised: the authors' code does not clip the excess at 0.
    below = _rule("dbl", smoothing=0.0).update(1, [1.5, 1.2, 2.9], None, TARGET)
    np.testing.assert_allclose(below.velocity, [-0.1, 0.0, 0.9], atol=1e-12)
    ref = np.array(W) * np.exp([-0.1, 0.0, 0.9])
    np.testing.assert_allclose(below.weights, ref / ref.sum(), atol=1e-12)


def test_velocity_matches_independent_loop():
    rng = np.random.default_rng(0)
    for _ in range(50):
        init, target, now = rng.uniform(0.5, 4, 5), rng.uniform(0.5, 4, 5), rng.uniform(0.5, 4, 5)
        floor = 0.1
        ref = []
        for n, i, t in zip(now, init, target):
            den = max(i - t, floor)
            ref.append(min(1.0, max(0.0, (n - t) / den)))
        np.testing.assert_allclose(velocity(now, init, target, floor), ref, atol=1e-12)


def test_relative_floor_uses_median_gap():
    init, target = [2.09, 3.0, 4.0], [2.0, 2.0, 2.0]  # gaps 0.09, 1, 2: median 1
    now = [2.05, 2.5, 3.0]
    # den = max(gap, 0.02, 0.5 * 1) = [0.5, 1, 2]
    np.testing.assert_allclose(
        velocity(now, init, target, relative_floor=0.5), [0.05 / 0.5, 0.5 / 1.0, 1.0 / 2.0], atol=1e-12
    )
    # Default 0 keeps the paper's behaviour: the 0.09 gap makes V a hair trigger.
    np.testing.assert_allclose(velocity(now, init, target)[0], 0.05 / 0.09, atol=1e-12)


def test_velocity_endpoints():
    init, target = np.array([2.0, 3.0, 5.0]), np.array([1.0, 2.5, 4.0])
    np.testing.assert_array_equal(velocity(init, init, target), [1.0, 1.0, 1.0])  # no progress
    np.testing.assert_array_equal(velocity(init + 0.7, init, target), [1.0, 1.0, 1.0])  # forgetting
    np.testing.assert_array_equal(velocity(target, init, target), [0.0, 0.0, 0.0])  # at target
    np.testing.assert_array_equal(velocity(target - 0.3, init, target), [0.0, 0.0, 0.0])  # overshot


@settings(max_examples=100, deadline=None)
@given(
    st.integers(1, 8).flatmap(
        lambda k: st.tuples(*[arrays(np.float64, k, elements=st.floats(0, 1e6)) for _ in range(3)])
    ),
    st.floats(1e-6, 10),
    st.floats(0, 5),
)
def test_velocity_in_unit_interval(losses, floor, rel):
    now, init, target = losses
    v = velocity(now, init, target, floor, relative_floor=rel)
    assert v.shape == now.shape and np.all((v >= 0) & (v <= 1))


# ------------------------------------------------------------------------------ update invariants


@settings(max_examples=100, deadline=None)
@given(_simplex(), st.data(), st.floats(0, 20), st.floats(0, 1))
def test_update_weights_stays_on_simplex(w, data, eta, c):
    s = data.draw(arrays(np.float64, w.size, elements=st.floats(-1e300, 1e300)))
    out = update_weights(w, s, eta, c)
    assert np.all(np.isfinite(out)) and np.all(out >= 0)
    assert abs(out.sum() - 1) < 1e-12


@settings(max_examples=100, deadline=None)
@given(_simplex(), st.data(), st.floats(0.01, 3))
def test_one_update_changes_ratios_by_at_most_e_eta(w, data, eta):
    v = data.draw(arrays(np.float64, w.size, elements=st.floats(0, 1)))
    out = update_weights(w, v, eta)
    change = (out[:, None] / out[None, :]) / (w[:, None] / w[None, :])  # (k, k) ratio changes
    assert np.all(change <= math.exp(eta) * (1 + 1e-9))
    np.testing.assert_allclose(change, np.exp(eta * (v[:, None] - v[None, :])), rtol=1e-9)


@settings(max_examples=100, deadline=None)
@given(_simplex(), st.data(), st.floats(0.01, 3))
def test_updates_are_cumulative(w, data, eta):
    v1 = data.draw(arrays(np.float64, w.size, elements=st.floats(0, 1)))
    v2 = data.draw(arrays(np.float64, w.size, elements=st.floats(0, 1)))
    twice = update_weights(update_weights(w, v1, eta), v2, eta)
    ref = w * np.exp(eta * (v1 + v2))
    np.testing.assert_allclose(twice, ref / ref.sum(), rtol=1e-9, atol=1e-15)


def test_smoothing_mixes_with_uniform():
    raw = update_weights(W, [0.5, 0.0, 0.9])
    np.testing.assert_allclose(update_weights(W, [0.5, 0.0, 0.9], smoothing=0.1), 0.9 * raw + 0.1 / 3, atol=1e-15)


def test_zero_weight_stays_zero_and_underflow_gives_no_nan():
    np.testing.assert_array_equal(update_weights([1.0, 0.0], [0.0, 1.0]), [1.0, 0.0])
    # w·exp(eta·s) underflows to zero for every domain in a naive implementation.
    out = update_weights([1e-300, 1.0], [2000.0, 0.0])
    np.testing.assert_allclose(out, [1.0, 0.0], atol=1e-12)
    out = update_weights([1.0, 0.0], [0.0, 1e308], eta=10.0)
    np.testing.assert_array_equal(out, [1.0, 0.0])


def test_step_zero_is_skipped_for_every_rule():
    for name in ALL_RULES:
        rule = _rule(name)
        before = rule.initial_weights()
        upd = rule.update(0, LOSS, INIT, TARGET)
        assert upd.skipped, name
        np.testing.assert_array_equal(upd.weights, before)
        # and the state did not move: a fresh rule's first update equals this one's
        np.testing.assert_array_equal(
            rule.update(1, LOSS, INIT, TARGET).weights, _rule(name).update(1, LOSS, INIT, TARGET).weights
        )


def test_velocitune_step_zero_reports_velocity_and_guard():
    upd = _rule("velocitune").update(0, INIT, INIT, TARGET)
    np.testing.assert_array_equal(upd.velocity, [1.0, 1.0, 1.0])
    np.testing.assert_array_equal(upd.weights, W)


# ------------------------------------------------------------------------------------------ guard


def test_guard_upweights_a_domain_worse_than_its_target():
    init, target = [2.0, 1.5, 3.0], [2.2, 1.2, 2.0]  # math is predicted to degrade (init < target)
    now = [2.3, 1.2, 2.0]  # math is above its target; the others have reached theirs
    rule = _rule("velocitune")
    upd = rule.update(1, now, init, target)
    assert upd.guarded == ["math"]
    assert len(upd.warnings) == 1 and "'math'" in upd.warnings[0]
    assert upd.weights[0] > W[0]
    # Without the floor the raw ratio flips sign: V = clip(0.1 / -0.2) = 0, no boost at all.
    raw_v = np.clip((np.array(now) - target) / (np.array(init) - target), 0, 1)
    assert raw_v[0] == 0.0
    np.testing.assert_allclose(update_weights(W, raw_v), W, atol=1e-15)
    # The guard is recorded at every update, but the warning is given once.
    again = rule.update(2, now, init, target)
    assert again.guarded == ["math"] and again.warnings == []


def test_guard_at_equal_init_and_target():
    upd = _rule("velocitune").update(1, [1.6, 1.2, 2.0], [1.6, 1.5, 3.0], [1.6, 1.2, 2.0])
    assert upd.guarded == ["math"]


# -------------------------------------------------------------------------------- rule variants


def test_velocitune_no_target_uses_zero_targets():
    rule = _rule("velocitune-no-target")
    assert rule.needs_init and not rule.needs_targets
    upd = rule.update(1, LOSS, INIT, None)
    v = np.clip(np.array(LOSS) / INIT, 0, 1)
    np.testing.assert_allclose(upd.velocity, v, atol=1e-12)
    ref = np.array(W) * np.exp(v)
    np.testing.assert_allclose(upd.weights, ref / ref.sum(), atol=1e-12)


def test_presets_and_overrides():
    assert PRESETS["robust"] == {"smoothing": 0.2, "floor": 0.02} and PRESETS["faithful"]["smoothing"] == 0.0
    v = velocity(LOSS, INIT, TARGET)
    robust = _rule("velocitune", preset="robust").update(1, LOSS, INIT, TARGET).weights
    # (1 − c)·normalize(w·e^V) + c/k written out for the worked vector's inputs
    tilted = np.array(W) * np.exp(v)
    np.testing.assert_allclose(robust, 0.8 * tilted / tilted.sum() + 0.2 / 3, atol=1e-15)
    override = _rule("velocitune", preset="robust", smoothing=1e-4, eta=None).update(1, LOSS, INIT, TARGET)
    np.testing.assert_allclose(override.weights, update_weights(W, v, smoothing=1e-4), atol=1e-15)
    with pytest.raises(ConfigError, match="preset"):
        _rule("velocitune", preset="fast")


def test_min_weight_lifts_by_the_smallest_mix():
    rule = _rule("velocitune", w0=[0.9, 0.08, 0.02], min_weight=0.05)
    upd = rule.update(1, [2.0, 1.2, 2.0], INIT, TARGET)  # V = [1, 0, 0]: the small ones shrink
    unlifted = update_weights([0.9, 0.08, 0.02], [1.0, 0.0, 0.0])
    assert unlifted.min() < 0.05
    assert upd.weights.min() == pytest.approx(0.05, abs=1e-12)  # the smallest λ: exactly at the bound
    lam = (0.05 - unlifted.min()) / (1 / 3 - unlifted.min())
    np.testing.assert_allclose(upd.weights, (1 - lam) * unlifted + lam / 3, atol=1e-12)
    with pytest.raises(ConfigError, match="min_weight"):
        _rule("velocitune", min_weight=0.5)  # above 1/k: impossible


def test_ema_of_velocity():
    rule = _rule("velocitune", ema=0.75)
    v1 = rule.update(1, LOSS, INIT, TARGET).velocity
    np.testing.assert_allclose(v1, velocity(LOSS, INIT, TARGET), atol=1e-15)  # no prior: V itself
    l2 = [2.0, 1.5, 2.0]
    w1 = rule.state_dict()["weights"]
    upd = rule.update(2, l2, INIT, TARGET)
    v_ema = 0.75 * v1 + 0.25 * velocity(l2, INIT, TARGET)
    np.testing.assert_allclose(upd.velocity, v_ema, atol=1e-15)
    np.testing.assert_allclose(upd.weights, update_weights(w1, v_ema), atol=1e-15)


def test_fixed_rules():
    assert np.allclose(_rule("static").update(5, LOSS, None, None).weights, W)
    np.testing.assert_allclose(_rule("uniform").initial_weights(), [1 / 3] * 3)
    tau2 = _rule("temperature", token_counts={"math": 100, "code": 400, "replay": 1600})
    np.testing.assert_allclose(tau2.initial_weights(), np.array([10, 20, 40]) / 70, atol=1e-15)
    # token_counts defaults to w0 (the token shares): w ∝ w0^(1/τ)
    tau4 = _rule("temperature", temperature=4.0)
    ref = np.array(W) ** 0.25
    np.testing.assert_allclose(tau4.initial_weights(), ref / ref.sum(), atol=1e-15)
    np.testing.assert_allclose(_rule("replay").update(3, LOSS, None, None).weights, [0.2, 0.3, 0.5])


def test_w0_by_name():
    rule = make_rule("static", {"code": 0.3, "replay": 0.2, "math": 0.5}, NAMES)
    np.testing.assert_array_equal(rule.initial_weights(), W)
    with pytest.raises(ConfigError, match="missing"):
        make_rule("static", {"code": 0.3, "math": 0.7}, NAMES)


# ------------------------------------------------------------------------------------------- ODM


def test_odm_matches_hand_computation():
    rule = _rule("odm", w0=[0.9, 0.1], names=["a", "b"])
    np.testing.assert_allclose(rule.initial_weights(), [0.9, 0.1])  # starts from w0, as the authors' runs
    # t = 1: ε = min(1/2, sqrt(ln 2 / 2) = 0.589) = 1/2, so p is uniform whatever R is.
    u1 = rule.update(1, [2.0, 1.0], None, None)
    np.testing.assert_allclose(u1.velocity, [0.1 * math.e**2, 0.1 * math.e], rtol=1e-15)
    np.testing.assert_allclose(u1.weights, [0.5, 0.5], atol=1e-15)
    # t = 8: ε = sqrt(ln 2 / 16); R_i = 0.9·R_i + 0.1·e^ℓ_i; p linear in R.
    u2 = rule.update(8, [2.0, 1.0], None, None)
    r = np.array([0.19 * math.e**2, 0.19 * math.e])
    eps = math.sqrt(math.log(2) / 16)
    np.testing.assert_allclose(u2.velocity, r, rtol=1e-14)
    np.testing.assert_allclose(u2.weights, (1 - 2 * eps) * r / r.sum() + eps, atol=1e-14)


def test_odm_unobserved_domain_keeps_its_reward():
    rule = _rule("odm")
    rule.update(5, [1.0, 2.0, 3.0], None, None)
    before = rule.state_dict()["reward"]
    upd = rule.update(6, [1.5, 9.0, 1.5], None, None, observed=[True, False, True])
    assert upd.velocity[1] == before[1]  # the carried-over loss 9.0 is not counted
    np.testing.assert_allclose(upd.velocity[[0, 2]], 0.9 * np.array(before)[[0, 2]] + 0.1 * math.exp(1.5), rtol=1e-14)
    with pytest.raises(ValueError, match="observed"):
        rule.update(7, [1.0, 2.0, 3.0], None, None, observed=[True, False])


def test_odm_nothing_observed_yet_keeps_w0():
    rule = _rule("odm")
    upd = rule.update(3, [1.0, 2.0, 3.0], None, None, observed=[False, False, False])
    np.testing.assert_array_equal(upd.weights, normalize(W))


def test_odm_probabilities_floor_and_higher_loss_gains():
    k = 4
    rule = _rule("odm", w0=[0.25] * 4, names=list("abcd"))
    rng = np.random.default_rng(1)
    for t in range(1, 400):
        losses = np.array([3.0, 1.0, 1.0, 1.0]) + rng.normal(0, 0.05, k)
        p = rule.update(t, losses, None, None).weights
        eps = min(1 / k, math.sqrt(math.log(k) / (k * t)))
        assert np.all(p >= eps - 1e-15) and abs(p.sum() - 1) < 1e-12
    # p ∝ e^ℓ in the limit: e^3 / (e^3 + 3e) ≈ 0.71 before exploration
    assert p[0] > 0.6 and p[0] > p[1:].max()


# -------------------------------------------------------------------------------------- replay


def test_replay_weights_average_and_final():
    def rec(tokens, a, b):
        return {"step": 0, "tokens": tokens, "sampling_weights": {"a": a, "b": b}, "weights": {"a": 0, "b": 1}}

    records = [rec(0, 0.5, 0.5), rec(100, 0.8, 0.2), rec(300, 0.2, 0.8)]
    # held 100, 200 and 100 tokens: a = (50 + 160 + 20) / 400 = 0.575
    np.testing.assert_allclose(
        replay_weights_from_records(records, ["a", "b"], total_tokens=400), [0.575, 0.425], atol=1e-15
    )
    # default end = last record's tokens: (50 + 160) / 300 = 0.7
    np.testing.assert_allclose(replay_weights_from_records(records, ["a", "b"]), [0.7, 0.3], atol=1e-15)
    np.testing.assert_allclose(replay_weights_from_records(records, ["a", "b"], "final"), [0.2, 0.8])
    np.testing.assert_allclose(replay_weights_from_records(records[:1], ["a", "b"]), [0.5, 0.5])
    with pytest.raises(DataError, match="decrease"):
        replay_weights_from_records(records[::-1], ["a", "b"])
    with pytest.raises(DataError, match="record 1"):
        replay_weights_from_records([records[0], {"tokens": 5}], ["a", "b"])
    with pytest.raises(ConfigError, match="mode"):
        replay_weights_from_records(records, ["a", "b"], "mean")


# --------------------------------------------------------------------------------- state and long runs


@pytest.mark.parametrize("name,params", [("velocitune", {"ema": 0.5, "min_weight": 0.05}), ("dbl", {}), ("odm", {})])
def test_state_dict_round_trip_is_bit_identical(name, params):
    rng = np.random.default_rng(2)
    seq = [np.abs(rng.normal(2.0, 0.5, 3)) for _ in range(12)]
    init, target = [2.0, 1.0, 3.0], TARGET  # 'code' is guarded: its warning must not repeat
    a = _rule(name, **params)
    for t, losses in enumerate(seq[:6]):
        a.update(t, losses, init, target)
    b = _rule(name, **params)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    for t, losses in enumerate(seq[6:], start=6):
        ua, ub = a.update(t, losses, init, target), b.update(t, losses, init, target)
        np.testing.assert_array_equal(ua.weights, ub.weights)
        assert ua.warnings == ub.warnings == []


def test_load_state_dict_of_another_rule_fails():
    with pytest.raises(CheckpointError, match="rule 'dbl'"):
        _rule("velocitune").load_state_dict(_rule("dbl").state_dict())


_EXTREME = st.one_of(st.floats(0, 20), st.sampled_from([0.0, 1e-300, 1e-12, 1e6, 1e300, 1.7e308]))


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(ALL_RULES), st.lists(st.lists(_EXTREME, min_size=3, max_size=3), min_size=1, max_size=60))
def test_long_random_sequences_stay_normalised(name, seq):
    rule = _rule(name, eta=3.0) if name == "dbl" else _rule(name)  # dbl: large raw excesses, large η
    init, target = [2.0, 1e-12, 1e300], [1.0, 0.0, 5.0]
    for t, losses in enumerate(seq):
        w = rule.update(t, losses, init, target).weights
        assert np.all(np.isfinite(w)) and np.all(w >= 0) and abs(w.sum() - 1) < 1e-12, (t, w)


def test_starved_domain_recovers():
    rule = _rule("velocitune", w0=[1e-9, 0.5, 0.5 - 1e-9])
    init, target = [2.0, 2.0, 2.0], [1.0, 1.0, 1.0]
    w = rule.initial_weights()
    for t in range(1, 31):  # e^30 · 1e-9 ≈ 1e4: the starved domain ends on top
        new = rule.update(t, [2.0, 1.0, 0.9], init, target).weights  # V = [1, 0, 0]
        assert new[0] > w[0]
        np.testing.assert_allclose(new[0] / new[1], math.e * w[0] / w[1], rtol=1e-9)
        w = new
    assert w[0] > 0.99


# ---------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -0.5])
@pytest.mark.parametrize("name", ["velocitune", "velocitune-no-target", "dbl", "odm", "static"])
def test_bad_losses_raise_training_error_naming_the_domain(name, bad):
    rule = _rule(name)
    with pytest.raises(TrainingError, match="'code'"):
        rule.update(3, [1.8, bad, 2.9], INIT, TARGET)
    with pytest.raises(TrainingError):
        velocity([1.8, bad, 2.9], INIT, TARGET)


def test_bad_init_or_targets_raise_config_error():
    with pytest.raises(ConfigError, match="'replay'"):
        _rule("velocitune").update(1, LOSS, INIT, [1.6, 1.2, math.nan])
    with pytest.raises(ConfigError, match="'math'"):
        _rule("velocitune").update(1, LOSS, [-1.0, 1.5, 3.0], TARGET)


@pytest.mark.parametrize("w", [[0.5, -0.1, 0.6], [0.5, math.nan, 0.5], [0.0, 0.0, 0.0], [1.0, math.inf, 0.0]])
def test_bad_weights_raise(w):
    with pytest.raises(ConfigError):
        normalize(w)
    with pytest.raises(ConfigError):
        update_weights(w, [0.0, 0.0, 0.0])
    with pytest.raises(ConfigError):
        make_rule("static", w, NAMES)


def test_programming_errors_raise_value_error():
    with pytest.raises(ValueError, match="3 domains"):
        _rule("velocitune").update(1, [1.0, 2.0], INIT, TARGET)
    with pytest.raises(ValueError):
        update_weights(W, [0.0, 0.0])
    with pytest.raises(ValueError):
        update_weights(W, [0.0, math.nan, 0.0])
    with pytest.raises(ValueError):
        _rule("static").update(-1, LOSS, None, None)


def test_missing_inputs_raise_config_error():
    with pytest.raises(ConfigError, match="'velocitune' needs target"):
        _rule("velocitune").update(1, LOSS, INIT, None)
    with pytest.raises(ConfigError, match="'velocitune' needs the initial loss"):
        _rule("velocitune").update(1, LOSS, None, TARGET)
    with pytest.raises(ConfigError, match="'dbl' needs target"):
        _rule("dbl").update(1, LOSS, None, None)
    flags = {n: (_rule(n).needs_init, _rule(n).needs_targets) for n in ALL_RULES}
    assert flags == {
        "static": (False, False), "uniform": (False, False), "temperature": (False, False),
        "velocitune": (True, True), "velocitune-no-target": (True, False), "dbl": (False, True),
        "odm": (False, False), "replay": (False, False),
    }


def test_bad_rule_config():
    with pytest.raises(ConfigError, match="did you mean 'odm'"):
        make_rule("odn", W, NAMES)
    with pytest.raises(ConfigError, match="did you mean 'smoothing'"):
        _rule("velocitune", smoothng=0.1)
    with pytest.raises(ConfigError, match="eta"):
        _rule("velocitune", eta=-1)
    with pytest.raises(ConfigError, match="floor"):
        _rule("velocitune", floor=0.0)
    with pytest.raises(ConfigError, match="replay_weights"):
        make_rule("replay", W, NAMES)
    with pytest.raises(ConfigError, match="distinct"):
        make_rule("static", W, ["a", "a", "b"])
