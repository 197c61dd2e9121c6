"""Online targets, max_rise floors and forgetting domains (velocitune/online.py, mixing.lift_to_floors, the
controller's guidance): invariants, hand-checked floors, and resume bit for bit."""

import json

import numpy as np
import pytest

from velocitune import mixing
from velocitune.config import MixingConfig
from velocitune.controller import MixingController
from velocitune.online import OnlineTargets
from velocitune.sampler import MixtureSampler

NAMES = ["replay", "code", "prose"]
W0 = np.array([0.05, 0.35, 0.60])
STEPS, B = 200, 8


# --------------------------------------------------------------------------------------- lift_to_floors


@pytest.mark.parametrize("seed", range(20))
def test_lift_to_floors_invariants(seed):
    rng = np.random.default_rng(seed)
    w = rng.dirichlet(np.ones(5))
    floors = rng.dirichlet(np.ones(5)) * rng.uniform(0.2, 0.95)
    out, ok = mixing.lift_to_floors(w, floors)
    assert ok and out.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.all(out >= floors - 1e-12)
    free = out > floors + 1e-12  # the domains not held at their floor keep their ratios
    if free.sum() >= 2:
        ratio = out[free] / w[free]
        assert np.ptp(ratio) < 1e-9 * ratio.max()
    assert np.all(out[~free] == pytest.approx(floors[~free], abs=1e-12)) if (~free).any() else True


def test_pinned_domains_are_held_at_their_floor():
    # replay pinned at 0.05 although the update gave it 0.3; the others share 0.95 as 0.5 : 0.2
    out, ok = mixing.lift_to_floors([0.3, 0.5, 0.2], [0.05, 0.0, 0.0], pinned=[True, False, False])
    assert ok
    np.testing.assert_allclose(out, [0.05, 0.95 * 5 / 7, 0.95 * 2 / 7], atol=1e-12)


def test_lift_to_floors_by_hand_and_infeasible():
    out, ok = mixing.lift_to_floors([0.7, 0.2, 0.1], [0.0, 0.0, 0.4])
    # 0.4 to the floored domain, the other 0.6 shared 0.7 : 0.2
    np.testing.assert_allclose(out, [0.6 * 7 / 9, 0.6 * 2 / 9, 0.4], atol=1e-12)
    assert ok
    out, ok = mixing.lift_to_floors([0.5, 0.5], [0.8, 0.6])
    assert not ok
    np.testing.assert_allclose(out, [0.8 / 1.4, 0.6 / 1.4])


# --------------------------------------------------------------------------------------- OnlineTargets


def _lrs():
    t = np.arange(STEPS)
    return 1e-3 * 0.5 * (1 + np.cos(np.pi * t / STEPS))


def _tracker(prior=(3.4, 2.0, 2.5), init=(3.3, 3.0, 3.2)):
    return OnlineTargets(NAMES, np.array(init), np.array(prior), W0, _lrs(), 0)


def test_floors_keep_a_domain_within_max_rise_of_its_static_prediction():
    tr = _tracker()
    schedule = [(0, W0.copy())]
    for step in (20, 40, 60):
        tr.observe(step, np.array([3.31, 3.0 - step / 200, 3.2 - step / 150]), schedule)
    laws, static = tr.laws(), tr.static_predictions()
    max_rise = np.full(3, 0.03)
    floors = tr.floors(60, max_rise, schedule)
    s2_end = tr.s2[-1]
    for i, law in enumerate(laws):
        if not law.learns:
            assert floors[i] == W0[i]  # a forgetting domain keeps its corpus share
            continue
        if floors[i] > 0:
            # at its floor share from step 60 on, the domain ends exactly max_rise above static
            end = tr.end_area(60, np.where(np.arange(3) == i, floors[i], 0.0), schedule)[i]
            assert float(law.predict(end, s2_end)) == pytest.approx(static[i] + 0.03, abs=1e-9)
    assert tr.forgetting().tolist() == [not law.learns for law in laws]


def test_mixture_aware_target_falls_with_more_data_for_a_learning_domain():
    tr = _tracker()
    schedule = [(0, W0.copy())]
    for step in (20, 40, 60):
        tr.observe(step, np.array([3.31, 3.0 - step / 200, 3.2 - step / 150]), schedule)
    lo = tr.targets(60, np.array([0.05, 0.2, 0.75]), schedule)
    hi = tr.targets(60, np.array([0.05, 0.5, 0.45]), schedule)
    assert tr.laws()[1].learns and hi[1] < lo[1]  # more code data: a lower predicted final code loss
    assert hi[2] > lo[2]


def test_too_few_points_use_the_prior_alone():
    tr = _tracker()
    tr.observe(20, np.array([3.31, 2.9, 3.1]), [(0, W0.copy())])
    np.testing.assert_allclose(tr.static_predictions(), [3.4, 2.0, 2.5], atol=1e-9)
    assert all(law.points == 0 for law in tr.laws())


# --------------------------------------------------------------------------------------- the controller


def _controller(keep_records=False, **mixing_keys):
    mc = MixingConfig(**{"target_values": {"replay": 3.45, "code": 2.0, "prose": 2.6}, **mixing_keys})

    def sampler(w):
        return MixtureSampler(seed=0, global_batch=B, windows_per_domain=[10_000] * 3, initial_weights=w, names=NAMES)

    c = MixingController.from_config(mc, NAMES, W0, np.array([1e5, 1e6, 2e6]), make_sampler=sampler, steps=STEPS,
                                     lr_warmup=0, seq_len=16, device=None, lrs=_lrs(), keep_records=keep_records)
    return c


