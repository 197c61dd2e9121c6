"""The plan studies' maths (studies/plan_study.py, plan_lengths_study.py, plan_cost_study.py) on synthetic
numbers with a known answer: the curves and laws the estimators assume, and the error bookkeeping."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

STUDIES = Path(__file__).parents[2] / "studies"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, STUDIES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


lengths = _load("plan_lengths_study")
plan_study = _load("plan_study")
cost = _load("plan_cost_study")

NAMES = ["a", "b", "c"]
SHARE = {"a": (2.0, 0.30, 0.40), "b": (1.5, 0.50, 0.25), "c": (3.0, 0.10, 0.60)}  # E, C, gamma per domain


def share_law(n: str, r: float) -> float:
    E, C, g = SHARE[n]
    return E + C * (r + 0.01) ** (-g)


def test_fit_pow_recovers_a_power_law_away_from_its_points():
    E, A, alpha = 2.0, 8.0, 0.6
    D = np.array([10.0, 20.0, 40.0])
    y = E + A * D ** -alpha
    assert lengths.fit_pow(D, y, 320.0) == pytest.approx(E + A * 320.0 ** -alpha, abs=1e-9)


def test_fit_pow_falls_back_to_the_log_line_when_no_power_law_fits():
    # equal drops per doubling: the power-law ratio is never 1 for α > 0, so the last two points' line is used
    D = np.array([10.0, 20.0, 40.0])
    y = 5.0 - 0.3 * np.log2(D)
    assert lengths.fit_pow(D, y, 160.0) == pytest.approx(5.0 - 0.3 * np.log2(160.0), abs=1e-9)


def test_estimators_on_curves_they_assume():
    """ends linear in log D for both arms: every endpoint-log and log-offset estimator is exact; offset@L
    carries the L-step difference unchanged (wrong here by the growth of the difference)."""
    Ls, main = [10, 20, 40], 160
    w0 = lambda D: np.array([5.0, 4.0]) - np.array([0.2, 0.1]) * np.log(D)  # noqa: E731
    uni = lambda D: np.array([5.1, 3.8]) - np.array([0.25, 0.1]) * np.log(D)  # noqa: E731
    ends = {(arm, L): f(L) for arm, f in (("w0", w0), ("uni", uni)) for L in Ls}
    base = w0(main) + np.array([0.01, -0.02])  # a targets file 0.01 / -0.02 off
    est = lengths.estimates(ends, ["w0", "uni"], Ls, main, base)
    for name in ("endpoint-log(10, 40)", "w0-log(10, 20)+offset-log(10, 20)", "endpoint-pow(10, 20, 40)"):
        used, pred = est[name]
        np.testing.assert_allclose(pred["uni"], uni(main), atol=1e-9)
        np.testing.assert_allclose(pred["w0"], w0(main), atol=1e-9)
    used, pred = est["offset@40"]
    assert used == (40,)
    np.testing.assert_allclose(pred["w0"], base)
    np.testing.assert_allclose(pred["uni"], base + uni(40) - w0(40))


def _plan_doc(law: str = "share") -> dict:
    """A plan whose chosen laws are the share laws above, and its six design mixtures' main-budget losses."""
    R = np.array([[0.2, 0.5, 0.3], [1 / 3, 1 / 3, 1 / 3], [0.6, 0.25, 0.15], [0.1, 0.75, 0.15], [0.1, 0.25, 0.65],
                  [0.45, 0.45, 0.10]])
    labels = ["w0", "uniform", "tilt-a", "tilt-b", "tilt-c", "extra"]
    fits = {n: {"law": "share", "candidates": {"share": {"params": {"E": SHARE[n][0], "C": SHARE[n][1],
                                                                    "gamma": SHARE[n][2], "eps": 0.01}}}}
            for n in NAMES}
    mixtures = [{"name": lab, "shares": dict(zip(NAMES, r)),
                 "final": {n: share_law(n, r[i]) for i, n in enumerate(NAMES)}} for lab, r in zip(labels, R)]
    return {"domains": NAMES, "fits": fits, "mixtures": mixtures, "law": law, "proxy_steps": 10, "main_steps": 100}


