"""Tests for velocitune.report.tables: report.md's tables checked against the run files, multi-seed statistics
against numpy, the notes, and the `velocitune report` CLI."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import pytest
from report.rundirs import (
    DOMAINS,
    FINAL,
    INIT,
    TARGETS,
    edit_summary,
    fabricate_run,
    floats,
    good_run,
    hms,
    md_tables,
    read_summary,
    table_with,
    tokens_value,
)

from velocitune.report import Run, add_arguments, fmt_tokens, main, make_report, target_error_table

# ----------------------------------------------------------------------------------------------------------
# Single-seed report: one row per run


def test_report_path_and_run_list(single):
    runs, out, md = single
    assert (out / "report.md").is_file()
    assert md.startswith("# ")
    for run in runs:
        assert str(run.resolve()) in md


def test_run_table_matches_the_run_files(single):
    runs, _, md = single
    rows = {r["run"]: r for r in table_with(md, "worst progress")}
    assert set(rows) == {r.name for r in runs}
    for run in runs:
        s, row = read_summary(run), rows[run.name]
        assert row["arm"] == s["arm"] and int(row["seed"]) == s["seed"]
        final = s["final_val_loss"]
        for d in DOMAINS:
            assert floats(row[f"loss {d}"])[0] == pytest.approx(final[d], abs=5.1e-5)
            # three significant digits: within half a unit of the third
            assert tokens_value(row[f"tokens {d}"]) == pytest.approx(s["tokens_per_domain"][d], rel=5.1e-3)
        assert floats(row["mean loss"])[0] == pytest.approx(sum(final.values()) / 3, abs=5.1e-5)
        # progress, computed here from the summary: prose has l_init < l_target -> n/a
        progress = {d: (INIT[d] - final[d]) / (INIT[d] - TARGETS[d]) for d in ("math", "code")}
        for d, p in progress.items():
            assert floats(row[f"progress {d}"])[0] == pytest.approx(p, abs=5.1e-4)
        assert row["progress prose"].startswith("n/a")
        assert floats(row["worst progress"])[0] == pytest.approx(min(progress.values()), abs=5.1e-4)
        borrowed = s["targets"] is None
        assert all(row[f"progress {d}"].endswith("‡") == borrowed for d in progress)
        assert hms(row["wall time"]) == pytest.approx(s["wall_time_s"], abs=0.51)
        if s["rule"] == "static":
            assert row["reweighting"] == "—"
        else:
            cost = s["time_update_s"]  # the trainer counts eval-signal passes in time_update_s
            assert floats(row["reweighting"])[0] == pytest.approx(100 * cost / s["wall_time_s"], abs=0.051)
    assert "ℓ_init − ℓ_target < 0.02 nats" in md  # the footnote explaining n/a
    assert "has no targets of its own" in md  # the footnote explaining ‡


def test_targets_table_matches_summary(single):
    _, _, md = single
    rows = {r["domain"]: r for r in table_with(md, "ℓ_target (nats)")}
    for d in DOMAINS:
        assert floats(rows[d]["ℓ_init (nats)"])[0] == pytest.approx(INIT[d], abs=5.1e-5)
        assert floats(rows[d]["ℓ_target (nats)"])[0] == pytest.approx(TARGETS[d], abs=5.1e-5)
        assert floats(rows[d]["gap (nats)"])[0] == pytest.approx(INIT[d] - TARGETS[d], abs=5.1e-5)
        assert rows[d]["predictor"] == "chinchilla"
    assert "progress n/a" in rows["prose"]["note"] and rows["math"]["note"] == ""


def test_domain_without_target_shows_progress_na(tmp_path):
    """summary.json may hold null for a domain without a target: its progress is n/a, left out of the worst."""
    run = good_run(tmp_path)
    edit_summary(run, targets={**TARGETS, "code": None})
    md = make_report([run], tmp_path / "report").read_text()
    row = table_with(md, "worst progress")[0]
    assert row["progress code"] == "n/a†" and row["progress prose"] == "n/a†"
    math_progress = (INIT["math"] - FINAL["math"]) / (INIT["math"] - TARGETS["math"])
    assert floats(row["progress math"])[0] == pytest.approx(math_progress, abs=5.1e-4)
    assert floats(row["worst progress"])[0] == pytest.approx(math_progress, abs=5.1e-4)
    assert "the domain has no target" in md and "ℓ_init − ℓ_target < 0.02 nats" in md
    targets = {r["domain"]: r for r in table_with(md, "ℓ_target (nats)")}
    assert targets["code"]["ℓ_target (nats)"] == "—" and targets["code"]["gap (nats)"] == "—"
    assert "no target" in targets["code"]["note"]


# ----------------------------------------------------------------------------------------------------------
# Multi-seed report: one row per arm, differences to static


def per_arm(runs) -> dict[str, list[dict]]:
    arms: dict[str, list[dict]] = {}
    for run in runs:
        s = read_summary(run)
        arms.setdefault(s["arm"], []).append(s)
    return arms


def mean_loss(s: dict) -> float:
    return float(np.mean([s["final_val_loss"][d] for d in DOMAINS]))


def worst_progress(s: dict) -> float:
    return min((INIT[d] - s["final_val_loss"][d]) / (INIT[d] - TARGETS[d]) for d in ("math", "code"))


def test_arm_table_mean_sd_against_numpy(multi):
    runs, _, md = multi
    assert md.startswith("# Three arms")
    rows = {r["arm"]: r for r in table_with(md, "seeds")}
    for arm, summaries in per_arm(runs).items():
        row = rows[arm]
        assert sorted(int(s) for s in row["seeds"].split(", ")) == sorted(s["seed"] for s in summaries)
        for d in DOMAINS:
            v = np.array([s["final_val_loss"][d] for s in summaries])
            assert floats(row[f"loss {d}"]) == pytest.approx([v.mean(), v.std(ddof=1)], abs=5.1e-5)
        m = np.array([mean_loss(s) for s in summaries])
        assert floats(row["mean loss"]) == pytest.approx([m.mean(), m.std(ddof=1)], abs=5.1e-5)
        w = np.array([worst_progress(s) for s in summaries])
        assert floats(row["worst progress"]) == pytest.approx([w.mean(), w.std(ddof=1)], abs=5.1e-4)
    assert "sample standard deviation" in md


def test_differences_to_static_paired_and_unpaired(multi):
    runs, _, md = multi
    rows = {r["arm"]: r for r in table_with(md, "seeds")}
    arms = per_arm(runs)
    static = {s["seed"]: s for s in arms["static"]}
    assert rows["static"]["Δ mean loss vs static"] == "—"
    for metric, column, tol in [(mean_loss, "Δ mean loss vs static", 5.1e-5),
                                (worst_progress, "Δ worst progress vs static", 5.1e-4)]:
        # velocitune ran the static seeds: paired by seed
        d = np.array([metric(s) - metric(static[s["seed"]]) for s in arms["velocitune"]])
        cell = rows["velocitune"][column]
        assert cell.endswith("(paired)")
        assert floats(cell) == pytest.approx([d.mean(), d.std(ddof=1) / math.sqrt(d.size)], abs=tol)
        # dbl ran other seeds: difference of means with the Welch standard error
        a = np.array([metric(s) for s in arms["dbl"]])
        r = np.array([metric(s) for s in arms["static"]])
        se = math.sqrt(a.var(ddof=1) / a.size + r.var(ddof=1) / r.size)
        cell = rows["dbl"][column]
        assert cell.endswith("(unpaired)")
        assert floats(cell) == pytest.approx([a.mean() - r.mean(), se], abs=tol)


def test_multi_seed_keeps_per_run_table_in_details(multi):
    runs, _, md = multi
    details = md[md.index("<details>"): md.index("</details>")]
    rows = table_with(details, "worst progress")
    assert len(rows) == len(runs)


# ----------------------------------------------------------------------------------------------------------
# CLI


def test_cli_main_writes_report_whatever_the_package_version(tmp_path, capsys):
    """Formats carry their own versions: a run written by another velocitune release reads when they match."""
    run = fabricate_run(tmp_path, "r", arm="velocitune", rule="velocitune", version="7.3.0",
                        final={"math": 2.7, "code": 2.4, "prose": 2.6})
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(run), "--out", str(tmp_path / "out"), "--title", "CLI"])
    assert main(args) == 0
    assert (tmp_path / "out" / "report.md").read_text().startswith("# CLI")
    assert "report.md" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# Downstream scores (downstream.json from `velocitune eval`)


def _write_scores(run, scores: dict[str, dict[str, float]]) -> None:
    from velocitune import runfiles

    runfiles.write_downstream(run / runfiles.DOWNSTREAM_FILE, {
        "model": str(run / "final"), "lm_eval_version": "0.4.13",
        "tasks": {t: {"metrics": m, "stderr": {k: None for k in m}, "samples": 100} for t, m in scores.items()}})


def _section(md: str, heading: str) -> str:
    """The text of one `## heading` section of report.md."""
    start = md.index(f"## {heading}\n")
    end = md.find("\n## ", start + 1)
    return md[start: len(md) if end < 0 else end]


def test_downstream_scores_have_their_own_tables(tmp_path):
    rng = np.random.default_rng(7)
    runs, em, acc = [], {}, {}
    for arm, rule, base in (("static", "static", 0.30), ("velocitune", "velocitune", 0.36)):
        for seed in (0, 1, 2):
            run = fabricate_run(tmp_path, f"{arm}-s{seed}", arm=arm, rule=rule, seed=seed, final=FINAL)
            em[arm, seed], acc[arm, seed] = base + rng.normal(0, 0.02), 0.5 + rng.normal(0, 0.05)
            _write_scores(run, {"math": {"exact_match": em[arm, seed]}, "code": {"acc": acc[arm, seed]}})
            runs.append(run)
    # A run evaluated on nothing: its cells are dashes, and its arm's statistics cannot be formed.
    runs.append(fabricate_run(tmp_path, "uniform-s0", arm="uniform", rule="uniform", final=FINAL))
    md = make_report(runs, tmp_path / "report").read_text()

    # The results tables (per arm, and per run in the details) are not widened by the scores.
    results = _section(md, "Results per arm")
    assert "exact_match" not in results and "code acc" not in results
    assert list(table_with(results, "seeds")[0]) == [
        "arm", "seeds", *[f"loss {d}" for d in DOMAINS], "mean loss", "Δ mean loss vs static", "worst progress",
        "Δ worst progress vs static", "wall time", "reweighting"]

    downstream = _section(md, "Downstream scores")
    arm_rows = {r["arm"]: r for r in table_with(downstream, "Δ math exact_match vs static")}
    assert list(arm_rows["static"]) == ["arm", "seeds", "math exact_match", "Δ math exact_match vs static",
                                        "code acc", "Δ code acc vs static"]
    for arm in ("static", "velocitune"):
        values = [em[arm, s] for s in (0, 1, 2)]
        assert floats(arm_rows[arm]["math exact_match"]) == pytest.approx([np.mean(values), np.std(values, ddof=1)],
                                                                         abs=5e-4)
    d = np.array([em["velocitune", s] - em["static", s] for s in (0, 1, 2)])
    assert floats(arm_rows["velocitune"]["Δ math exact_match vs static"]) == pytest.approx(
        [d.mean(), d.std(ddof=1) / math.sqrt(3)], abs=5e-4)
    assert "paired" in arm_rows["velocitune"]["Δ code acc vs static"]
    assert arm_rows["uniform"]["math exact_match"] == "n/a"
    details = downstream[downstream.index("<details>"): downstream.index("</details>")]
    run_rows = {r["run"]: r for r in table_with(details, "code acc")}
    assert list(run_rows["static-s0"]) == ["run", "arm", "seed", "math exact_match", "code acc"]
    assert float(run_rows["velocitune-s1"]["code acc"]) == pytest.approx(acc["velocitune", 1], abs=5e-4)
    assert run_rows["uniform-s0"]["code acc"] == "—"


def test_downstream_scores_one_seed_per_arm_with_delta_without_spread(tmp_path):
    runs = []
    for arm, rule, score in (("static", "static", 0.25), ("velocitune", "velocitune", 0.375)):
        run = fabricate_run(tmp_path, arm, arm=arm, rule=rule, final=FINAL)
        _write_scores(run, {"math": {"exact_match": score}})
        runs.append(run)
    md = make_report(runs, tmp_path / "report").read_text()
    assert "exact_match" not in _section(md, "Results")
    rows = {r["run"]: r for r in table_with(_section(md, "Downstream scores"), "math exact_match")}
    assert float(rows["velocitune"]["math exact_match"]) == pytest.approx(0.375)
    assert rows["velocitune"]["Δ math exact_match vs static"] == "+0.125 (no spread)"
    assert rows["static"]["Δ math exact_match vs static"] == "—"


def test_report_without_downstream_scores_has_no_such_section(single):
    _, _, md = single
    assert "exact_match" not in md and "## Downstream scores" not in md
    assert "downstream.json" in md  # (explained in How to read)


# ----------------------------------------------------------------------------------------------------------
# Report details (issue 28): tokens, signal of fixed rules, the targets table's source, Δ with one seed


@pytest.mark.parametrize("n, text", [
    (0, "0"), (7, "7"), (552, "552"), (999, "999"), (1_000, "1k"), (1_566, "1.57k"), (15_000, "15k"),
    (15_400, "15.4k"), (999_400, "999k"), (999_600, "1M"), (1_234_567, "1.23M"), (12_000_000, "12M"),
    (4_560_000_000, "4.56B"), (2.5e12, "2.5T"),
])
def test_fmt_tokens_readable_at_every_scale(n, text):
    assert fmt_tokens(n) == text


def test_fmt_tokens_reads_back_within_three_significant_digits():
    for n in np.unique(np.round(np.logspace(0, 13, 400))):
        cell = fmt_tokens(n)
        assert "e" not in cell and len(cell.replace(".", "").replace(",", "")) <= 5, cell
        assert tokens_value(cell) == pytest.approx(n, rel=5.1e-3), (n, cell)


def test_small_run_tokens_are_not_rounded_to_millions(tmp_path):
    """The issue's run: ~15k tokens per domain showed as 0.015 (M); they read 15k-ish now, in table and list."""
    run = fabricate_run(tmp_path, "small", arm="velocitune", rule="velocitune", final=FINAL, total_tokens=41_000)
    md = make_report([run], tmp_path / "report").read_text()
    tokens = read_summary(run)["tokens_per_domain"]
    row = table_with(md, "worst progress")[0]
    for d in DOMAINS:
        assert row[f"tokens {d}"].endswith("k") and 1_000 <= tokens[d] < 1_000_000
        assert tokens_value(row[f"tokens {d}"]) == pytest.approx(tokens[d], rel=5.1e-3)
    assert "100 steps, 41k tokens)" in md and "(M)" not in md


