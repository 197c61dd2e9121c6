"""The mixing controller on its own (no model): update timing, from_config, the JSON state round trip, cap
records, observed domains, and mixing.pace."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from velocitune import mixing
from velocitune.controller import MixingController, rule_schedule
from velocitune.dist import DistEnv
from velocitune.errors import ConfigError, TrainingError
from velocitune.sampler import MixtureSampler

B, STEPS = 8, 100
NAMES = ["big", "small"]


def _controller(rule_name: str, pace: bool, windows=(2000, 40), interval: int = 5):
    rule = mixing.make_rule(rule_name, [0.5, 0.5], NAMES)
    sampler = MixtureSampler(seed=0, global_batch=B, windows_per_domain=list(windows), initial_weights=[0.5, 0.5],
                             max_repetition=1.0, names=NAMES)
    c = MixingController(rule, sampler, steps=STEPS, warmup=0, interval=interval, signal="eval",
                         targets=np.array([1.0, 1.0]), seq_len=4, device=torch.device("cpu"), pace=pace)
    c.start(np.array([3.0, 3.0]))
    return c, sampler


def _run(rule_name: str, pace: bool):
    """Drive a controller through STEPS steps with fixed losses; 'small' is always behind its target."""
    c, sampler = _controller(rule_name, pace)
    rule_weights = []
    for step in range(STEPS):
        plan = c.plan(step)
        done = step + 1
        if c.due(done):
            upd = c.update(done, np.array([1.1, 2.9]), plan.sampling_weights)
            rule_weights.append(upd.weights.copy())
    return c, sampler, rule_weights


def test_without_pace_the_small_domain_is_spent_early():
    _, sampler, _ = _run("velocitune", pace=False)
    assert sampler.consumed(STEPS)[1] == 40  # its whole allowance (1 epoch of 40 windows)
    assert sampler.consumed(30)[1] == 40  # ... gone within the first 30 % of the run


def test_pace_spreads_the_allowance_to_the_end_and_leaves_the_rule_alone():
    c, sampler, paced_rule = _run("velocitune", pace=True)
    _, _, free_rule = _run("velocitune", pace=False)
    used = sampler.consumed(STEPS)
    assert used[1] <= 40 and used.sum() == STEPS * B
    # Still sampled in the last tenth of the run, and never ahead of an even spread of what it had.
    assert sampler.consumed(STEPS)[1] - sampler.consumed(90)[1] > 0
    for t in range(0, STEPS + 1, 10):
        assert sampler.consumed(t)[1] <= 40 * t / STEPS + 1  # quotas are whole windows: at most one ahead
    # The rule's state is what it would be without pacing: pacing acts on the sampler only.
    for a, b in zip(paced_rule, free_rule, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pace_applies_from_step_zero_for_fixed_rules_too():
    _, sampler, _ = _run("static", pace=True)
    assert sampler.plan(0).sampling_weights[1] == pytest.approx(40 / (STEPS * B))
    assert sampler.consumed(STEPS)[1] <= 40 and sampler.consumed(STEPS)[1] >= 39


def test_pace_scales_caps_up_together_when_data_cannot_fill_the_run():
    # 500 + 40 windows for 800 slots: the caps sum to < 1, so both domains are spent evenly (the sampler then
    # runs out at the end, as it would without pacing).
    c, _ = _controller("static", pace=True, windows=(500, 40))
    w = c.paced(np.array([0.5, 0.5]), 0)
    np.testing.assert_allclose(w, [500 / 540, 40 / 540], rtol=1e-12)


def test_observed_mask_reaches_odm():
    rule = mixing.make_rule("odm", [0.5, 0.5], NAMES)
    sampler = MixtureSampler(seed=0, global_batch=B, windows_per_domain=[2000, 2000], initial_weights=[0.5, 0.5],
                             names=NAMES)
    c = MixingController(rule, sampler, steps=STEPS, warmup=0, interval=1, signal="train", targets=None,
                         seq_len=4, device=torch.device("cpu"))
    c.start(np.array([3.0, 3.0]))
    c.plan(0)
    c.observe(torch.tensor([8.0, 0.0], dtype=torch.float64), torch.tensor([4.0, 0.0], dtype=torch.float64))
    losses, observed = c.window_losses(DistEnv())
    assert observed.tolist() == [True, False] and losses.tolist() == [2.0, 3.0]  # small keeps ℓ_init
    upd = c.update(1, losses, None, observed=observed)
    assert upd.velocity[1] == 0.0 and upd.velocity[0] == pytest.approx(0.1 * np.exp(2.0))


# ------------------------------------------------------------------------------------------- update timing


def test_updates_fall_from_the_warmup_every_interval_never_at_zero_nor_after_the_end():
    c, _ = _controller("velocitune", pace=False, interval=5)
    c.warmup = 12
    assert [t for t in range(STEPS + 5) if c.due(t)] == [12, 17, 22, 27, 32, 37, 42, 47, 52, 57, 62, 67, 72, 77,
                                                         82, 87, 92, 97]
    c.warmup = 0
    due = [t for t in range(STEPS + 5) if c.due(t)]
    assert due[0] == 5 and 0 not in due and due[-1] == 95  # step 100 ends the run: no update there
    # With weights taking effect one step later (the Trainer callback), the last update must still act.
    assert [t for t in range(90, STEPS + 1) if c.due(t, lag=1)] == [90, 95]
    assert [t for t in range(STEPS) if c.due(t, lag=5)][-1] == 90
    static, _ = _controller("static", pace=False)
    assert not any(static.due(t) for t in range(STEPS + 1))  # a fixed rule never updates


def test_timing_from_the_config_and_the_lr_warmup_given_late(make_config):
    cfg = make_config(mixing={"warmup": None, "interval": None})
    c = _from_config(cfg, steps=1000, lr_warmup=30)
    assert (c.warmup, c.interval) == (30, 10)  # the LR warm-up; steps // 100
    assert _from_config(make_config(mixing={"warmup": 0.1, "interval": 7}), steps=1000, lr_warmup=30).warmup == 100
    odm = make_config(mixing={"rule": "odm", "signal": "train", "interval": None, "target_values": None})
    c = _from_config(odm, steps=1000, lr_warmup=30)
    assert (c.warmup, c.interval) == (20, 1)  # the rule's own: 2 % of the run, every step
    assert _from_config(odm, steps=1000, lr_warmup=30, rule_interval=False).interval == 10
    late = _from_config(cfg, steps=1000, lr_warmup=None)
    with pytest.raises(TrainingError, match="use_lr_warmup"):
        late.due(10)
    late.use_lr_warmup(40)
    assert [t for t in range(61) if late.due(t)] == [40, 50, 60]
    fixed = _from_config(make_config(mixing={"warmup": 5, "interval": None}), steps=1000, lr_warmup=None)
    fixed.use_lr_warmup(40)  # mixing.warmup set: the LR warm-up does not move it
    assert fixed.warmup == 5


# --------------------------------------------------------------------------------------- from_config


def _from_config(cfg, steps=STEPS, lr_warmup=0, **kw):
    names = ["prose", "code", "math"]
    w0 = np.array([0.2, 0.3, 0.5])

    def sampler(w):
        return MixtureSampler(seed=0, global_batch=B, windows_per_domain=[500, 500, 500], initial_weights=w,
                              names=names)

    kw.setdefault("lrs", np.full(steps, 1e-3))
    return MixingController.from_config(cfg.mixing, names, w0, np.array([1e4, 1e4, 1e4]), make_sampler=sampler,
                                        steps=steps, lr_warmup=lr_warmup, seq_len=4, device=torch.device("cpu"), **kw)


def _plan_doc(names):
    per = lambda v: dict(zip(names, v))  # noqa: E731
    return {"domains": names, "budget_tokens": float(STEPS * B * 4), "main_steps": STEPS, "proxy_steps": 10,
            "cost_share": 0.1, "proxy_wall_time_s": 1.0, "law": "mixing", "stage1": "offset", "base": None,
            "objective": per([1, 1, 1]), "max_rise": {}, "mixtures": [], "fits": {},
            "init": per([4.0, 3.5, 3.0]), "recommended": per([0.5, 0.25, 0.25]), "predicted": per([3.0, 2.0, 1.5]),
            "predicted_w0": per([3.1, 2.1, 1.6]), "warnings": []}


def test_from_config_reads_the_plan_once(make_config, tmp_path, monkeypatch):
    from velocitune import runfiles

    names = ["prose", "code", "math"]
    runfiles.write_plan(tmp_path / "plan.json", _plan_doc(names))
    calls = []
    real = runfiles.read_plan
    monkeypatch.setattr(runfiles, "read_plan", lambda *a, **k: calls.append(a) or real(*a, **k))
    cfg = make_config(mixing={"plan": str(tmp_path / "plan.json"), "target_values": None})
    c = _from_config(cfg, budget_tokens=float(STEPS * B * 4))
    assert len(calls) == 1
    # It gave the weights, the targets and ℓ_init.
    np.testing.assert_array_equal(c.rule.initial_weights(), [0.5, 0.25, 0.25])
    np.testing.assert_array_equal(c.sampler.plan(0).sampling_weights, [0.5, 0.25, 0.25])
    np.testing.assert_array_equal(c.targets, [3.0, 2.0, 1.5])
    np.testing.assert_array_equal(c.given_init, [4.0, 3.5, 3.0])
    with pytest.raises(ConfigError, match="was made for a run of 3200 tokens, this run trains 6400"):
        _from_config(cfg, budget_tokens=6400.0)


def test_rules_without_targets_do_not_need_the_targets_file(make_config, tmp_path):
    missing = str(tmp_path / "not-yet" / "targets.json")
    for rule in ("static", "uniform", "temperature", "odm", "velocitune-no-target"):
        signal = "train" if rule == "odm" else "eval"
        c = _from_config(make_config(mixing={"rule": rule, "targets": missing, "target_values": None,
                                             "signal": signal}))
        assert c.targets is None, rule
    # Given target_values, a rule without targets still records them.
    kept = _from_config(make_config(mixing={"rule": "static", "targets": missing}))
    np.testing.assert_array_equal(kept.targets, [3.0, 2.0, 1.5])
    for rule in ("velocitune", "dbl"):
        with pytest.raises(ConfigError, match="not-yet/targets.json' does not exist; run `velocitune targets` first"):
            _from_config(make_config(mixing={"rule": rule, "targets": missing, "target_values": None}))


# ------------------------------------------------------------------------------------- state and records


def _drive(c, steps, losses_of):
    """Train-signal updates over `steps` steps; per step, fixed per-domain sums; returns every update's weights."""
    out = []
    for step in range(steps):
        c.plan(step)
        done = step + 1
        c.observe(*losses_of(step))
        if c.due(done):
            losses, observed = c.window_losses(DistEnv())
            out.append(c.update(done, losses, c.sampler.plan(step).sampling_weights, observed=observed).weights)
    return out


