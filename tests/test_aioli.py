"""The `aioli` rule (velocitune/peers/aioli.py): its rounds' timing, the LearnParams maths, its state across a
resume, its config checks, and a short `velocitune train --mixing.rule=aioli` (its authors' update is checked
against a transcription of their code in test_mixing_authors.py)."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from velocitune.config import from_dict
from velocitune.controller import MixingController
from velocitune.errors import ConfigError
from velocitune.peers.aioli import (
    interaction_matrix,
    learn_mixture,
    make_aioli,
    mixture_matrix,
    normalize_interaction,
    resolve_timing,
)
from velocitune.rules import build_rule
from velocitune.sampler import MixtureSampler

NAMES = ["a", "b", "c"]


def test_update_steps_are_each_rounds_start_and_block_ends():
    """k = 3, two sweeps of 2-step blocks (12 steps), rounds of 20 steps, 50 steps: the round starts at 0, 20, 40,
    the learned weights from 12, 32; the last round is cut by the end of the run."""
    rule = make_aioli("aioli", np.ones(3), NAMES, update_steps=20, lp_steps=2, lp_rounds=2)
    want = [*range(0, 13, 2), *range(20, 33, 2), *range(40, 50, 2)]
    assert rule.schedule(0, 50) == want
    assert rule.schedule(5, 50) == [*range(5, 18, 2), *range(25, 38, 2), *range(45, 50, 2)]  # after a warm-up
    assert rule.schedule(50, 50) == []


def test_scaled_defaults_are_the_authors_run_and_fit_short_runs():
    """Their 3-domain run at its length (5000 steps: rounds of 250, blocks of 6, 4 sweeps); a 40-step run keeps one
    sweep of 1-step blocks and one step at the learned weights per round; explicit steps that leave none are refused."""
    t = resolve_timing(0.05, 0.0012, 4, 3, 0, 5000)
    assert (t.round_steps, t.lp_steps, t.lp_rounds) == (250, 6, 4)
    t = resolve_timing(0.05, 0.0012, 4, 3, 0, 40)
    assert (t.round_steps, t.lp_steps, t.lp_rounds) == (4, 1, 1)
    t = resolve_timing(0.05, 0.0012, 4, 4, 0, 400)  # 20-step rounds: 4 sweeps of 4 one-step blocks fit
    assert (t.round_steps, t.lp_steps, t.lp_rounds) == (20, 1, 4)
    with pytest.raises(ConfigError, match="fill the whole round of 12 steps"):
        resolve_timing(12, 2, 2, 3, 0, 100)


def test_learnparams_recovers_a_linear_mixing_law():
    """When every block's loss drop is linear in its mixture (G = A·Mᵀ), the solve returns A exactly; the
    diagonal variant keeps G_ii / f; normalisation gives a non-negative matrix summing to 1."""
    rng = np.random.default_rng(3)
    for k, f in ((2, 0.625), (3, 0.5), (7, 0.75)):
        a = rng.normal(0.0, 0.1, (k, k))
        m = mixture_matrix(k, f)
        np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-15)
        np.testing.assert_allclose(m[1], learn_mixture(k, 1, f), rtol=0)
        np.testing.assert_allclose(interaction_matrix(a @ m.T, f, diagonal=False), a, rtol=1e-10, atol=1e-14)
        np.testing.assert_allclose(interaction_matrix(a, f, diagonal=True), np.diag(np.diag(a) / f), rtol=0)
        np.testing.assert_array_equal(interaction_matrix(a, 1.0, diagonal=False), a)
        n = normalize_interaction(a)
        assert n.min() == 0.0 and abs(n.sum() - 1.0) < 1e-14
    assert np.all(normalize_interaction(np.full((2, 2), -3.0)) == 0)  # 0/0 in theirs: no update here


def _loss(a_true, tokens):
    return 3.0 - a_true @ (1.0 - np.exp(-tokens / 300.0))


def _controller(rule, steps):
    sampler = MixtureSampler(seed=0, global_batch=8, windows_per_domain=[10**6] * 3, initial_weights=[0.5, 0.3, 0.2],
                             max_repetition=1.0, names=NAMES)
    return MixingController(rule, sampler, steps=steps, warmup=0, interval=1, signal="eval", targets=None, seq_len=4,
                            device=torch.device("cpu"), keep_records=True)


def _drive(ctl, tokens, a_true, start, stop):
    for step in range(start, stop):
        tokens += 8 * ctl.plan(step).sampling_weights
        if ctl.due(step + 1):
            ctl.update(step + 1, _loss(a_true, tokens), None)


@pytest.mark.parametrize("cut", [3, 7, 13, 22])  # inside the LearnParams of round 0, at its mix, round 1, its bulk
def test_resume_mid_round_continues_bit_identically(cut):
    """The controller's state through JSON at any step, into a fresh controller and rule: the same records after."""
    a_true = np.array([[0.3, 0.05, 0.0], [0.1, 0.2, 0.02], [0.0, 0.05, 0.4]])
    params = dict(update_steps=12, lp_steps=1, lp_rounds=2, seed=5)
    whole = _controller(make_aioli("aioli", np.array([0.5, 0.3, 0.2]), NAMES, **params), 36)
    tokens = np.zeros(3)
    whole.start(_loss(a_true, tokens))
    _drive(whole, tokens, a_true, 0, 36)

    first = _controller(make_aioli("aioli", np.array([0.5, 0.3, 0.2]), NAMES, **params), 36)
    tokens = np.zeros(3)
    first.start(_loss(a_true, tokens))
    _drive(first, tokens, a_true, 0, cut)
    state = json.loads(json.dumps(first.state_dict()))
    second = _controller(make_aioli("aioli", np.array([0.5, 0.3, 0.2]), NAMES, **params), 36)
    second.load_state_dict(state)
    second.records = copy.deepcopy(first.records)
    _drive(second, tokens, a_true, cut, 36)
    assert second.records == whole.records  # floats compared exactly
    blocks = [(r["step"], r["block"]) for r in whole.records]
    assert blocks[:8] == [(0, "learn"), *((s, "learn") for s in range(1, 6)), (6, "mix"), (12, "learn")]
    assert sum(b == "mix" for _, b in blocks) == 3