def _arm(shares, measured) -> dict:
    return {"seeds": 3, "rule": "static", "shares": dict(zip(NAMES, shares)), "measured": dict(zip(NAMES, measured))}


def test_error_table_separates_the_common_level_from_the_mixture_effect():
    plan = _plan_doc()
    r_ref, r_arm = [0.2, 0.5, 0.3], [0.5, 0.2, 0.3]
    level = np.array([0.3, -0.1, 0.05])  # what the plan misses at w0, the same for every mixture
    extra = np.array([0.0, 0.02, -0.04])  # what it misses of the arm's own effect
    truth = {"ref": _arm(r_ref, [share_law(n, r_ref[i]) - level[i] for i, n in enumerate(NAMES)]),
             "arm": _arm(r_arm, [share_law(n, r_arm[i]) - level[i] - extra[i] for i, n in enumerate(NAMES)])}
    res = plan_study.error_table(plan, truth, reference="ref")
    np.testing.assert_allclose([res["arms"]["ref"]["error"][n] for n in NAMES], level, atol=1e-12)
    np.testing.assert_allclose([res["arms"]["arm"]["error"][n] for n in NAMES], level + extra, atol=1e-12)
    np.testing.assert_allclose([res["arms"]["arm"]["effect_error"][n] for n in NAMES], extra, atol=1e-12)
    assert res["arms"]["arm"]["max_abs_effect_error"] == pytest.approx(0.04)
    assert "Error of each mixture's effect" in plan_study.markdown(res, NAMES)
    with pytest.raises(SystemExit, match="--reference"):
        plan_study.error_table(plan, truth, reference="missing")


def test_refit_on_subsets_recovers_the_law_that_made_the_mixtures():
    """The design's losses come from the share laws: a refit on any 4 or more mixtures predicts other
    mixtures exactly, so with measurements off by a common level the effect error is ~0 and the absolute
    error is that level."""
    plan = _plan_doc()
    level = np.array([0.2, -0.1, 0.0])
    arms = {"ref": [0.2, 0.5, 0.3], "u": [0.3, 0.3, 0.4], "v": [0.55, 0.15, 0.30]}
    truth = {k: _arm(r, [share_law(n, r[i]) - level[i] for i, n in enumerate(NAMES)]) for k, r in arms.items()}
    for keep in ([0, 1, 2, 3], [0, 2, 4, 5], list(range(6))):
        absolute, effect = cost.refit_errors(plan, keep, truth, ["u", "v"], "ref")
        assert effect < 1e-4
        assert absolute == pytest.approx(0.2, abs=1e-4)


def test_nominal_mixtures_parse_to_normalised_shares_and_bad_ones_say_what_is_expected(tmp_path):
    names, w0, realised = ["a", "b"], {"a": 0.6, "b": 0.2}, {"a": 0.3, "b": 0.7}
    assert lengths.parse_nominal("w0", names, w0, realised) == pytest.approx([0.75, 0.25])
    assert lengths.parse_nominal("uniform", names, w0, realised) == pytest.approx([0.5, 0.5])
    assert lengths.parse_nominal("-", names, w0, realised) == pytest.approx([0.3, 0.7])
    assert lengths.parse_nominal("b=3, a=1", names, w0, realised) == pytest.approx([0.25, 0.75])
    plan = tmp_path / "plan.json"
    plan.write_text('{"recommended": {"b": 0.9, "a": 0.1}}')
    assert lengths.parse_nominal(f"plan:{plan}", names, w0, realised) == pytest.approx([0.1, 0.9])
    for bad in ("a=1", "a=x,b=1", "a1,b=2"):
        with pytest.raises(SystemExit, match="a share for every domain as a=0.25,b=0.25"):
            lengths.parse_nominal(bad, names, w0, realised)
    with pytest.raises(SystemExit, match="non-negative"):
        lengths.parse_nominal("a=-1,b=0.5", names, w0, realised)
