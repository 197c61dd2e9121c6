"""Tests for velocitune.laws.mixture_law: recovery of known D-CPT, mixing and share laws, and suggest_domain_share.

Tolerances on noisy recoveries were measured first with the fixed seeds used here; the measured
values are written next to each tolerance.
"""

import numpy as np
import pytest

from velocitune.errors import FitError
from velocitune.laws import fit_dcpt_law, fit_mixing_law, fit_share_law, suggest_domain_share
from velocitune.laws.mixture_law import SHARE_EPS

# ------------------------------------------------------------------------------------------------
# helpers (independent of the module's internals)
# ------------------------------------------------------------------------------------------------


def dcpt_law(D, r, E, B, eta, beta, C, gamma, eps=0.01):
    return E + B * r**eta / D**beta + C / (r + eps) ** gamma


# ------------------------------------------------------------------------------------------------
# D-CPT law
# ------------------------------------------------------------------------------------------------

GENERAL = {"E": 2.0, "B": 3.0, "eta": 1.0, "beta": 0.1, "C": 0.05, "gamma": 0.2}  # rises with r
DOMAIN = {"E": 1.2, "B": 20.0, "eta": -0.3, "beta": 0.15, "C": 0.1, "gamma": 0.5}  # falls with r
GENERAL_BASE = 2.15


def dcpt_points(params, seed, noise):
    D = np.repeat(np.geomspace(1e8, 1e9, 4), 5)
    r = np.tile([0.1, 0.3, 0.5, 0.7, 0.9], 4)
    rng = np.random.default_rng(seed)
    return D, r, dcpt_law(D, r, **params) * (1 + noise * rng.standard_normal(D.size))


def true_share(tolerance=0.03, D=1e10):
    """Largest share on 0.10, 0.11, …, 0.90 before the true general-loss rise exceeds tolerance."""
    shares = np.round(np.arange(0.10, 0.905, 0.01), 2)
    over = dcpt_law(D, shares, **GENERAL) / GENERAL_BASE - 1 > tolerance
    return shares[np.argmax(over) - 1]


@pytest.mark.parametrize("params", [GENERAL, DOMAIN], ids=["general", "domain"])
def test_dcpt_law_recovery(params):
    r = np.linspace(0.1, 0.9, 17)
    D, ratios, L = dcpt_points(params, seed=0, noise=0.0)
    fit = fit_dcpt_law(D, ratios, L)
    np.testing.assert_allclose(fit.predict(1e10, r), dcpt_law(1e10, r, **params), atol=1e-8)
    assert fit.r_range == (0.1, 0.9)
    # 0.1 % noise, max |error| at 10x the largest D over the fitted shares, seeds 0–3 measured:
    # general 0.0033, 0.0029, 0.0029, 0.0026; domain 0.0144, 0.0044, 0.0069, 0.0122.
    for seed in range(2):
        D, ratios, L = dcpt_points(params, seed=seed + 1, noise=1e-3)
        fit = fit_dcpt_law(D, ratios, L)
        assert np.max(np.abs(fit.predict(1e10, r) - dcpt_law(1e10, r, **params))) < 0.03


def test_suggest_domain_share():
    assert true_share() == pytest.approx(0.52)
    D, r, L = dcpt_points(GENERAL, seed=0, noise=0.0)
    fit = fit_dcpt_law(D, r, L)
    assert suggest_domain_share(fit, GENERAL_BASE, 1e10) == pytest.approx(0.52)
    assert suggest_domain_share(fit, GENERAL_BASE, 1e10, tolerance=0.05) == pytest.approx(
        true_share(0.05)
    )
    assert suggest_domain_share(fit, GENERAL_BASE, 1e10, grid=[0.2, 0.4, 0.6]) == pytest.approx(0.4)
    # Noisy fits land within 0.02 of the truth (measured 0.53, 0.53, 0.52, 0.52 for seeds 0–3).
    D, r, L = dcpt_points(GENERAL, seed=0, noise=1e-3)
    assert abs(suggest_domain_share(fit_dcpt_law(D, r, L), GENERAL_BASE, 1e10) - 0.52) <= 0.02
    with pytest.raises(FitError, match="even r"):
        suggest_domain_share(fit, 1.5, 1e10)


def test_dcpt_law_validates_input():
    D, r, L = dcpt_points(GENERAL, seed=0, noise=0.0)
    bad = r.copy()
    bad[3] = 1.5
    with pytest.raises(FitError, match="point 3 has ratio"):
        fit_dcpt_law(D, bad, L)
    bad[3] = 0.0
    with pytest.raises(FitError, match="point 3 has ratio"):
        fit_dcpt_law(D, bad, L)
    with pytest.raises(FitError, match="2 domain shares"):
        fit_dcpt_law(D, np.full_like(r, 0.5), L)


# ------------------------------------------------------------------------------------------------
# Ye et al.'s data mixing law  L(r) = c + k·exp(Σ t_j r_j)
# ------------------------------------------------------------------------------------------------