def test_fixed_rules_have_no_signal_in_the_run_list(single):
    runs, _, md = single
    lines = {r.name: next(line for line in md.splitlines() if line.startswith(f"- `{r.name}`")) for r in runs}
    assert "signal" not in lines["static-s0"] and "rule `static`" in lines["static-s0"]
    assert "signal `eval`" in lines["velo-s0"] and "signal `train`" in lines["velo-train-s0"]


def test_targets_section_says_whose_values_it_shows(single):
    _, _, md = single
    section = _section(md, "Initial losses and targets")
    assert "Values of" not in md
    intro = section.splitlines()[2]  # heading, blank, then the sentence naming the run
    assert intro.startswith("ℓ_init and ℓ_target of the run `velo-s0`, the first run with targets")
    assert section.index(intro) < section.index("| domain |")


def test_one_seed_per_arm_shows_delta_to_static_without_spread(single):
    runs, _, md = single
    assert "### Δ to `static` (one seed per arm)" in md and "≥ 2 seeds per arm" in md
    rows = {r["arm"]: r for r in table_with(md, "Δ mean loss vs static")}
    assert set(rows) == {"velocitune", "velocitune-train"}  # the static arm is the reference, not a row
    static = read_summary(runs[0])
    for run in runs[1:]:
        s = read_summary(run)
        row = rows[s["arm"]]
        assert row["Δ mean loss vs static"].endswith("(no spread)")
        assert floats(row["Δ mean loss vs static"])[0] == pytest.approx(mean_loss(s) - mean_loss(static), abs=5.1e-5)
        # both runs' progress uses velo-s0's targets (static-s0 borrows them)
        assert floats(row["Δ worst progress vs static"])[0] == pytest.approx(
            worst_progress(s) - worst_progress(static), abs=5.1e-4)


