"""The online law (velocitune/laws/online_law.py): recovery of a known law, the prior's role, its inverse, the
own-token area against a brute-force sum."""

import math

import numpy as np
import pytest

from velocitune.laws.cpt_law import lr_areas
from velocitune.laws.online_law import OnlineLaw, fit_online_law, own_area

INIT = 3.0


def _truth(x_ref: float) -> OnlineLaw:
    # E on the fit's grid (E·x_ref = 10^0.5) and β in it: the fit can recover it exactly
    return OnlineLaw(init=INIT, B=-1.2, E=10 ** 0.5 / x_ref, beta=0.5, C=3.0, points=0)


def _schedule(T=400, warmup=20, peak=1e-3):
    t = np.arange(1, T + 1)
    lrs = np.where(t <= warmup, t / warmup * peak, peak * 0.5 * (1 + np.cos(np.pi * (t - warmup) / (T - warmup))))
    S1, S2 = lr_areas(lrs, warmup)
    return lrs, S1, S2


def test_recovers_a_law_it_can_represent_from_early_points_alone():
    lrs, S1, S2 = _schedule()
    w = 0.3
    x_end = w * S1[-1]
    truth = _truth(x_end)
    steps = np.arange(20, 201, 20)  # the first half of the run only
    x, s2 = w * S1[steps - 1], S2[steps - 1]
    y = truth.predict(x, s2)
    wrong_prior = float(truth.predict(x_end, S2[-1])) + 0.3  # the proxy missed by 0.3 nats, not on annealing
    fit = fit_online_law(x, s2, y, INIT, prior_x=x_end, prior_s2=S2[-1], prior_loss=wrong_prior, prior_C=truth.C)
    assert fit.points == steps.size
    end_err = abs(float(fit.predict(x_end, S2[-1]) - truth.predict(x_end, S2[-1])))
    assert end_err < 0.05  # the run's own points overrule a prior 0.3 nats off
    assert np.max(np.abs(fit.predict(x, s2) - y)) < 0.02


def test_without_points_the_law_passes_through_the_prior():
    lrs, S1, S2 = _schedule()
    fit = fit_online_law([], [], [], INIT, prior_x=0.2 * S1[-1], prior_s2=S2[-1], prior_loss=2.4)
    assert fit.points == 0
    assert float(fit.predict(0.2 * S1[-1], S2[-1])) == pytest.approx(2.4, abs=1e-9)
    assert fit.learns and fit.C == 0.0  # the ridge keeps the annealing gain at 0 when nothing asks for it


def test_a_rising_domain_is_forgetting():
    lrs, S1, S2 = _schedule()
    steps = np.arange(20, 201, 20)
    x = 0.05 * S1[steps - 1]
    y = INIT + 0.4 * (1 - (1 + 10 / x[-1] * x) ** -1.0)  # the loss rises as the run goes on
    fit = fit_online_law(x, S2[steps - 1], y, INIT, prior_x=0.05 * S1[-1], prior_s2=S2[-1], prior_loss=INIT + 0.5)
    assert not fit.learns and fit.B > 0
    assert fit.area_for(INIT - 0.01, S2[-1]) == math.inf  # no amount of its own data brings it back to ℓ_init


def test_area_for_inverts_predict():
    law = OnlineLaw(init=INIT, B=-1.0, E=30.0, beta=0.7, C=2.0, points=5)
    s2 = 0.01
    for x in (0.001, 0.05, 0.3, 2.0):
        y = float(law.predict(x, s2))
        assert law.area_for(y, s2) == pytest.approx(x, rel=1e-9)
    assert law.area_for(float(law.predict(0.0, s2)) + 0.1, s2) == 0.0  # reached with no data
    assert law.area_for(INIT - 1.0 - 2.0 * s2 - 1e-6, s2) == math.inf  # below the law's floor


def test_own_area_matches_a_step_by_step_sum():
    rng = np.random.default_rng(0)
    lrs = rng.uniform(1e-4, 1e-3, size=50)
    cum = np.concatenate([[0.0], np.cumsum(lrs)])
    schedule = [(0, rng.dirichlet(np.ones(3))), (7, rng.dirichlet(np.ones(3))), (30, rng.dirichlet(np.ones(3)))]
    for step in (0, 5, 7, 8, 29, 30, 50):
        brute = np.zeros(3)
        for s in range(step):
            w = [w for start, w in schedule if start <= s][-1]
            brute += lrs[s] * w
        np.testing.assert_allclose(own_area(cum, schedule, step), brute, rtol=1e-12, atol=1e-18)


def test_bad_points_are_refused():
    with pytest.raises(ValueError, match="one entry per point"):
        fit_online_law([1.0], [0.0, 0.1], [2.0], INIT, prior_x=1, prior_s2=0, prior_loss=2)
    with pytest.raises(ValueError, match="finite"):
        fit_online_law([1.0], [0.0], [math.nan], INIT, prior_x=1, prior_s2=0, prior_loss=2)
    with pytest.raises(ValueError, match="noise_sd"):
        fit_online_law([], [], [], INIT, prior_x=1, prior_s2=0, prior_loss=2, noise_sd=0.0)


def test_a_prediction_never_goes_below_zero():
    # a fast-falling domain's law may extrapolate below 0 nats; a cross-entropy cannot
    law = OnlineLaw(init=1.0, B=-3.0, E=100.0, beta=1.0, C=0.0, points=5)
    assert float(law.predict(10.0, 0.0)) == 0.0 and float(law.predict(0.0, 0.0)) == 1.0
