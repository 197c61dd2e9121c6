"""Issue 27's bar (studies/bar27.py) on hand-made run directories with numbers checked by hand."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from velocitune import runfiles

_spec = importlib.util.spec_from_file_location("bar27", Path(__file__).parents[2] / "studies" / "bar27.py")
bar27 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bar27)

NAMES = ["a", "b"]


def _write(root: Path, arm: str, finals: list[dict], update_s: float = 0.0, targets_at: list[dict] | None = None):
    for s, f in enumerate(finals):
        d = root / "runs" / arm / f"seed{s}"
        d.mkdir(parents=True)
        doc = {"velocitune_version": "test", "arm": arm, "rule": "static", "signal": "train", "seed": s,
               "domains": NAMES, "steps": 100, "tokens": 10_240, "init_loss": {"a": 3.0, "b": 4.0},
               "targets": None, "final_val_loss": f, "tokens_per_domain": {n: 5_120 for n in NAMES},
               "wall_time_s": 10.0, "time_eval_s": 0.1, "time_update_s": update_s, "complete": True}
        runfiles.write_summary(d / runfiles.SUMMARY_FILE, doc)
        log = runfiles.RunLog(d / runfiles.MIXTURE_FILE, runfiles.MIXTURE, NAMES)
        base = {"tokens": 0, "signal": "train", "losses": None, "init": {"a": 3.0, "b": 4.0}, "targets": None, "velocity": None,
                "weights": {"a": 0.5, "b": 0.5}, "sampling_weights": {"a": 0.5, "b": 0.5},
                "tokens_per_domain": {"a": 0, "b": 0}, "guarded": []}
        log.write({**base, "step": 0})
        for step, t in (targets_at or []):
            log.write({**base, "step": step, "targets": t, "laws": {n: {} for n in NAMES}})
        log.close()


@pytest.fixture
def out(tmp_path):
    root = tmp_path / "study" / "s1"
    _write(root, "static", [{"a": 2.0, "b": 3.0}, {"a": 2.1, "b": 3.0}, {"a": 2.2, "b": 3.0}])
    # default: mean 0.1 lower at every seed but domain a 0.2 worse than static (> 0.03 + 2 sd = 0.23? no: sd 0.1)
    _write(root, "default", [{"a": 2.2, "b": 2.6}, {"a": 2.3, "b": 2.6}, {"a": 2.4, "b": 2.6}], update_s=0.5,
           targets_at=[(20, {"a": 2.9, "b": 3.5}), (50, {"a": 2.33, "b": 2.58}), (80, {"a": 2.31, "b": 2.6})])
    _write(root, "uniform", [{"a": 2.3, "b": 2.7}, {"a": 2.3, "b": 2.7}, {"a": 2.3, "b": 2.7}])
    return tmp_path


def test_one_set_by_hand(out):
    m = bar27.measure_set(out / "study" / "s1", 3)
    # paired default − static: means (2.4 − 2.5, 2.45 − 2.55, 2.5 − 2.6) = −0.1 each: sd 0, better
    assert m["vs_static"]["delta"] == pytest.approx(-0.1) and m["vs_static"]["spread"] == pytest.approx(0, abs=1e-12)
    assert m["vs_static"]["better"] and not m["vs_static"]["worse"]
    # domain a: +0.2 against max_rise 0.03 + 2 × sd 0.1 = 0.23: no breach; b: −0.4
    assert m["domain_delta"]["a"] == pytest.approx(0.2) and m["domain_sd"]["a"] == pytest.approx(0.1)
    assert m["domain_breach"] == {"a": False, "b": False}
    # target errors: at 25 % (step 20) |2.9 − final a| is largest for seed 0 (2.2): 0.7; at 50 % (step 50) 0.13
    assert m["target_error"]["a"][0] == pytest.approx(0.7) and m["target_error"]["a"][1] == pytest.approx(0.13)
    assert m["target_error"]["b"][1] == pytest.approx(0.02)
    assert m["overhead"] == pytest.approx(0.05)
    # uniform: paired default − uniform = 2.4 − 2.5 = −0.1, 2.45 − 2.5, 2.5 − 2.5: mean −0.05, sd 0.05
    u = m["peers"]["uniform"]
    assert u["delta"] == pytest.approx(-0.05) and u["spread"] == pytest.approx(0.05)
    assert not u["better"] and not u["worse"]


def test_verdicts_report_what_was_not_run_as_a_miss(out):
    sets = {"s1": bar27.measure_set(out / "study" / "s1", 3), "s2": None}
    v = bar27.verdicts(sets, ["s1", "s2"])
    assert not v["1"]["pass"] and v["1"]["not_run"] == ["s2"] and v["1"]["better_on"] == ["s1"]
    assert not v["3"]["pass"] and v["3"]["not_run"]["odm"] == ["s1", "s2"]
    assert not v["4"]["pass"]  # 0.13 > 0.05 on domain a at the middle
    md = bar27.markdown(sets, v)
    assert "Criterion 4: **missed**" in md and "Not run" in md