def test_one_seed_per_arm_without_static_says_why_there_is_no_delta(tmp_path):
    runs = [fabricate_run(tmp_path, arm, arm=arm, rule=arm, final=FINAL) for arm in ("velocitune", "dbl")]
    md = make_report(runs, tmp_path / "report").read_text()
    assert "No static arm was given" in md and "Δ" not in _section(md, "Results")


# ----------------------------------------------------------------------------------------------------------
# Online targets (issue 27): per-domain Δ to static against max_rise, the online targets' errors

STATIC_FINAL = {"math": 2.90, "code": 2.50, "prose": 2.55}
# Δ to static: math +0.05 (above max_rise 0.03: a breach), code +0.01 (within it), prose -0.05
ONLINE_FINAL = {"math": 2.95, "code": 2.51, "prose": 2.50}


def _delta_rows(md: str) -> dict[str, dict[str, str]]:
    return {r["arm"]: r for r in table_with(md, "max_rise (nats)")}


def test_breach_flagged_above_max_rise_one_seed(tmp_path):
    runs = [fabricate_run(tmp_path, "static", arm="static", rule="static", final=STATIC_FINAL, targets=None),
            fabricate_run(tmp_path, "velo", arm="velocitune", rule="velocitune", final=ONLINE_FINAL, online=True,
                          max_rise=0.03),
            # the same losses with max_rise = inf (trades allowed): nothing to breach
            fabricate_run(tmp_path, "trade", arm="trade", rule="velocitune", final=ONLINE_FINAL, online=True,
                          max_rise=math.inf)]
    md = make_report(runs, tmp_path / "report").read_text()
    rows = _delta_rows(md)
    assert set(rows) == {"velocitune", "trade"}  # the static arm is the reference, not a row
    velo = rows["velocitune"]
    assert velo["max_rise (nats)"] == "0.03"
    assert velo["Δ loss math vs static"] == "+0.0500 (no spread) **breach**"
    assert velo["Δ loss code vs static"] == "+0.0100 (no spread)"
    assert velo["Δ loss prose vs static"] == "-0.0500 (no spread)"
    assert rows["trade"]["max_rise (nats)"] == "—"
    assert not any("breach" in cell for cell in rows["trade"].values())
    assert "**Breaches of max_rise**: `velocitune` on `math`: Δ +0.0500 > max_rise 0.03." in md
    assert "on `code`" not in md and "`trade` on" not in md
    # the existing single-seed Δ table is unchanged
    assert list(table_with(md, "Δ mean loss vs static")[0]) == [
        "arm", "seed", "Δ mean loss vs static", "Δ worst progress vs static"]


