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
    rule = make_ado("ado", W0, NAMES, refit=10)
    np.testing.assert_array_equal(rule.initial_weights(), W0)
    out, states = [], {}
    for step in range(5, 45):
        w = rule.update(step, _losses(step), None, None, sampling_weights=W0).weights
        assert np.all(w > 0) and abs(w.sum() - 1) < 1e-12
        out.append(w)
        if step == 24:
            states = json.loads(json.dumps(rule.state_dict()))
    assert np.abs(out[-1] - W0).max() > 1e-3  # it moved
    again = make_ado("ado", W0, NAMES, refit=10)
    again.load_state_dict(states)
    for step in range(25, 45):
        np.testing.assert_array_equal(again.update(step, _losses(step), None, None, sampling_weights=W0).weights,
                                      out[step - 5])
