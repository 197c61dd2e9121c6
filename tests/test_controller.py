"""The mixing controller on its own (no model): update schedule, observed domains, and mixing.pace."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from velocitune import mixing
from velocitune.controller import MixingController
from velocitune.dist import DistEnv
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