def _losses(step):
    # replay forgets (rises), code learns fast, prose slowly
    return np.array([3.3 + 0.15 * step / STEPS, 3.0 - 0.9 * step / STEPS, 3.2 - 0.4 * step / STEPS])


def _drive(c, upto, start=None):
    if start is None:
        c.start(np.array([3.3, 3.0, 3.2]))
    for t in range(1 if start is None else start, upto):
        if c.due(t):
            c.update(t, _losses(t), c.sampler.plan(t - 1).sampling_weights)
    return c


def test_default_config_refits_targets_and_records_them():
    c = _drive(_controller(), STEPS)
    assert c.online is not None and c.max_rise is not None and c.max_rise[0] == 0.03
    assert len(c.online.points) >= 10
    # the prior (target_values) moved: the run's own points say code goes lower than 2.0 predicted...
    assert not np.allclose(c.targets_now, [3.45, 2.0, 2.6])
    # ...and the forgetting replay slice never pulls the rule's weight: it keeps exactly its corpus share
    assert c.online.forgetting()[0]
    assert c.weights()[0] == pytest.approx(W0[0], abs=1e-12)


def test_forgetting_domain_with_fixed_targets_takes_the_weight_and_online_does_not():
    fixed = _drive(_controller(online=False), STEPS)
    online = _drive(_controller(), STEPS)
    # the old guard: replay above its (higher) target has V = 1 and grows; online: V = 0 and its floor, w0
    assert fixed.weights()[0] > 3 * W0[0]
    assert online.weights()[0] == pytest.approx(W0[0], abs=1e-12)


def test_records_carry_the_refits():
    c = _drive(_controller(keep_records=True), STEPS)
    last = c.records[-1]
    assert set(last["static_prediction"]) == set(NAMES) and set(last["floors"]) == set(NAMES)
    assert last["forgetting"] == ["replay"]
    assert last["laws"]["code"]["points"] >= 3
    assert last["targets"] == dict(zip(NAMES, c.targets_now.tolist()))
    # the targets moved between updates: they are refitted, not fixed
    assert len({tuple(r["targets"].values()) for r in c.records[1:]}) > 5


def test_objective_moves_weight_to_the_domains_the_user_weighs():
    plain = _drive(_controller(online=False, rule="velocitune"), STEPS)
    code = _drive(_controller(online=False, objective={"replay": 0.0, "code": 1.0, "prose": 0.0}), STEPS)
    assert code.weights()[1] > plain.weights()[1]


def test_resume_reproduces_the_refits_bit_for_bit():
    whole = _drive(_controller(), STEPS)
    first = _drive(_controller(), 100)
    state = json.loads(json.dumps(first.state_dict()))
    second = _controller()
    second.load_state_dict(state)
    _drive(second, STEPS, start=100)
    assert second.weights().tolist() == whole.weights().tolist()
    assert second.targets_now.tolist() == whole.targets_now.tolist()
    assert second.online.points == whole.online.points


def test_online_and_max_rise_act_on_velocitune_only():
    from velocitune.config import from_dict
    from velocitune.errors import ConfigError

    # like the shared keys, other rules ignore them: a sweep may cross static with a velocitune config
    assert _controller(rule="dbl", online=True).online is None
    assert _controller(online=False, max_rise=0.05).max_rise is None  # nothing predicts the static loss
    with pytest.raises(ConfigError, match="max_rise"):
        from_dict({"mixing": {"max_rise": -0.1}})
    assert from_dict({"mixing": {"max_rise": float("inf")}}).mixing.max_rise == float("inf")
    from velocitune.config import load_config

    assert load_config(None, ["--mixing.max_rise=inf"]).mixing.max_rise == float("inf")  # as the CLI gives it
    with pytest.raises(ConfigError, match="finite"):
        load_config(None, ["--train.lr=inf"])
    assert from_dict({"mixing": {"rule": "static"}}).mixing.online is False


def test_a_run_from_before_online_targets_resumes_only_as_it_ran():
    from velocitune.config import Config, check_resume_config, from_dict, to_dict
    from velocitune.errors import ConfigError

    now = to_dict(from_dict({"mixing": {"signal": "eval"}}))  # today's default: online, max_rise 0.03
    saved = to_dict(Config())
    for key in ("online", "max_rise"):
        del saved["mixing"][key]  # a 0.2 config.yaml has neither key
    saved["mixing"]["signal"] = "eval"
    with pytest.raises(ConfigError, match=r"mixing\.online: False -> True"):
        check_resume_config(saved, now)
    check_resume_config(saved, to_dict(from_dict({"mixing": {"signal": "eval", "online": False}})))


def test_the_start_warning_says_what_happens_to_a_forgetting_domain():
    c = _controller()
    warnings = c.start(np.array([3.3, 3.0, 3.2]))  # replay's target 3.45 > ℓ_init 3.3
    assert any("keeps its corpus share" in w for w in warnings), warnings
    assert not any("upweighted while above its target" in w for w in warnings)
    fixed = _controller(online=False)
    assert any("upweighted while above its target" in w for w in fixed.start(np.array([3.3, 3.0, 3.2])))