def _train_signal_controller():
    rule = mixing.make_rule("velocitune", [0.5, 0.5], NAMES)
    sampler = MixtureSampler(seed=0, global_batch=B, windows_per_domain=[2000, 2000], initial_weights=[0.5, 0.5],
                             names=NAMES)
    c = MixingController(rule, sampler, steps=STEPS, warmup=3, interval=4, signal="train",
                         targets=np.array([1.0, 1.5]), seq_len=4, device=torch.device("cpu"))
    c.start(np.array([3.0, 3.1]))
    return c


def _sums(step):
    # Irrational-ish float64 sums so that a lossy round trip would show in the last bits.
    return (torch.tensor([np.pi * (40 - step) / 7, np.e * (41 - step) / 3], dtype=torch.float64),
            torch.tensor([16.0, 16.0], dtype=torch.float64))


def test_state_dict_round_trips_through_json_bit_exactly():
    a = _train_signal_controller()
    _drive(a, 10, _sums)
    a.observe(*_sums(10))  # a window in progress: its device sums must survive too
    state = json.loads(json.dumps(a.state_dict()))
    assert isinstance(state["sig_sum"], list) and all(isinstance(v, float) for v in state["sig_sum"])
    b = _train_signal_controller()
    b.load_state_dict(state)
    assert torch.equal(a.sig_sum, b.sig_sum) and torch.equal(a.sig_cnt, b.sig_cnt)
    rest = lambda c: _drive_from(c, 11, 40)  # noqa: E731
    wa, wb = rest(a), rest(b)
    assert len(wa) == len(wb) > 5
    for x, y in zip(wa, wb):
        np.testing.assert_array_equal(x, y)  # bit for bit
    # A checkpoint of velocitune 0.1 held the window as tensors: it still loads.
    old = {**a.state_dict(), "sig_sum": a.sig_sum.clone(), "sig_cnt": a.sig_cnt.clone()}
    c = _train_signal_controller()
    c.load_state_dict(old)
    assert torch.equal(c.sig_sum, a.sig_sum)