def test_breach_flagged_on_the_paired_mean_over_seeds(tmp_path):
    runs = []
    for seed, shift in ((0, 0.0), (1, 0.02), (2, -0.01)):  # the seeds shift both arms alike: paired Δ is exact
        runs.append(fabricate_run(tmp_path, f"static-s{seed}", arm="static", rule="static", seed=seed,
                                  final={d: v + shift for d, v in STATIC_FINAL.items()}))
        runs.append(fabricate_run(tmp_path, f"velo-s{seed}", arm="velocitune", rule="velocitune", seed=seed,
                                  final={d: v + shift for d, v in ONLINE_FINAL.items()}, online=True, max_rise=0.03))
    md = make_report(runs, tmp_path / "report").read_text()
    velo = _delta_rows(_section(md, "Results per arm"))["velocitune"]
    math_cell, code_cell = velo["Δ loss math vs static"], velo["Δ loss code vs static"]
    assert math_cell.endswith("(paired) **breach**") and floats(math_cell)[0] == pytest.approx(0.05, abs=5.1e-5)
    assert code_cell.endswith("(paired)") and floats(code_cell)[0] == pytest.approx(0.01, abs=5.1e-5)
    assert "`velocitune` on `math`" in md and "`velocitune` on `code`" not in md
    # the arm table keeps its columns
    assert list(table_with(md, "seeds")[0]) == [
        "arm", "seeds", *[f"loss {d}" for d in DOMAINS], "mean loss", "Δ mean loss vs static", "worst progress",
        "Δ worst progress vs static", "wall time", "reweighting"]


