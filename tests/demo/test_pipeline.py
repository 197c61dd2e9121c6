"""The demo pipeline (velocitune.demo.pipeline) end to end at toy size: every stage runs and report.md
compares the two arms."""

from __future__ import annotations

import json

import pytest

from velocitune.demo import pipeline


def test_demo_pipeline_at_toy_size(tmp_path, toy_demo):
    out = tmp_path / "demo"
    report = pipeline.run_demo(out, steps=16, base_steps=8, scale=0.03, parallel=2)
    assert report == out / "report.md"
    text = report.read_text()
    assert "static/seed0" in text and "velocitune/seed0" in text
    # Stage 6 scored both final models on the demo's downstream tasks; the report shows the scores.
    from report.rundirs import table_with

    for run in ("static", "velocitune"):
        tasks = json.loads((out / "runs" / run / "seed0" / "downstream.json").read_text())["tasks"]
        assert {t: v["samples"] for t, v in tasks.items()} == {"demo_math_answer": 12, "demo_math_method": 12,
                                                               "demo_code_next_line": 12}
        row = next(r for r in table_with(text, "demo_code_next_line acc") if r["run"] == f"{run}/seed0")
        assert float(row["demo_code_next_line acc"]) == pytest.approx(tasks["demo_code_next_line"]["metrics"]["acc"], abs=5e-4)
    for png in ("weights.png", "val_loss.png", "velocity.png", "targets.png"):
        assert (out / png).stat().st_size > 10_000
    targets = json.loads((out / "targets" / "targets.json").read_text())
    assert set(targets["domains"]) == set(pipeline.CPT_DOMAINS)
    vt = [json.loads(line) for line in (out / "runs" / "velocitune" / "seed0" / "mixture.jsonl").read_text().splitlines()]
    assert len(vt) > 1 and vt[-1]["weights"] != vt[0]["weights"]  # the weights moved
    # Stages are cached: a second call reuses the base model, the targets and the finished arms.
    base_mtime = (out / "base" / "summary.json").stat().st_mtime_ns
    pipeline.run_demo(out, steps=16, base_steps=8, scale=0.03, parallel=2)
    assert (out / "base" / "summary.json").stat().st_mtime_ns == base_mtime


def test_demo_refuses_to_mix_settings_in_one_directory(tmp_path):
    from velocitune.errors import VelocituneError

    pipeline.check_settings(tmp_path, {"steps": 600})
    pipeline.check_settings(tmp_path, {"steps": 600})
    with pytest.raises(VelocituneError, match=r"other settings \{'steps': \(600, 300\)\}"):
        pipeline.check_settings(tmp_path, {"steps": 300})