def _drive_from(c, first, last):
    out = []
    for step in range(first, last):
        c.plan(step)
        c.observe(*_sums(step))
        if c.due(step + 1):
            losses, observed = c.window_losses(DistEnv())
            out.append(c.update(step + 1, losses, c.sampler.plan(step).sampling_weights, observed=observed).weights)
    return out


def test_a_cap_writes_a_record_at_the_step_it_takes_effect():
    """'small' (40 windows, one epoch) at half of 8 sequences a step is spent after 10 steps: from step 10 on the
    sampler draws from 'big' alone, and a record at step 10 says so (a static rule, which never updates)."""
    rule = mixing.make_rule("static", [0.5, 0.5], NAMES)
    sampler = MixtureSampler(seed=0, global_batch=B, windows_per_domain=[2000, 40], initial_weights=[0.5, 0.5],
                             max_repetition=1.0, names=NAMES)
    c = MixingController(rule, sampler, steps=STEPS, warmup=0, interval=5, signal="eval", targets=None,
                         seq_len=4, device=torch.device("cpu"), keep_records=True)
    c.start(np.array([3.0, 3.0]))
    for step in range(30):
        c.plan(step)
    assert [r["step"] for r in c.records] == [0, 10]
    capped = c.records[1]
    assert capped["sampling_weights"] == {"big": 1.0, "small": 0.0}
    assert capped["weights"] == {"big": 0.5, "small": 0.5}  # the rule's state is unchanged
    assert capped["tokens_per_domain"] == {"big": 40 * 4, "small": 40 * 4}  # after 10 steps of 4 + 4 sequences
    assert capped["tokens"] == 10 * B * 4


