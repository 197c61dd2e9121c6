"""The `ado` rule (velocitune/peers/ado.py): weights a distribution, w0 until the first update, the clip, a
domain with more reducible loss gets more weight, and a resumed state continues bit for bit."""

import json

import numpy as np

from velocitune.peers.ado import clip_min_probability, make_ado, target_distribution

NAMES = ["a", "b", "c"]
W0 = np.array([0.5, 0.3, 0.2])


def _losses(step):
    return np.array([0.7 + 3.0 / step ** 0.3, 2.0 + 0.5 / step ** 0.3, 1.0 + 0.1 / step ** 0.3])


def test_clip_and_target_distribution():
    d = clip_min_probability(np.array([0.001, 0.999]), 0.01)
    np.testing.assert_allclose(d, np.array([0.01, 0.999]) / 1.009)
    params = np.array([[2.0, 0.0, 0.4], [0.0, 0.0, 0.4], [-1.0, 0.0, 0.4]])  # same E, α; reducible A_1 > A_2 > A_3
    dist = target_distribution(params, 100.0, np.ones(3) / 3, np.ones(3) / 3, 0.01)
    assert dist[0] > dist[1] > dist[2] >= 0.01 / (1 + 3 * 0.01)
    np.testing.assert_allclose(dist.sum(), 1.0)


def test_weights_are_a_distribution_and_resume_is_bit_identical():
    rule = make_ado("ado", W0, NAMES, refit=10, starts=64)
    np.testing.assert_array_equal(rule.initial_weights(), W0)
    out, states = [], {}
    for step in range(5, 45):
        w = rule.update(step, _losses(step), None, None, sampling_weights=W0).weights
        assert np.all(w > 0) and abs(w.sum() - 1) < 1e-12
        out.append(w)
        if step == 24:
            states = json.loads(json.dumps(rule.state_dict()))
    assert np.abs(out[-1] - W0).max() > 1e-3  # it moved
    again = make_ado("ado", W0, NAMES, refit=10, starts=64)
    again.load_state_dict(states)
    for step in range(25, 45):
        np.testing.assert_array_equal(again.update(step, _losses(step), None, None, sampling_weights=W0).weights,
                                      out[step - 5])


def test_batched_lbfgs_reaches_scipys_minimum_on_a_well_posed_law():
    """fit_laws (all 512 starts at once, our L-BFGS) against scipy's L-BFGS-B from the 8 grid starts of least
    objective on their loss_fn: a law with data on both sides of its bend is well determined, so both reach the
    same minimum (objective to 1e-10, the law at the points to 1e-5, parameters to 1e-3 along the valley)."""
    from scipy.optimize import minimize

    from velocitune.peers.ado import GRID, fit_laws, fit_objective

    rng = np.random.default_rng(1)
    n = np.arange(1, 41) * 640.0
    truth = np.array([[1.5, 0.7, 0.4], [2.0, 0.6, 0.5]])
    y = np.exp(truth[:, 1]) + np.exp(truth[:, 0]) / n[:, None] ** truth[:, 2] + rng.normal(0, 0.005, (40, 2))
    got = fit_laws(n, y)
    for i in range(2):
        ll = np.log(y[:, i])[None]
        fun = lambda x, ll=ll: tuple(v[0] for v in fit_objective(x[None], np.log(n), ll))  # noqa: E731
        score = fit_objective(GRID, np.log(n), np.broadcast_to(ll, (len(GRID), 40)), grad=False)[0]
        best = min((minimize(fun, GRID[j], jac=True, method="L-BFGS-B", options={"maxiter": 200, "gtol": 1e-5})
                    for j in np.argsort(score)[:8]), key=lambda r: r.fun)
        assert abs(fun(got[i])[0] - best.fun) < 1e-10  # of an objective ~4e-4
        np.testing.assert_allclose(got[i], best.x, atol=1e-3)  # a flat valley: 1.4e-4 apart in a, measured
        pred = lambda q: np.exp(q[1]) + np.exp(q[0]) / n ** q[2]  # noqa: E731 (the law at the data points)
        np.testing.assert_allclose(pred(got[i]), pred(best.x), rtol=1e-5)
    assert np.abs(got - truth).max() < 0.2  # and near the truth


def test_velocitune_train_with_ado_moves_the_weights(make_config, capsys):
    """`velocitune train --mixing.rule=ado` on the tiny fixtures (40 steps; start at step 10, refits every 10 steps
    from 32 grid starts to keep it seconds): no record before the first fit, then one per step with moving weights."""
    from velocitune.cli import main
    from velocitune.config import dump_yaml

    cfg = make_config("ado", train={"steps": 40}, mixing={"rule": "ado", "signal": "auto", "interval": None,
                                                         "target_values": None, "warmup": 10, "params": {"refit": 10, "starts": 32}},
                      checkpoint={"interval": 0})
    path = cfg.run.out_dir + ".yaml"
    with open(path, "w") as fh:
        fh.write(dump_yaml(cfg))
    assert main(["train", path]) == 0
    capsys.readouterr()
    records = [json.loads(line) for line in open(f"{cfg.run.out_dir}/mixture.jsonl")]
    steps = [r["step"] for r in records]
    assert steps[0] == 0 and steps[1:] == list(range(11, 40))  # their itr 10 on: the first fit's step
    weights = np.array([list(r["weights"].values()) for r in records[1:]])
    np.testing.assert_allclose(weights.sum(axis=1), 1.0, rtol=1e-12)
    assert np.abs(weights[-1] - np.array(list(records[0]["weights"].values()))).max() > 1e-3  # they moved
    assert all(r["signal"] == "train" for r in records)


def test_ado_refuses_the_eval_signal_and_an_interval():
    import pytest

    from velocitune.config import load_config
    from velocitune.errors import ConfigError
    from velocitune.rules import build_rule

    for flag, match in (("--mixing.signal=eval", "set mixing.signal=train"), ("--mixing.interval=5", "drop mixing.interval")):
        mc = load_config(None, ["--mixing.rule=ado", flag]).mixing
        with pytest.raises(ConfigError, match=match):
            build_rule(mc, W0, NAMES, np.array([5.0, 3.0, 2.0]))
    mc = load_config(None, ["--mixing.rule=ado"]).mixing
    assert mc.signal == "train" and build_rule(mc, W0, NAMES, np.array([5.0, 3.0, 2.0])).starts == 512
