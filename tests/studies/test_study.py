"""The study's bar (studies/study.py, issue 9 §4) on hand-made run directories with known numbers."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from velocitune import runfiles
from velocitune.config import load_config, parse_override

_spec = importlib.util.spec_from_file_location("study", Path(__file__).parents[2] / "studies" / "study.py")
study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study)

INIT = {"a": 3.0, "b": 4.0}


def _write(root: Path, arm: str, finals: list[dict], overhead: float | None = None) -> None:
    """Finished runs' summary.json (one per seed), written as training writes them (velocitune.runfiles)."""
    for s, f in enumerate(finals):
        d = root / "runs" / arm / f"seed{s}"
        d.mkdir(parents=True)
        names = list(f)
        doc = {"velocitune_version": "test", "arm": arm, "rule": "static", "signal": "eval", "seed": s,
               "domains": names, "steps": 10, "tokens": 10_240, "init_loss": {n: INIT[n] for n in names},
               "targets": None, "final_val_loss": f, "tokens_per_domain": {n: 5_120 for n in names},
               "wall_time_s": 1.0, "time_eval_s": 0.1, "time_update_s": 0.0, "complete": True}
        if overhead is not None:  # absent: the arm measured no reweighting cost
            doc["measured_overhead"] = overhead
        runfiles.write_summary(d / runfiles.SUMMARY_FILE, doc)


@pytest.fixture
def root(tmp_path):
    (tmp_path / "targets").mkdir()
    runfiles.write_init_loss(tmp_path / "targets" / runfiles.INIT_LOSS_FILE, "base", list(INIT), list(INIT.values()),
                             [4096] * len(INIT))
    _write(tmp_path, "static", [{"a": 2.0, "b": 3.9}, {"a": 2.1, "b": 3.92}, {"a": 2.2, "b": 3.94}])
    _write(tmp_path, "uniform", [{"a": 2.3, "b": 3.5}, {"a": 2.3, "b": 3.5}, {"a": 2.3, "b": 3.5}])
    # helps the lagging domain b a lot, costs a little on a: passes every criterion
    _write(tmp_path, "good", [{"a": 2.15, "b": 3.6}, {"a": 2.25, "b": 3.62}, {"a": 2.35, "b": 3.64}], overhead=0.2)
    # better mean than static, but a is far worse than static
    _write(tmp_path, "harmful", [{"a": 2.6, "b": 3.0}, {"a": 2.6, "b": 3.0}, {"a": 2.6, "b": 3.0}])
    return tmp_path


def test_bar_numbers_match_a_direct_computation(root):
    s = study.bar(root, ["static", "uniform", "good", "harmful"], 3)
    st = s["arms"]["static"]
    means = [np.mean([2.0, 3.9]), np.mean([2.1, 3.92]), np.mean([2.2, 3.94])]
    assert st["mean_loss"] == pytest.approx(np.mean(means)) and st["mean_loss_sd"] == pytest.approx(np.std(means, ddof=1))
    # worst improvement of static: domain b, 4.0 - 3.9/3.92/3.94
    assert st["worst_improvement"] == pytest.approx(0.08) and st["worst_domain"] == "b"
    g = s["arms"]["good"]["checks"]
    assert g["lagging"]["delta"] == pytest.approx((4.0 - 3.62) - 0.08)
    assert g["no_harm"]["delta"]["a"] == pytest.approx(0.15)
    assert s["arms"]["good"]["bar"] is True
    h = s["arms"]["harmful"]
    assert h["checks"]["mean_vs_static"]["pass"] and h["checks"]["lagging"]["pass"]
    assert not h["checks"]["no_harm"]["pass"] and h["bar"] is False
    assert s["arms"]["static"]["bar"] is None  # the references are not judged


def test_bar_markdown_has_a_row_per_arm(root):
    md = study.bar_markdown(study.bar(root, ["static", "uniform", "good", "harmful"], 3))
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| arm")]
    assert [r.split("|")[1].strip() for r in rows] == ["static", "uniform", "good", "harmful"]
    assert "**pass**" in rows[2] and "fail" in rows[3]
    assert rows[2].rstrip(" |").endswith("20 %") and rows[0].rstrip(" |").endswith("—")


def test_every_study_arm_is_a_valid_config(make_config):
    """Each arm's overrides go through the CLI's own parser and validation, and set what they name."""
    base = make_config()
    for name, overrides in study.ARMS.items():
        cfg = load_config(None, [f"--data.path={base.data.path}", *overrides])
        for o in overrides:
            key, value = parse_override(o)
            section, field = key.split(".")
            assert getattr(getattr(cfg, section), field) == value, (name, key)


def test_study_runs_end_to_end_on_a_toy_demo(tmp_path, toy_demo):
    """Second domain set at toy size: corpus, prepare, targets, two arms as subprocesses, report and bar."""
    out = tmp_path / "demo"
    toy_demo.run_demo(out, steps=12, base_steps=6, scale=0.03, parallel=2)
    # the default (no mixing keys) and the fixed mixture at its average weights, which runs after it
    assert study.main(["--out", str(out), "--set", "alt", "--arms", "static", "default", "avg-fixed", "--seeds", "1",
                       "--steps", "12", "--scale", "0.03", "--parallel", "2", "--tag", "toy"]) == 0
    root = out / "study" / "alt"
    summary = json.loads((root / "toy.json").read_text())
    assert summary["domains"] == ["replay", "cpp", "markdown", "records"]
    run = json.loads((root / "runs" / "default" / "seed0" / "summary.json").read_text())
    assert run["preset"] == "robust" and run["signal"] == "train" and run["steps"] == 12
    assert summary["arms"]["default"]["mean_loss"] == pytest.approx(np.mean(list(run["final_val_loss"].values())))
    assert (root / "toy" / "report.md").is_file() and "| default |" in (root / "toy.md").read_text()
    fixed = yaml.safe_load((root / "runs" / "avg-fixed" / "seed0" / "config.yaml").read_text())["mixing"]
    assert fixed["rule"] == "replay" and fixed["replay_from"] == str(root / "runs" / "default" / "seed0")