class _OwnSchedule(mixing.Rule):
    """A rule that sets its own update steps (the hook aioli uses): it asks for 0, 3 and 10, and says so."""

    def schedule(self, first, steps):
        self.bound = (first, steps)
        return [s for s in (first, first + 3, first + 10) if s < steps]

    def record_fields(self):
        return {"block": f"b{self._updates}"}


def test_a_rule_with_its_own_schedule_is_due_exactly_there():
    rule = _OwnSchedule("static", [0.5, 0.5], NAMES)
    sampler = MixtureSampler(seed=0, global_batch=B, windows_per_domain=[2000, 40], initial_weights=[0.5, 0.5],
                             max_repetition=1.0, names=NAMES)
    c = MixingController(rule, sampler, steps=12, warmup=None, interval=5, signal="eval", targets=None, seq_len=4,
                         device=torch.device("cpu"), keep_records=True)
    c.adaptive = True  # the registry's static is fixed; this stand-in moves
    c.use_lr_warmup(1)  # the schedule is bound once the first update is known
    assert rule.bound == (1, 12)
    assert [t for t in range(13) if c.due(t)] == [1, 4, 11]
    assert [t for t in range(13) if c.due(t, lag=2)] == [1, 4]  # weights effective past the run: not due
    c.start(np.array([3.0, 3.0]))
    assert [r["block"] for r in c.records] == ["b0"]
    # The interval rule of the other rules is untouched: velocitune updates every m from the warm-up.
    v, _ = _controller("velocitune", pace=False)
    assert [t for t in range(1, 30) if v.due(t)] == list(range(5, 30, 5))
    assert rule_schedule(v.rule, 0, STEPS) is None


def test_a_rule_scheduled_at_step_zero_sets_step_zeros_weights():
    from velocitune.peers.aioli import make_aioli

    rule = make_aioli("aioli", [0.5, 0.5], NAMES, update_steps=10, lp_steps=2, lp_rounds=1, one_hot_factor=0.75)
    sampler = MixtureSampler(seed=0, global_batch=B, windows_per_domain=[2000, 2000], initial_weights=[0.5, 0.5],
                             max_repetition=1.0, names=NAMES)
    c = MixingController(rule, sampler, steps=30, warmup=0, interval=5, signal="eval", targets=None, seq_len=4,
                         device=torch.device("cpu"), keep_records=True)
    c.start(np.array([3.0, 2.0]))
    first = c.records[0]
    assert len(c.records) == 1 and first["step"] == 0 and first["block"] == "learn"
    assert sorted(c.plan(0).sampling_weights.tolist()) == [0.25, 0.75]  # the first block's mixture from step 0
    assert first["losses"] == {"big": 3.0, "small": 2.0}  # ℓ_init is the round's starting loss
    assert [t for t in range(31) if c.due(t)] == [2, 4, 10, 12, 14, 20, 22, 24]