def test_no_breach_line_says_so(single):
    _, _, md = single
    rows = _delta_rows(md)
    assert all(r["max_rise (nats)"] == "—" for r in rows.values())
    assert "No arm sets a finite `mixing.max_rise`, so no breach is checked." in md
    assert "**breach**" not in md.replace("marked **breach**", "")


def test_target_error_table_by_hand(tmp_path):
    """The fabricated online run's targets sit 0.2 · (1 − frac) above its final losses, updates at steps 0, 17,
    33, 50, 67, 83 of 100: at 25 % the update at 17 (frac 1/6: 0.2 · 5/6), at 50 % the one at 50 (0.1), at
    75 % the one at 67 (frac 4/6: 0.2 · 2/6)."""
    runs = [fabricate_run(tmp_path, "static", arm="static", rule="static", final=STATIC_FINAL),
            fabricate_run(tmp_path, "velo", arm="velocitune", rule="velocitune", final=ONLINE_FINAL, online=True,
                          max_rise=0.03),
            # one update, at step 50 (0.2 · 1/2 = 0.1 above the final loss): nothing refitted by 25 %
            fabricate_run(tmp_path, "late", arm="late", rule="velocitune", final=ONLINE_FINAL, online=True,
                          n_updates=2)]
    md = make_report(runs, tmp_path / "report").read_text()
    rows = {r["run"]: r for r in table_with(md, "largest at 50 %")}
    assert list(rows) == ["velo", "late"]  # the static run refits nothing
    for d in DOMAINS:
        assert [float(rows["velo"][f"{d} at {p} %"]) for p in (25, 50, 75)] == pytest.approx(
            [1 / 6, 0.1, 1 / 15], abs=5.1e-5)
        assert rows["late"][f"{d} at 25 %"] == "—"
        assert [float(rows["late"][f"{d} at {p} %"]) for p in (50, 75)] == pytest.approx([0.1, 0.1], abs=5.1e-5)
    assert float(rows["velo"]["largest at 50 %"]) == pytest.approx(0.1, abs=5.1e-5)
    assert "### Online targets against the final loss" in _section(md, "Results")