def _mc(**mixing):
    return from_dict({"mixing": {"rule": "aioli", **mixing}}).mixing


@pytest.mark.parametrize(("keys", "message"), [
    ({"signal": "train"}, "set mixing.signal=eval"),
    ({"interval": 5}, "drop mixing.interval"),
    ({"ema": 0.3, "params": {"cumulative": 1}}, "exclude each other"),
    ({"params": {"one_hot_factor": 1 / 3}}, "not 1/k"),
    ({"params": {"lp_steps": 2.5}}, "whole number of steps"),
    ({"smoothing": 0.2}, "no parameter"),
])
def test_config_refusals(keys, message):
    with pytest.raises(ConfigError, match=message):
        build_rule(_mc(**keys), np.ones(3) / 3, NAMES, np.ones(3))


def test_defaults_start_from_uniform_and_w0_only_before_the_first_round():
    """Their base is weights_init = ones: the learned weights never depend on w0, which is in force only before
    the first round (their aioli_prior) and the LearnParams blocks are the rule's own mixtures."""
    rule = build_rule(_mc(), np.array([0.7, 0.2, 0.1]), NAMES, np.ones(3))
    assert rule.record_fields() == {"block": "prior"}
    np.testing.assert_allclose(rule.initial_weights(), [0.7, 0.2, 0.1])
    assert rule.eta == 0.1 and rule.ema == 0.5 and rule.f == 0.5 and rule.normalize and not rule.cumulative


def test_velocitune_train_with_aioli_records_the_learnparams_blocks(make_config, capsys):
    """`velocitune train --mixing.rule=aioli` on the tiny fixtures: mixture.jsonl says which blocks were
    LearnParams (their mixtures, one per domain per sweep) and where the learned weights begin; eval.jsonl holds an
    evaluation at the end of every block."""
    from velocitune.cli import main
    from velocitune.config import dump_yaml

    cfg = make_config("aioli", train={"steps": 16}, mixing={"rule": "aioli", "interval": None, "target_values": None,
                                                           "params": {"update_steps": 8, "lp_steps": 1, "lp_rounds": 1}},
                      checkpoint={"interval": 0})
    path = cfg.run.out_dir + ".yaml"
    with open(path, "w") as fh:
        fh.write(dump_yaml(cfg))
    assert main(["train", path, "--mixing.rule=aioli"]) == 0
    capsys.readouterr()
    out = cfg.run.out_dir
    records = [json.loads(line) for line in open(f"{out}/mixture.jsonl")]
    blocks = [(r["step"], r["block"], r.get("learn_domain")) for r in records]
    assert [s for s, _, _ in blocks] == [0, 1, 2, 3, 8, 9, 10, 11]
    assert [b for _, b, _ in blocks] == ["learn"] * 3 + ["mix"] + ["learn"] * 3 + ["mix"]
    assert sorted(d for _, _, d in blocks[:3]) == sorted(d for _, _, d in blocks[4:7]) == ["code", "math", "prose"]
    for r in records[:3]:
        w = r["sampling_weights"]
        assert w[r["learn_domain"]] == 0.5 and sorted(w.values()) == [0.25, 0.25, 0.5]
    mix = records[3]["weights"]
    assert abs(sum(mix.values()) - 1) < 1e-12 and records[3]["velocity"] is not None
    evals = {json.loads(line)["step"] for line in open(f"{out}/eval.jsonl")}
    assert {0, 1, 2, 3, 8, 9, 10, 11, 16} <= evals
