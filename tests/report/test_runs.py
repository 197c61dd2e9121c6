"""Tests for velocitune.report.runs: run directories read through velocitune.runfiles, clear errors for
missing, incomplete, damaged, newer or mismatched runs, and the per-run numbers and statistics."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
from report.rundirs import FINAL, TARGETS, edit_summary, fabricate_run, good_run

from velocitune import runfiles
from velocitune.errors import DataError
from velocitune.report import (
    Run,
    difference,
    load_run,
    make_report,
    max_rise_limit,
    mean_sd,
    normalised_progress,
    online_target_errors,
    refits_targets,
    run_result,
)

# ----------------------------------------------------------------------------------------------------------
# Reading


def test_load_run_orders_records_and_reads_floats(tmp_path):
    run = good_run(tmp_path)
    for name in (runfiles.EVAL_FILE, runfiles.MIXTURE_FILE):  # records in any order come back by tokens
        lines = (run / name).read_text().splitlines()
        random.Random(0).shuffle(lines)
        (run / name).write_text("\n".join(lines) + "\n")
    loaded = load_run(run)
    for records in (loaded.evals, loaded.mixture):
        tokens = [r["tokens"] for r in records]
        assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)
    # tokens are whole numbers in the files; the report reads every per-domain value and number as a float
    assert all(isinstance(v, float) for v in loaded.summary["tokens_per_domain"].values())
    assert isinstance(loaded.summary["tokens"], float)
    assert all(isinstance(v, float) for r in loaded.evals for v in r["losses"].values())
    assert loaded.targets == pytest.approx(TARGETS)
    assert loaded.targets_file["domains"]["math"]["predictor"] == "chinchilla"


def test_files_without_format_version_read_as_version_1(tmp_path):
    legacy = fabricate_run(tmp_path, "legacy", arm="velocitune", rule="velocitune", final=FINAL, legacy=True)
    current = good_run(tmp_path, "current")
    assert "version" not in json.loads((legacy / runfiles.SUMMARY_FILE).read_text())
    a, b = load_run(legacy), load_run(current)
    assert a.evals == b.evals and a.mixture == b.mixture
    assert a.summary["final_val_loss"] == b.summary["final_val_loss"]


def test_null_targets_in_summary_and_mixture_read(tmp_path):
    """A domain without a target is null in summary.json's and mixture.jsonl's targets: progress is None."""
    run = good_run(tmp_path)
    edit_summary(run, targets={**TARGETS, "code": None})
    path = run / runfiles.MIXTURE_FILE
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        r["targets"] = {**TARGETS, "code": None}
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    loaded = load_run(run)
    assert loaded.targets["code"] is None
    result = run_result(loaded, None)
    assert result.progress["code"] is None and result.progress["math"] is not None
    assert result.worst_progress == result.progress["math"]  # prose is n/a too (gap < 0)


# ----------------------------------------------------------------------------------------------------------
# Numbers


def test_difference_helper_against_numpy():
    rng = np.random.default_rng(0)
    a, r = rng.normal(1.0, 0.1, 4), rng.normal(0.8, 0.2, 4)
    paired = difference(list(enumerate(a)), list(enumerate(r)))
    assert paired.paired and paired.diff == pytest.approx(a.mean() - r.mean())
    assert paired.se == pytest.approx(np.std(a - r, ddof=1) / 2)
    shuffled = difference(list(zip([3, 1, 0, 2], a)), list(zip([0, 1, 2, 3], r)))  # pairs by seed, not position
    d = a - r[[3, 1, 0, 2]]
    assert shuffled.paired and shuffled.se == pytest.approx(np.std(d, ddof=1) / 2)
    welch = difference(list(zip([10, 11, 12, 13], a)), list(enumerate(r)))
    assert not welch.paired
    assert welch.se == pytest.approx(math.sqrt(a.var(ddof=1) / 4 + r.var(ddof=1) / 4))
    assert difference([(0, 1.0)], [(0, 0.5)]).se is None  # one seed: no spread
    s = mean_sd([1.0, 2.0, 4.0])
    assert (s.mean, s.sd, s.n) == (pytest.approx(7 / 3), pytest.approx(np.std([1, 2, 4], ddof=1)), 3)
    assert mean_sd([2.0]).sd is None


def test_normalised_progress_values_and_guard():
    assert normalised_progress(3.0, 2.5, 2.0) == pytest.approx(0.5)
    assert normalised_progress(3.0, 3.2, 2.0) == pytest.approx(-0.2)  # got worse
    assert normalised_progress(3.0, 1.5, 2.0) == pytest.approx(1.5)  # beat the target
    assert normalised_progress(2.5, 2.4, 2.49) is None  # gap 0.01 < 0.02
    assert normalised_progress(2.5, 2.4, 2.6) is None  # predicted to get worse
    assert normalised_progress(2.5, 2.4, None) is None  # no target


# ----------------------------------------------------------------------------------------------------------
# Errors


def expect_error(runs, tmp_path, *fragments):
    with pytest.raises(DataError) as info:
        make_report(runs, tmp_path / "report")
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in: {info.value}"
    assert not (tmp_path / "report" / "report.md").exists()


def test_error_no_summary(tmp_path):
    run = good_run(tmp_path)
    (run / "summary.json").unlink()
    expect_error([run], tmp_path, str(run), "summary.json")


def test_error_summary_not_complete(tmp_path):
    run = good_run(tmp_path)
    edit_summary(run, complete=False)
    expect_error([run], tmp_path, str(run), "incomplete", "complete=False")


@pytest.mark.parametrize("missing", ["eval.jsonl", "mixture.jsonl"])
def test_error_missing_file(tmp_path, missing):
    run = good_run(tmp_path)
    (run / missing).unlink()
    expect_error([run], tmp_path, str(run), missing)


def _bump_version(path, version: int) -> None:
    """Stamp a newer format version into a JSON file, or into the first record of a JSON-lines file."""
    if path.suffix == ".jsonl":
        lines = path.read_text().splitlines()
        lines[0] = json.dumps({**json.loads(lines[0]), "version": version})
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text(json.dumps({**json.loads(path.read_text()), "version": version}))


@pytest.mark.parametrize("name", ["summary.json", "eval.jsonl", "mixture.jsonl", "targets.json"])
def test_error_newer_format_version(tmp_path, name):
    """A file written in a newer format than this velocitune reads is refused, saying so (not misread)."""
    run = good_run(tmp_path)
    _bump_version(run / name, 2)
    expect_error([run], tmp_path, str(run / name), "version 2", "reads version 1", "newer velocitune")


def test_error_version_missing(tmp_path):
    run = good_run(tmp_path)
    edit_summary(run, drop=("velocitune_version",))
    expect_error([run], tmp_path, str(run), "velocitune_version")


def test_error_different_domain_sets(tmp_path):
    a = good_run(tmp_path, "a")
    b = fabricate_run(tmp_path, "b", arm="static", rule="static", final=FINAL, domains=("math", "code"))
    expect_error([a, b], tmp_path, "different domains", str(a), str(b))


def test_error_damaged_jsonl_names_file_and_line(tmp_path):
    run = good_run(tmp_path)
    lines = (run / "eval.jsonl").read_text().splitlines()
    lines[2] = lines[2][:20]
    (run / "eval.jsonl").write_text("\n".join(lines) + "\n")
    expect_error([run], tmp_path, "eval.jsonl", "line 3")


def test_error_missing_domain_value(tmp_path):
    run = good_run(tmp_path)
    edit_summary(run, final_val_loss={"math": 2.7, "prose": 2.6})
    expect_error([run], tmp_path, "final_val_loss", "code")


def test_error_malformed_targets_json(tmp_path):
    run = good_run(tmp_path)
    t = json.loads((run / "targets.json").read_text())
    t["domains"]["code"]["points"] = [[1000.0, "high"]]
    (run / "targets.json").write_text(json.dumps(t))
    expect_error([run], tmp_path, "targets.json", "'code'", "'points'")


def test_error_empty_log(tmp_path):
    run = good_run(tmp_path)
    (run / "mixture.jsonl").write_text("")
    expect_error([run], tmp_path, "mixture.jsonl", "empty")


def test_error_missing_directory_and_duplicates(tmp_path):
    expect_error([tmp_path / "nope"], tmp_path, "nope", "does not exist")
    run = good_run(tmp_path)
    expect_error([run, tmp_path / "." / "run"], tmp_path, "given twice")


# ----------------------------------------------------------------------------------------------------------
# Online targets and max_rise (issue 27)


def _run(mixture: list[dict], steps: int = 100, final: dict | None = None, mixing: dict | None = None) -> Run:
    """A Run built by hand: its summary holds what the online-target functions read."""
    final = final or {"a": 2.0, "b": 3.0}
    summary = {"steps": steps, "final_val_loss": final, "domains": list(final), "arm": "x", "rule": "velocitune",
               "seed": 0}
    return Run(path=Path("/nowhere"), name="r", summary=summary, evals=[], mixture=mixture, targets_file=None,
               mixing=mixing or {})


def _record(step: int, targets: dict | None, online: bool = True) -> dict:
    r = {"step": step, "tokens": 1000.0 * step, "sampling_weights": {"a": 0.5, "b": 0.5}, "velocity": None,
         "targets": targets}
    if online and step > 0:
        r["static_prediction"] = {"a": 2.01, "b": 2.99}
    return r


def test_online_target_errors_by_hand():
    """Final losses a 2.0, b 3.0 over 100 steps; updates at 20, 40, 60 and 80 (step 0 holds the prior)."""
    run = _run([_record(0, {"a": 1.5, "b": 2.5}), _record(20, {"a": 2.3, "b": 3.1}),
                _record(40, {"a": 2.1, "b": None}), _record(60, {"a": 1.95, "b": 2.96}),
                _record(80, {"a": 2.02, "b": 2.99})])
    errors = online_target_errors(run)
    # 25 % = step 25 -> the update at 20: |2.3 - 2.0| = 0.3, |3.1 - 3.0| = 0.1
    # 50 % = step 50 -> the update at 40: |2.1 - 2.0| = 0.1, b has no target there
    # 75 % = step 75 -> the update at 60: |1.95 - 2.0| = 0.05, |2.96 - 3.0| = 0.04
    assert errors["a"] == pytest.approx([0.3, 0.1, 0.05], abs=1e-12)
    assert errors["b"][0] == pytest.approx(0.1, abs=1e-12) and errors["b"][1] is None
    assert errors["b"][2] == pytest.approx(0.04, abs=1e-12)
    # an update exactly at a fraction counts (<=): the update at 50 is the one at 50 %
    at_half = online_target_errors(_run([_record(0, {"a": 1.0, "b": 1.0}), _record(50, {"a": 2.25, "b": 2.5})]))
    assert at_half["a"] == pytest.approx([None, 0.25, 0.25]) and at_half["b"] == pytest.approx([None, 0.5, 0.5])


def test_online_target_errors_before_the_first_update_are_none():
    run = _run([_record(0, {"a": 1.5, "b": 2.5}), _record(30, {"a": 2.2, "b": 3.3})], steps=100)
    errors = online_target_errors(run)
    # 25 % = step 25: only the prior (step 0) so far, which is no refit
    assert errors["a"][0] is None and errors["b"][0] is None
    assert errors["a"][1:] == pytest.approx([0.2, 0.2]) and errors["b"][1:] == pytest.approx([0.3, 0.3])


def test_refits_targets():
    fixed = {"a": 2.5, "b": 2.8}
    assert not refits_targets(_run([_record(s, fixed, online=False) for s in (0, 20, 40)]))
    assert refits_targets(_run([_record(0, fixed, online=False), _record(20, fixed, online=False),
                                _record(40, {"a": 2.4, "b": 2.8}, online=False)]))
    # one update only: its static prediction says the targets are the online laws'
    assert refits_targets(_run([_record(0, fixed), _record(20, fixed)]))
    assert not refits_targets(_run([_record(0, fixed)]))


@pytest.mark.parametrize("value, limit", [(0.03, 0.03), (0, 0.0), ("0.05", 0.05), (None, None),
                                          (math.inf, None), ("inf", None), (True, None), ("high", None)])
def test_max_rise_limit(value, limit):
    assert max_rise_limit(_run([], mixing={"max_rise": value})) == limit
    assert max_rise_limit(_run([])) is None  # no config.yaml, or no max_rise in it


@pytest.mark.parametrize("max_rise, limit", [(0.03, 0.03), (math.inf, None), (None, None)])
def test_load_run_reads_mixing_config_and_online_records(tmp_path, max_rise, limit):
    run = load_run(fabricate_run(tmp_path, "on", arm="velocitune", rule="velocitune", final=FINAL, online=True,
                                 max_rise=max_rise))
    assert run.mixing["online"] is True and max_rise_limit(run) == limit
    assert refits_targets(run)
    assert [r["step"] for r in run.mixture] == [0, 17, 33, 50, 67, 83]
    assert run.mixture[0]["targets"] == pytest.approx(TARGETS)  # step 0: the prior
    assert run.mixture[3]["targets"] == pytest.approx({d: v + 0.1 for d, v in FINAL.items()})  # 0.2 · (1 - 1/2)
    assert not refits_targets(load_run(good_run(tmp_path)))


def test_error_damaged_config_yaml(tmp_path):
    run = good_run(tmp_path)
    (run / "config.yaml").write_text("mixing: [rule: velocitune\n")
    expect_error([run], tmp_path, str(run / "config.yaml"), "not valid YAML")