def test_no_target_error_table_without_online_runs(single):
    _, _, md = single
    assert "largest at 50 %" not in md and "Online targets against" not in md


def test_target_error_table_largest_at_half_over_domains():
    """Hand-made runs over 100 steps, final losses a 2.0, b 3.0: at 50 % the update at 40 decides."""
    def run(name: str, at_40: dict) -> Run:
        mixture = [{"step": s, "tokens": 1000.0 * s, "sampling_weights": {"a": 0.5, "b": 0.5}, "velocity": None,
                    "targets": t, **({"static_prediction": {"a": 2.0, "b": 3.0}} if s else {})}
                   for s, t in ((0, {"a": 1.5, "b": 2.5}), (40, at_40))]
        summary = {"steps": 100, "final_val_loss": {"a": 2.0, "b": 3.0}, "domains": ["a", "b"], "arm": name,
                   "rule": "velocitune", "seed": 0}
        return Run(path=Path("/nowhere") / name, name=name, summary=summary, evals=[], mixture=mixture,
                   targets_file=None)

    table = target_error_table([run("one", {"a": 2.1, "b": None}), run("two", {"a": 1.9, "b": 3.3})], ["a", "b"])
    rows = {r["run"]: r for r in md_tables(table)[0]}
    assert rows["one"]["a at 25 %"] == "—" and rows["one"]["a at 50 %"] == "0.1000" and rows["one"]["b at 50 %"] == "—"
    assert rows["one"]["largest at 50 %"] == "0.1000"  # |2.1 − 2.0|; b has no target
    assert rows["two"]["b at 75 %"] == "0.3000" and rows["two"]["largest at 50 %"] == "0.3000"  # |3.3 − 3.0| > 0.1
