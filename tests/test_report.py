"""Tests for velocitune.report: tables checked against the run files, multi-seed statistics against numpy,
valid non-trivial PNGs, and clear errors for incomplete, foreign or mismatched run directories."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

import velocitune
from velocitune.errors import DataError
from velocitune.report import add_arguments, difference, main, make_report, mean_sd, normalised_progress

DOMAINS = ("math", "code", "prose")
INIT = {"math": 3.2, "code": 2.8, "prose": 2.5}
# prose is predicted to get slightly worse (l_init - l_target < 0): its progress must show as n/a.
TARGETS = {"math": 2.4, "code": 2.1, "prose": 2.51}
W0 = {"math": 0.5, "code": 0.3, "prose": 0.2}
LAW_B, LAW_BETA = 20.0, 0.35  # proxy points follow L(D) = E + B / D^beta with L(budget) = target


# ----------------------------------------------------------------------------------------------------------
# A consistent fabricated run directory


def fabricate_run(root: Path, name: str, *, arm: str, rule: str, signal: str = "eval", seed: int = 0,
                  final: dict[str, float], total_tokens: float = 1.2e6, wall: float = 300.0,
                  t_eval: float = 40.0, t_update: float = 2.0, targets: dict | None = TARGETS,
                  targets_file: bool = True, domains=DOMAINS, version: str | None = None,
                  n_evals: int = 7, n_updates: int = 6) -> Path:
    """Write a run dir whose files agree: eval losses fall from l_init to `final`, weights move for
    reweighting rules, velocity follows from the losses, tokens per domain integrate the weights."""
    run = root / name
    run.mkdir(parents=True)
    init = {d: INIT[d] for d in domains}
    w0 = np.array([W0[d] for d in domains])
    w0 = w0 / w0.sum()
    steps, tokens_per_step = 100, total_tokens / 100

    def loss_at(frac: float) -> dict[str, float]:
        return {d: init[d] + (final[d] - init[d]) * (1 - (1 - frac) ** 2) for d in domains}

    evals = []
    for j in range(n_evals):
        frac = j / (n_evals - 1)
        evals.append({"step": round(frac * steps), "tokens": frac * total_tokens, "losses": loss_at(frac),
                      "tokens_evaluated": {d: 4096 for d in domains}, "elapsed_s": frac * wall})

    moving = rule not in ("static", "uniform", "temperature", "replay")
    fracs = np.linspace(0, 1, n_updates, endpoint=False) if moving else np.array([0.0])
    drift = np.linspace(-1, 1, len(domains))  # weights move in opposite directions per domain
    mixture, cum = [], np.zeros(len(domains))
    for j, frac in enumerate(fracs):
        w = w0 * np.exp(drift * frac * (1 + 0.3 * seed))
        w = w / w.sum()
        losses = loss_at(frac)
        velocity = None
        if moving and targets is not None and frac > 0:
            velocity = {d: float(np.clip((losses[d] - targets[d]) / max(init[d] - targets[d], 0.02), 0, 1))
                        for d in domains}
        mixture.append({"step": round(frac * steps), "tokens": frac * total_tokens, "signal": signal,
                        "losses": losses, "init": init, "targets": targets, "velocity": velocity,
                        "weights": dict(zip(domains, w.tolist())), "sampling_weights": dict(zip(domains, w.tolist())),
                        "tokens_per_domain": dict(zip(domains, cum.tolist())), "guarded": []})
        span = ((fracs[j + 1] if j + 1 < len(fracs) else 1.0) - frac) * total_tokens
        cum = cum + w * span

    with open(run / "eval.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in evals)
    with open(run / "mixture.jsonl", "w") as f:
        f.writelines(json.dumps(m) + "\n" for m in mixture)
    with open(run / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": steps, "tokens": total_tokens, "loss": 2.5, "lr": 1e-4}) + "\n")
    (run / "config.yaml").write_text(f"mixing:\n  rule: {rule}\n  signal: {signal}\nrun:\n  seed: {seed}\n")
    (run / "init_loss.json").write_text(json.dumps({"model": "tiny", "domains": {
        d: {"loss": init[d], "tokens": 4096} for d in domains}}))
    if targets is not None and targets_file:
        fits = {}
        for d in domains:
            E = targets[d] - LAW_B / total_tokens ** LAW_BETA
            pts = [[D, E + LAW_B / D ** LAW_BETA] for D in np.linspace(0.01, 0.1, 10) * total_tokens]
            fits[d] = {"init": init[d], "points": pts, "params": {"E": E, "B": LAW_B, "beta": LAW_BETA},
                       "r2": 0.995, "interval": [targets[d] - 0.05, targets[d] + 0.05], "target": targets[d],
                       "predictor": "chinchilla", "guarded": init[d] <= targets[d], "warnings": []}
        (run / "targets.json").write_text(json.dumps({
            "version": 1, "predictor": "chinchilla", "budget_tokens": total_tokens, "proxy_fraction": 0.1,
            "proxy_tokens": 0.1 * total_tokens, "proxy_wall_time_s": 12.3, "domains": fits}))
    summary = {"velocitune_version": velocitune.__version__ if version is None else version, "arm": arm,
               "rule": rule, "signal": signal, "seed": seed, "domains": list(domains), "steps": steps,
               "tokens": total_tokens, "init_loss": init, "targets": targets, "final_val_loss": evals[-1]["losses"],
               "tokens_per_domain": dict(zip(domains, cum.tolist())),
               "epochs_per_domain": {d: 0.5 for d in domains}, "wall_time_s": wall, "time_eval_s": t_eval,
               "time_update_s": t_update, "time_data_s": 3.0, "complete": True}
    if version == "":
        del summary["velocitune_version"]
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def read_summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


# ----------------------------------------------------------------------------------------------------------
# Reading the markdown back


def md_tables(md: str) -> list[list[dict[str, str]]]:
    """Every markdown table in the text, as a list of {header: cell} rows."""
    tables, lines = [], md.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("| ") and i + 1 < len(lines) and re.match(r"^\|[:\-|]+\|$", lines[i + 1]):
            header = [c.strip() for c in lines[i].strip("|").split(" | ")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("| "):
                rows.append(dict(zip(header, [c.strip() for c in lines[i].strip().strip("|").split(" | ")])))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def table_with(md: str, column: str) -> list[dict[str, str]]:
    found = [t for t in md_tables(md) if t and column in t[0]]
    assert len(found) == 1, f"expected one table with column {column!r}, found {len(found)}"
    return found[0]


def floats(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+|[-+]?\d+", cell)]


def hms(cell: str) -> float:
    h, m, s = (int(x) for x in cell.split(":"))
    return 3600 * h + 60 * m + s


# ----------------------------------------------------------------------------------------------------------
# Single-seed report: one row per run


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    runs = [
        # a static run without targets of its own: its progress borrows the velocitune run's targets
        fabricate_run(root, "static-s0", arm="static", rule="static", final={"math": 2.9, "code": 2.5, "prose": 2.55},
                      wall=250.0, t_eval=30.0, t_update=0.0, targets=None),
        fabricate_run(root, "velo-s0", arm="velocitune", rule="velocitune",
                      final={"math": 2.7, "code": 2.45, "prose": 2.6}, wall=320.0, t_eval=45.0, t_update=1.5),
        fabricate_run(root, "velo-train-s0", arm="velocitune-train", rule="velocitune", signal="train",
                      final={"math": 2.75, "code": 2.4, "prose": 2.58}, wall=260.0, t_eval=30.0, t_update=1.2),
    ]
    out = root / "report"
    path = make_report(runs, out)
    return runs, out, path.read_text()


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
            assert floats(row[f"tokens {d} (M)"])[0] == pytest.approx(s["tokens_per_domain"][d] / 1e6, abs=5.1e-4)
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
    runs, _, md = single
    rows = {r["domain"]: r for r in table_with(md, "ℓ_target (nats)")}
    for d in DOMAINS:
        assert floats(rows[d]["ℓ_init (nats)"])[0] == pytest.approx(INIT[d], abs=5.1e-5)
        assert floats(rows[d]["ℓ_target (nats)"])[0] == pytest.approx(TARGETS[d], abs=5.1e-5)
        assert floats(rows[d]["gap (nats)"])[0] == pytest.approx(INIT[d] - TARGETS[d], abs=5.1e-5)
        assert rows[d]["predictor"] == "chinchilla"
    assert "progress n/a" in rows["prose"]["note"] and rows["math"]["note"] == ""


def assert_valid_png(path: Path) -> None:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert len(data) > 10_000, f"{path.name} is only {len(data)} bytes"
    img = mpimg.imread(path)[..., :3]  # (H, W, 3) floats in [0, 1]
    assert img.var() > 1e-3, f"{path.name} is (almost) a single colour"
    rgb = (img * 255).astype(np.uint32)
    assert np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]).size > 20


def test_plots_exist_are_png_and_linked(single):
    _, out, md = single
    for name in ("weights.png", "val_loss.png", "velocity.png", "targets.png"):
        assert_valid_png(out / name)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == ["targets.png", "val_loss.png", "velocity.png", "weights.png"]
    assert all((out / link).is_file() for link in links)


# ----------------------------------------------------------------------------------------------------------
# Multi-seed report: one row per arm, differences to static


def noisy_final(base: dict[str, float], seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {d: base[d] + float(rng.normal(0, 0.02)) for d in DOMAINS}


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    runs = []
    arms = {  # arm -> (rule, seeds, base losses)
        "static": ("static", [0, 1, 2], {"math": 2.9, "code": 2.5, "prose": 2.55}),
        "velocitune": ("velocitune", [0, 1, 2], {"math": 2.7, "code": 2.45, "prose": 2.6}),
        "dbl": ("dbl", [5, 6], {"math": 2.8, "code": 2.35, "prose": 2.57}),
    }
    for arm, (rule, seeds, base) in arms.items():
        for seed in seeds:
            # dbl's seeds evaluate at different points: its curves cannot be averaged, only drawn per seed
            runs.append(fabricate_run(root, f"{arm}-s{seed}", arm=arm, rule=rule, seed=seed,
                                      final=noisy_final(base, 100 * seed + len(arm)), wall=200.0 + 10 * seed,
                                      n_evals=seed + 2 if arm == "dbl" else 7))
    out = root / "report"
    md = make_report(runs, out, title="Three arms").read_text()
    return runs, out, md


def per_arm(runs: list[Path]) -> dict[str, list[dict]]:
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
    runs, out, md = multi
    details = md[md.index("<details>"): md.index("</details>")]
    rows = table_with(details, "worst progress")
    assert len(rows) == len(runs)
    for name in ("weights.png", "val_loss.png", "velocity.png", "targets.png"):
        assert_valid_png(out / name)


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


# ----------------------------------------------------------------------------------------------------------
# Runs without targets; stale plots; CLI


def test_without_targets_no_progress_and_no_target_plots(tmp_path):
    runs = [fabricate_run(tmp_path, "a", arm="static", rule="static", targets=None,
                          final={"math": 2.9, "code": 2.5, "prose": 2.55}),
            fabricate_run(tmp_path, "b", arm="uniform", rule="uniform", targets=None,
                          final={"math": 2.8, "code": 2.6, "prose": 2.45})]
    out = tmp_path / "report"
    out.mkdir()
    (out / "velocity.png").write_bytes(b"stale")
    md = make_report(runs, out).read_text()
    rows = table_with(md, "mean loss")
    assert not any(k.startswith("progress") for k in rows[0])
    assert [r["reweighting"] for r in rows] == ["—", "—"]
    assert not (out / "velocity.png").exists() and not (out / "targets.png").exists()
    assert_valid_png(out / "weights.png")
    assert_valid_png(out / "val_loss.png")
    assert "no velocity plot" in md and "no target-fit plot" in md


def test_cli_main_writes_report_for_same_minor_version(tmp_path, capsys):
    major, minor = velocitune.__version__.split(".")[:2]
    run = fabricate_run(tmp_path, "r", arm="velocitune", rule="velocitune", version=f"{major}.{minor}.99",
                        final={"math": 2.7, "code": 2.4, "prose": 2.6})
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args([str(run), "--out", str(tmp_path / "out"), "--title", "CLI"])
    assert main(args) == 0
    assert (tmp_path / "out" / "report.md").read_text().startswith("# CLI")
    assert "report.md" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------
# Errors


FINAL = {"math": 2.7, "code": 2.4, "prose": 2.6}


def good_run(tmp_path: Path, name: str = "run", **kw) -> Path:
    return fabricate_run(tmp_path, name, arm="velocitune", rule="velocitune", final=FINAL, **kw)


def edit_summary(run: Path, **changes) -> None:
    s = read_summary(run)
    s.update(changes)
    (run / "summary.json").write_text(json.dumps(s))


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
    expect_error([run], tmp_path, str(run), "complete")


@pytest.mark.parametrize("missing", ["eval.jsonl", "mixture.jsonl"])
def test_error_missing_file(tmp_path, missing):
    run = good_run(tmp_path)
    (run / missing).unlink()
    expect_error([run], tmp_path, str(run), missing)


def test_error_other_version(tmp_path):
    run = good_run(tmp_path, version="7.3.0")
    expect_error([run], tmp_path, str(run), "7.3.0", velocitune.__version__)


def test_error_version_missing(tmp_path):
    run = good_run(tmp_path, version="")
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
    s = read_summary(run)
    del s["final_val_loss"]["code"]
    (run / "summary.json").write_text(json.dumps(s))
    expect_error([run], tmp_path, "final_val_loss", "code")


def test_error_malformed_targets_json(tmp_path):
    run = good_run(tmp_path)
    t = json.loads((run / "targets.json").read_text())
    t["domains"]["code"]["points"] = [[1000.0, "high"]]
    (run / "targets.json").write_text(json.dumps(t))
    expect_error([run], tmp_path, "targets.json", "'code'", "points[0] loss")


def test_error_missing_directory_and_duplicates(tmp_path):
    expect_error([tmp_path / "nope"], tmp_path, "nope", "does not exist")
    run = good_run(tmp_path)
    expect_error([run, tmp_path / "." / "run"], tmp_path, "given twice")