def mixing_law(r, c, k, t):
    """The law as Ye et al. write it (with k and t separately), for synthetic data."""
    return c + k * np.exp(np.asarray(r) @ np.asarray(t))


def _design(n, k, seed):
    """n mixtures: the corners' neighbourhoods plus random Dirichlet points (rows sum to 1)."""
    rng = np.random.default_rng(seed)
    return np.vstack([0.7 * np.eye(k) + 0.3 / k, rng.dirichlet(np.ones(k), n - k)])


def test_mixing_law_recovers_known_parameters_exactly():
    c, k, t = 1.3, 2.0, np.array([-0.4, 0.9, 0.2])
    r = _design(9, 3, seed=0)
    fit = fit_mixing_law(r, mixing_law(r, c, k, t))
    assert fit.c == pytest.approx(c, abs=1e-6)
    np.testing.assert_allclose(fit.u, t + np.log(k), atol=1e-5)  # only u = t + log k is identifiable
    assert fit.max_loo_error < 1e-5 and fit.r2 > 0.999999
    probe = np.array([0.2, 0.5, 0.3])
    assert fit.predict(probe) == pytest.approx(float(mixing_law(probe, c, k, t)), abs=1e-6)


def test_mixing_law_with_noise_predicts_an_unseen_mixture():
    # Four domains, 12 mixtures, 2 mnats of noise: held-out error and prediction stay at noise level.
    c, k, t = 2.1, 0.8, np.array([-0.9, 0.3, 0.1, 0.5])
    r = _design(12, 4, seed=1)
    rng = np.random.default_rng(2)
    y = mixing_law(r, c, k, t) + rng.normal(0, 0.002, len(r))
    fit = fit_mixing_law(r, y)
    assert fit.max_loo_error < 0.02  # measured 0.0048
    probe = np.array([0.1, 0.2, 0.3, 0.4])
    assert abs(fit.predict(probe) - float(mixing_law(probe, c, k, t))) < 0.01  # measured 0.0008
    np.testing.assert_allclose(fit.predict(r), fit.c + np.exp(r @ fit.u))


def test_mixing_law_without_enough_mixtures_has_no_loo():
    r = _design(4, 3, seed=3)  # k + 1: the fit is exact, nothing is left to hold out
    fit = fit_mixing_law(r, mixing_law(r, 1.0, 1.0, [0.1, -0.2, 0.3]))
    assert fit.loo_errors is None and fit.max_loo_error is None


@pytest.mark.parametrize(
    "shares, losses, match",
    [
        ([[0.5, 0.5], [0.2, 0.8]], [2.0, 2.1], "2 mixtures for 2 domains"),
        ([[0.5, 0.6], [0.2, 0.8], [0.9, 0.1]], [2.0, 2.1, 2.2], "mixture 0 sums to 1.1"),
        ([[1.2, -0.2], [0.2, 0.8], [0.9, 0.1]], [2.0, 2.1, 2.2], ">= 0"),
        ([[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]], [2.0, float("nan"), 2.2], "point 1 has loss"),
        ([[0.5, 0.5], [0.2, 0.8]], [2.0, 2.1, 2.2], "2 mixtures but 3 losses"),
        ([[0.5, 0.25, 0.25], [0.2, 0.4, 0.4], [0.9, 0.05, 0.05], [0.1, 0.45, 0.45]], [2.0, 2.1, 2.2, 2.3],
         "span only 2 of 3 directions"),
    ],
)
def test_mixing_law_bad_inputs(shares, losses, match):
    with pytest.raises(FitError, match=match):
        fit_mixing_law(shares, losses)


def test_share_law_recovers_known_parameters_and_predicts_left_out_mixtures():
    r = np.array([0.05, 0.1, 0.2, 0.35, 0.5, 0.8])
    E, C, g = 1.9, 0.35, 0.6
    y = E + C * (r + SHARE_EPS) ** (-g)
    fit = fit_share_law(r, y)
    assert (fit.E, fit.C, fit.gamma) == pytest.approx((E, C, g), rel=1e-4)
    assert fit.rmse < 1e-6 and fit.max_loo_error < 1e-4
    assert fit.predict(0.3) == pytest.approx(E + C * 0.31 ** (-g), rel=1e-6)


def test_share_law_refuses_too_few_distinct_shares():
    with pytest.raises(FitError, match="at least 3 distinct shares"):
        fit_share_law([0.2, 0.2, 0.5], [2.0, 2.0, 1.8])
    with pytest.raises(FitError, match="3 shares but 2 losses"):
        fit_share_law([0.1, 0.2, 0.5], [2.0, 1.8])


def test_share_law_of_a_loss_that_rises_with_the_share_is_flat():
    r = np.array([0.1, 0.2, 0.4, 0.6])
    fit = fit_share_law(r, 2.0 + 0.1 * r)  # C >= 0: the law cannot bend the wrong way, it flattens
    assert fit.C >= 0
    assert np.ptp(fit.predict(r)) < 0.05
