"""Tests for velocitune.report.plots: valid, non-trivial PNGs linked from report.md, stale plots removed, and
targets.png drawing each domain's fit with the law that made its prediction (checked on the Figure's lines
and legend before it is saved)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from report.rundirs import assert_valid_png, fabricate_run, table_with

from velocitune import runfiles
from velocitune.laws import lr_areas
from velocitune.report import domain_colours, make_report, plot_targets, targets_figure

CHINCHILLA_FORM = "L(D) = E + B/D^β"
CPT_LAW_FORM = "L(t) = ℓ_init + B(1 − (1 + E·S1(t))^−β) − C·S2(t)"
PLOTS = ("weights.png", "val_loss.png", "velocity.png", "targets.png")

# ----------------------------------------------------------------------------------------------------------
# The report's plots


def test_plots_exist_are_png_and_linked(single):
    _, out, md = single
    for name in PLOTS:
        assert_valid_png(out / name)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert sorted(links) == ["targets.png", "val_loss.png", "velocity.png", "weights.png"]
    assert all((out / link).is_file() for link in links)


def test_multi_seed_plots_are_png(multi):
    _, out, _ = multi
    for name in PLOTS:
        assert_valid_png(out / name)


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


# ----------------------------------------------------------------------------------------------------------
# targets.png: each fit with its own law

BUDGET = 1_000_000  # main run: 100 steps of 10k tokens; proxy: its first 20 steps' worth, schedule compressed
MAIN_STEPS, PROXY_STEPS, PER_STEP = 100, 20, 10_000


def _schedule(steps: int, peak: float = 3e-3) -> np.ndarray:
    """Linear warm-up over a tenth of the steps, then linear decay to a tenth of the peak."""
    warm = steps // 10
    return np.concatenate([np.arange(1, warm + 1) / warm * peak, np.linspace(peak, peak / 10, steps - warm)])


def _cpt_curve(steps: int, init: float, B=-0.9, E=2000.0, beta=0.6, C=15.0) -> list[list[float]]:
    """The anchored CPT law along a run of `steps` steps: [[tokens, loss], ...]."""
    S1, S2 = lr_areas(_schedule(steps), steps // 10)
    loss = init + B * (1 - (1 + E * S1) ** -beta) - C * S2
    return [[float((t + 1) * PER_STEP), float(v)] for t, v in enumerate(loss)]


def cpt_entry(init: float = 3.0, curves: bool = True) -> dict:
    fit_curve, prediction = _cpt_curve(PROXY_STEPS, init), _cpt_curve(MAIN_STEPS, init)
    entry = {"init": init, "points": fit_curve[1::2], "target": prediction[-1][1], "predictor": "cpt_law",
             "guarded": False, "params": {"B": -0.9, "E": 2000.0, "beta": 0.6, "C": 15.0, "loss_init": init},
             "r2": 0.991, "interval": None, "warnings": []}
    return {**entry, "fit_curve": fit_curve, "prediction_curve": prediction} if curves else entry


def chinchilla_entry(E: float = 1.8, B: float = 30.0, beta: float = 0.3, curves: bool = True) -> dict:
    law = lambda D: E + B / D ** beta
    proxy = np.arange(2, PROXY_STEPS + 1, 2) * PER_STEP
    entry = {"init": 3.5, "points": [[float(D), law(D)] for D in proxy], "target": law(BUDGET),
             "predictor": "chinchilla", "guarded": False, "params": {"E": E, "B": B, "beta": beta}, "r2": 0.998,
             "interval": None, "warnings": []}
    if curves:
        entry["fit_curve"] = [[float(D), law(D)] for D in np.geomspace(proxy[0], proxy[-1], 16)]
        entry["prediction_curve"] = [[float(D), law(D)] for D in np.geomspace(proxy[0], BUDGET, 16)]
    return entry


def loglinear_entry() -> dict:
    pts = [[float(D), 3.0 - 0.1 * np.log(D / 1e4)] for D in np.arange(2, PROXY_STEPS + 1, 2) * PER_STEP]
    return {"init": 3.2, "points": pts, "target": 2.5, "predictor": "loglinear", "guarded": False,
            "params": {}, "r2": None, "interval": None, "warnings": []}


def targets_doc(tmp_path, entries: dict[str, dict]) -> dict:
    """A targets.json document written and read back through runfiles, as the report and `targets` read it."""
    path = tmp_path / "targets.json"
    runfiles.write_targets(path, {"predictor": "auto", "budget_tokens": float(BUDGET), "domains": entries})
    return runfiles.read_targets(path)


def figure(doc: dict):
    names = list(doc["domains"])
    return targets_figure(doc, names, [], domain_colours(names), None)


def lines_by_style(ax) -> dict[str, list]:
    out: dict[str, list] = {}
    for line in ax.get_lines():
        out.setdefault(line.get_linestyle(), []).append(line)
    return out


def legend_text(fig) -> str:
    return "\n".join(t.get_text() for legend in fig.legends for t in legend.get_texts())


def test_each_fit_drawn_with_its_own_law(tmp_path):
    doc = targets_doc(tmp_path, {"code": cpt_entry(), "prose": chinchilla_entry()})
    fig = figure(doc)
    for ax, (name, entry) in zip(fig.axes, doc["domains"].items()):
        lines = lines_by_style(ax)
        assert len(lines["-"]) == 1 and len(lines["--"]) == 1, f"{name}: one solid fit, one dashed prediction"
        np.testing.assert_allclose(lines["-"][0].get_xydata(), entry["fit_curve"])
        prediction = lines["--"][0].get_xydata()
        np.testing.assert_allclose(prediction, entry["prediction_curve"])
        assert prediction[-1] == pytest.approx([BUDGET, entry["target"]])  # ends at the target, at the budget
        star = [line for line in lines["None"] if line.get_marker() == "*"]
        assert len(star) == 1 and star[0].get_xydata()[0] == pytest.approx([BUDGET, entry["target"]])
    titles = [ax.get_title() for ax in fig.axes]
    assert "CPT law" in titles[0] and "R² 0.991" in titles[0]
    assert "Chinchilla" in titles[1] and "R² 0.998" in titles[1]
    legend = legend_text(fig)
    assert CPT_LAW_FORM in legend and CHINCHILLA_FORM in legend


@pytest.mark.parametrize("law", ["cpt_law", "chinchilla"])
def test_legend_names_only_the_laws_in_the_figure(tmp_path, law):
    entry = cpt_entry() if law == "cpt_law" else chinchilla_entry()
    legend = legend_text(figure(targets_doc(tmp_path, {"a": entry, "b": entry})))
    assert (CPT_LAW_FORM in legend) == (law == "cpt_law")
    assert (CHINCHILLA_FORM in legend) == (law == "chinchilla")


def test_cpt_law_without_curves_draws_no_line(tmp_path):
    """An older targets.json: a CPT-law entry has no curve of its own law to draw, and gets none of another."""
    doc = targets_doc(tmp_path, {"code": cpt_entry(curves=False)})
    fig = figure(doc)
    (ax,) = fig.axes
    assert set(lines_by_style(ax)) == {"None"}  # the star only: markers, no line
    assert len(ax.collections) == 1  # the proxy points
    assert CPT_LAW_FORM in legend_text(fig) and CHINCHILLA_FORM not in legend_text(fig)


def test_chinchilla_without_curves_drawn_from_its_params(tmp_path):
    doc = targets_doc(tmp_path, {"prose": chinchilla_entry(curves=False)})
    entry = doc["domains"]["prose"]
    (ax,) = figure(doc).axes
    lines = lines_by_style(ax)
    fit, prediction = lines["-"][0].get_xydata(), lines["--"][0].get_xydata()
    p = entry["params"]
    np.testing.assert_allclose(fit[:, 1], p["E"] + p["B"] / fit[:, 0] ** p["beta"])
    assert fit[0, 0] == pytest.approx(entry["points"][0][0]) and fit[-1, 0] == pytest.approx(entry["points"][-1][0])
    assert prediction[-1] == pytest.approx([BUDGET, entry["target"]])


def test_loglinear_has_no_curve_and_says_so(tmp_path):
    fig = figure(targets_doc(tmp_path, {"math": loglinear_entry(), "code": cpt_entry()}))
    assert set(lines_by_style(fig.axes[0])) == {"None"}
    assert "log-linear" in fig.axes[0].get_title()
    legend = legend_text(fig)
    assert "loglinear" in legend and "no curve" in legend
    assert CPT_LAW_FORM in legend and CHINCHILLA_FORM not in legend


def test_plot_targets_writes_png(tmp_path):
    doc = targets_doc(tmp_path, {"math": loglinear_entry(), "code": cpt_entry(), "prose": chinchilla_entry(),
                                 "old": cpt_entry(curves=False)})
    names = list(doc["domains"])
    plot_targets(doc, names, [], domain_colours(names), None, tmp_path / "targets.png")
    assert_valid_png(tmp_path / "targets.png")


# ----------------------------------------------------------------------------------------------------------
# online_targets.png (issue 27)


def test_online_targets_plot_drawn_when_a_run_refits_and_removed_when_none_does(tmp_path):
    static = fabricate_run(tmp_path, "static", arm="static", rule="static", final={"math": 2.9, "code": 2.5,
                                                                                    "prose": 2.55})
    online = fabricate_run(tmp_path, "velo", arm="velocitune", rule="velocitune", online=True, max_rise=0.03,
                           final={"math": 2.95, "code": 2.51, "prose": 2.5})
    fixed = fabricate_run(tmp_path, "fixed", arm="fixed", rule="velocitune", final={"math": 2.8, "code": 2.4,
                                                                                     "prose": 2.6})
    out = tmp_path / "report"
    md = make_report([static, online, fixed], out).read_text()
    assert_valid_png(out / "online_targets.png")
    assert "![online_targets](online_targets.png)" in md and "no online-target plot" not in md

    # the same folder, no run refitting its targets (fixed targets never change): the stale plot goes
    md = make_report([static, fixed], out).read_text()
    assert not (out / "online_targets.png").exists()
    assert "online_targets.png" not in md
    assert "No run refits its targets (mixing.online), so there is no online-target plot." in md


def test_online_targets_figure_draws_each_refitting_arm_and_its_final_loss(tmp_path, monkeypatch):
    """One panel per domain; per refitting arm its targets at the updates (solid) and its final loss (dashed)."""
    from matplotlib.figure import Figure

    from velocitune.report import arm_colours, load_run, plot_online_targets

    saved = []
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **k: saved.append(fig))
    final = {"math": 2.95, "code": 2.51, "prose": 2.5}
    run = load_run(fabricate_run(tmp_path, "velo", arm="velocitune", rule="velocitune", online=True, final=final))
    plot_online_targets([("velocitune", run)], list(final), arm_colours(["velocitune"], None), tmp_path / "x.png")
    (fig,) = saved
    assert [ax.get_title() for ax in fig.axes] == list(final)
    for ax, loss in zip(fig.axes, final.values()):
        lines = lines_by_style(ax)
        (targets,) = lines["-"]
        fracs = np.arange(1, 6) / 6  # the updates after step 0
        np.testing.assert_allclose(targets.get_ydata(), loss + 0.2 * (1 - fracs))
        np.testing.assert_allclose(targets.get_xdata(), np.round(fracs * 1_200_000))
        dashed = [line for line in lines["--"] if len(line.get_ydata())]
        assert len(dashed) == 1 and dashed[0].get_ydata()[0] == pytest.approx(loss)
        assert dashed[0].get_color() == targets.get_color()
    assert "velocitune" in legend_text(fig) and "final validation loss" in legend_text(fig)
