"""`velocitune plan` and `mixing.plan`: the design, the share law, the recommendation, the proxies end to end,
--emit/--collect, and the bad inputs (a plan for other domains, a malformed plan.json, another budget)."""

from __future__ import annotations

import copy
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from velocitune import laws, runfiles
from velocitune.cli import main as cli_main
from velocitune.config import dump_yaml
from velocitune.errors import ConfigError, DataError, FitError
from velocitune.fileio import read_jsonl
from velocitune.laws import plan_predict
from velocitune.plan import make_plan
from velocitune.plan.design import design_mixtures, mixture_dirs, plan_proxy_config, plan_setup, proxy_steps
from velocitune.plan.fit import allowance_caps, fit_laws, main_budget_losses, recommend
from velocitune.plan.proxies import proxy_done
from velocitune.train import train

NAMES = ["prose", "code", "math"]


# ---------------------------------------------------------------------------------------------- design


def test_design_is_w0_uniform_and_a_tilt_toward_each_domain():
    w0 = np.array([0.6, 0.3, 0.1])
    d = design_mixtures(NAMES, w0, 0.5)
    assert [label for label, _ in d] == ["w0", "uniform", "tilt-prose", "tilt-code", "tilt-math"]
    for _, r in d:
        assert r.sum() == pytest.approx(1.0) and np.all(r >= 0)
    assert np.allclose(d[4][1], [0.3, 0.15, 0.55])
    # Uniform w0 makes the uniform mixture a duplicate: it is run once.
    assert [label for label, _ in design_mixtures(NAMES, np.full(3, 1 / 3), 0.5)][:2] == ["w0", "tilt-prose"]


def test_proxy_steps_share_the_budget_with_one_step_per_point():
    assert proxy_steps(1000, 5, 0.5, 6) == 100
    assert proxy_steps(20, 5, 0.5, 6) == 6  # never fewer steps than evaluation points
    assert proxy_steps(10, 2, 4.0, 6) == 10  # never longer than the main run


# ----------------------------------------------------------------------------------- laws and optimum


def _mixing_truth():
    """Known mixing laws for 3 domains, with transfer (code helps math): c_i + exp(u_i · r)."""
    c = np.array([2.0, 1.0, 0.8])
    U = np.array([[-0.2, 0.3, 0.3], [0.4, -0.8, 0.4], [0.5, -0.2, -1.0]])
    return lambda r: c + np.exp(np.atleast_2d(r) @ U.T)  # (m, 3)


def test_fit_laws_chooses_the_law_that_predicts_left_out_mixtures():
    truth = _mixing_truth()
    R = np.array([r for _, r in design_mixtures(NAMES, np.array([0.5, 0.3, 0.2]), 0.5)]
                 + [[0.2, 0.5, 0.3], [0.4, 0.2, 0.4]])
    Y = truth(R)
    fits, preds = fit_laws(R, Y, NAMES, "auto")
    assert all(f["law"] == "mixing" for f in fits.values())  # transfer: the own-share law cannot follow it
    probe = np.array([0.3, 0.3, 0.4])
    assert np.array([p(probe)[0] for p in preds]) == pytest.approx(truth(probe)[0], abs=1e-4)
    # Losses that depend only on the own share: the share law, with 3 parameters, generalises better.
    own = 1.5 + 0.3 * (R + laws.mixture_law.SHARE_EPS) ** -0.5
    fits, _ = fit_laws(R, own, NAMES, "auto")
    assert all(f["law"] == "share" for f in fits.values())
    assert fits["code"]["candidates"]["share"]["max_loo_error"] < 1e-4
    with pytest.raises(FitError, match="could not be fitted"):
        fit_laws(R[:3], Y[:3], NAMES, "mixing")


def _simplex_grid(step: float):
    n = int(round(1 / step))
    for i, j in itertools.product(range(n + 1), repeat=2):
        if i + j <= n:
            yield np.array([i, j, n - i - j]) / n


def _brute(truth, a, lo, hi, cap=None):
    best, best_f = None, np.inf
    for r in _simplex_grid(0.005):
        if np.any(r < lo - 1e-12) or np.any(r > hi + 1e-12):
            continue
        L = truth(r)[0]
        if cap is not None and L[cap[0]] > cap[1] + 1e-12:
            continue
        f = float(a @ L) / a.sum()
        if f < best_f:
            best, best_f = r, f
    return best, best_f


def test_recommend_finds_the_optimum_of_a_brute_force_search_under_box_and_rise_constraints():
    truth = _mixing_truth()
    preds = [lambda r, i=i: truth(r)[:, i] for i in range(3)]
    w0 = np.array([0.5, 0.3, 0.2])
    lo, hi = np.array([0.05, 0.05, 0.05]), np.array([0.9, 0.9, 0.9])
    a = np.ones(3)
    rec = recommend(preds, a, lo, hi, w0, {}, [w0])
    _, f_grid = _brute(truth, a, lo, hi)
    assert float(a @ truth(rec)[0]) / 3 <= f_grid + 1e-6
    # A cap on prose's rise over its loss at w0 binds and is honoured.
    tol = 0.01
    cap = truth(w0)[0][0] + tol
    assert truth(rec)[0][0] > cap, "the test needs the unconstrained optimum to violate the cap"
    rec_c = recommend(preds, a, lo, hi, w0, {0: tol}, [w0])
    assert truth(rec_c)[0][0] <= cap + 1e-6
    _, f_grid_c = _brute(truth, a, lo, hi, (0, cap))
    assert float(a @ truth(rec_c)[0]) / 3 <= f_grid_c + 1e-6
    # Weighting math's loss moves share toward what lowers it (math and code).
    rec_m = recommend(preds, np.array([1.0, 1.0, 5.0]), lo, hi, w0, {}, [w0])
    assert truth(rec_m)[0][2] < truth(rec)[0][2]


def test_stage1_offset_moves_each_mixture_effect_to_the_main_runs_level(make_config, tmp_path):
    cfg = make_config()
    labels = ["w0", "uniform", "tilt-prose"]
    X = np.array([[3.0, 2.0, 1.5], [2.9, 2.2, 1.4], [2.7, 2.3, 1.6]])  # each proxy's own extrapolation
    P = np.array([[4.0, 3.5, 3.0], [4.1, 3.4, 2.8], [3.9, 3.6, 3.1]])  # each proxy's end loss
    Y, source, cost = main_budget_losses(cfg, NAMES, labels, X, P)  # no targets file: the w0 proxy's fit is the base
    assert source == "the w0 proxy" and cost == 0.0
    assert Y == pytest.approx(X[0] + (P - P[0]))
    runfiles.write_targets(tmp_path / "t.json", {"proxy_cost_share": 0.2, "domains": {
        n: {"init": 5.0, "points": [], "target": t, "predictor": "cpt_law", "guarded": False}
        for n, t in zip(NAMES, [2.5, 1.9, 1.2])}})
    cfg.mixing.targets = str(tmp_path / "t.json")
    Y, source, cost = main_budget_losses(cfg, NAMES, labels, X, P)
    assert source == str(tmp_path / "t.json") and cost == 0.2
    assert Y[2] == pytest.approx([2.5 - 0.1, 1.9 + 0.1, 1.2 + 0.1])
    cfg.plan.stage1 = "extrapolate"
    assert main_budget_losses(cfg, NAMES, labels, X, P)[0] is X
    cfg.plan.stage1 = "offset"
    with pytest.raises(DataError, match="against the w0 proxy, which has not finished"):
        main_budget_losses(cfg, NAMES, labels[1:], X[1:], P[1:])


# ------------------------------------------------------------------------------------- end to end


def _plan_config(make_config, name="main", **extra):
    sections = {"train": {"steps": 60, "warmup_steps": 3}, "mixing": {"rule": "velocitune", "target_values": None},
                "eval": {"max_tokens": 128}, "plan": {"budget": 0.5, "points": 6}}
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    return make_config(name, **sections)


@pytest.fixture(scope="module")
def planned(tiny_prepared, tmp_path_factory):
    """A plan of the tiny set, made once: (main config, plan directory)."""
    from conftest import tiny_config

    root = tmp_path_factory.mktemp("plan")

    def make(name, **sections):
        return tiny_config(tiny_prepared, root / name, **sections)

    cfg = _plan_config(make)
    make_plan(cfg, root / "plan")
    return cfg, root / "plan"


def test_plan_writes_a_consistent_plan_within_its_budget(planned):
    cfg, out = planned
    doc = runfiles.read_plan(out / "plan.json", NAMES)
    assert (out / "plan.png").stat().st_size > 0 and (out / "init_loss.json").exists()
    assert len(doc["mixtures"]) == 5 and doc["proxy_steps"] == 6
    assert doc["cost_share"] == pytest.approx(5 * 6 / 60) and doc["cost_share"] <= cfg.plan.budget
    assert doc["budget_tokens"] == 60 * cfg.train.batch_size * cfg.data.seq_len
    rec = np.array([doc["recommended"][n] for n in NAMES])
    assert rec.sum() == pytest.approx(1.0)
    lo, hi = (np.array([doc["box"][b][n] for n in NAMES]) for b in ("lo", "hi"))
    assert np.all(rec >= lo - 1e-7) and np.all(rec <= hi + 1e-7)
    for n in NAMES:  # the stored prediction is the chosen law at the stored mixture
        assert plan_predict(doc, n, rec)[0] == pytest.approx(doc["predicted"][n], abs=1e-9)
        assert doc["fits"][n]["law"] in ("mixing", "share")
    # Each proxy trained the tokens its mixture asked for (the realised shares are what the laws fit).
    for m in doc["mixtures"]:
        s = runfiles.read_summary(Path(m["run_dir"]) / "summary.json")
        assert s["steps"] == 6 and s["rule"] == "static"
        toks = np.array([s["tokens_per_domain"][n] for n in NAMES], dtype=float)
        assert np.allclose(toks / toks.sum(), [m["shares"][n] for n in NAMES])
        # Without a targets file the w0 proxy's curve gives the base (6 points); the others are compared at
        # their end only, so they evaluate there (and at step 0, as every run does).
        evals = sorted({r["step"] for r in read_jsonl(Path(m["run_dir"]) / "eval.jsonl")})
        assert evals == ([0, 1, 2, 3, 4, 5, 6] if m["name"] == "w0" else [0, 6])
    assert doc["base"] == "the w0 proxy" and doc["base_cost_share"] == 0.0
    # The mean objective under the recommended mixture is no worse than at any mixture tried within the box
    # (the box is also capped by each domain's repetition allowance at the main budget).
    mean = lambda r: np.mean([plan_predict(doc, n, r)[0] for n in NAMES])  # noqa: E731
    tried = [np.array([m["shares"][n] for n in NAMES]) for m in doc["mixtures"]]
    inside = [r for r in tried if np.all(r >= lo - 1e-9) and np.all(r <= hi + 1e-9)]
    assert inside, "at least w0 lies in the box"
    assert mean(rec) <= min(map(mean, inside)) + 1e-6


def test_finished_proxies_are_reused_and_changed_ones_are_not(planned):
    cfg, out = planned
    doc = runfiles.read_plan(out / "plan.json")
    w0 = np.array([doc["mixtures"][0]["nominal"][n] for n in NAMES])
    design = design_mixtures(NAMES, w0, cfg.plan.tilt)
    dirs = mixture_dirs(out, design)
    configs = [plan_proxy_config(cfg, d, 60, doc["proxy_steps"], r, NAMES, label) for d, (label, r) in zip(dirs, design)]
    assert all(proxy_done(d, pc) for d, pc in zip(dirs, configs)), "a re-run of the same plan trains nothing"
    fewer = copy.deepcopy(configs[0])
    fewer.eval.points = fewer.eval.points[-1:]
    assert proxy_done(dirs[0], fewer), "a proxy evaluated more often than needed is still usable"
    more = copy.deepcopy(configs[1])
    more.eval.points = [3, 6]
    assert not proxy_done(dirs[1], more), "one evaluated less often is not"
    changed = copy.deepcopy(configs[1])
    changed.train.lr *= 2
    assert not proxy_done(dirs[1], changed), "a proxy run with another config is run again"
    (dirs[2] / "summary.json").rename(dirs[2] / "summary.tmp")
    try:
        assert not proxy_done(dirs[2], configs[2]), "an unfinished proxy is run again"
    finally:
        (dirs[2] / "summary.tmp").rename(dirs[2] / "summary.json")


def test_train_with_the_plan_starts_at_its_mixture_with_its_targets(planned, tmp_path):
    cfg, out = copy.deepcopy(planned[0]), planned[1]
    doc = runfiles.read_plan(out / "plan.json")
    cfg.run.out_dir = str(tmp_path / "run")
    cfg.mixing.plan = str(out / "plan.json")
    cfg.mixing.target_values = {"math": 1.25}  # a value written by hand wins over the plan's
    train(cfg)
    doc["predicted"]["math"] = 1.25
    assert (tmp_path / "run" / "plan.json").read_bytes() == (out / "plan.json").read_bytes()
    s = runfiles.read_summary(tmp_path / "run" / "summary.json")
    assert s["targets"] == pytest.approx(doc["predicted"]) and s["init_loss"] == pytest.approx(doc["init"])
    first = read_jsonl(tmp_path / "run" / "mixture.jsonl")[0]
    assert first["weights"] == pytest.approx(doc["recommended"]), "the first record holds the starting mixture"


def test_emit_then_collect_fits_from_the_finished_runs_and_names_the_missing(make_config, tmp_path, capsys):
    cfg = _plan_config(make_config)
    out = tmp_path / "plan"
    make_plan(cfg, out, "emit")
    lines = (out / "commands.sh").read_text().splitlines()
    commands = [line for line in lines if line.startswith("velocitune train ")]
    assert len(commands) == 5 and not (out / "plan.json").exists()
    for c in commands[:3]:
        assert cli_main(["train", c.split()[-1]]) == 0
    with pytest.raises(DataError, match="only 3 of 5 proxies have finished"):
        make_plan(cfg, out, "collect")
    assert cli_main(["train", commands[3].split()[-1]]) == 0
    doc = make_plan(cfg, out, "collect")
    assert len(doc["mixtures"]) == 4 and any("fitted on 4 of 5" in w for w in doc["warnings"])
    assert "m4-tilt-math" in capsys.readouterr().err


def test_train_targets_and_plan_agree_on_the_main_runs_length_under_a_subsample(make_config, tmp_path, capsys):
    """With data.subsample < 1 and no train.steps the main run is one epoch of what the subsample keeps: the
    Trainer, the targets proxy and the plan size it the same way (schedule.main_run_steps), not from the
    prepared windows."""
    from velocitune.dist import DistEnv
    from velocitune.schedule import resolve_steps
    from velocitune.shards import PreparedData
    from velocitune.targets import main_steps_for, proxy_config
    from velocitune.train import Trainer

    cfg = make_config("sub", train={"steps": None}, data={"subsample": 0.5}, mixing={"interval": 2},
                      targets={"points": 4})
    data = PreparedData(cfg.data.path)
    raw = [data.train(n).n_windows(cfg.data.seq_len) for n in data.domains]
    kept = [math.ceil(w * 0.5) for w in raw]
    steps = Trainer(cfg, DistEnv()).layout.steps
    assert steps == sum(kept) // cfg.train.batch_size
    assert steps != resolve_steps(cfg, raw), "the prepared windows would give a longer run"
    assert main_steps_for(cfg, data) == steps  # what estimate_targets sizes its proxy and budget by
    pc = proxy_config(cfg, tmp_path / "proxy", main_steps_for(cfg, data))
    assert pc.train.steps == round(cfg.targets.fraction * steps)
    assert pc.data.subsample == cfg.targets.fraction * 0.5, "the proxy takes a fraction of the main run's data"
    plan_cfg = copy.deepcopy(cfg)
    plan_cfg.plan.stage1 = "extrapolate"
    assert plan_setup(plan_cfg, tmp_path / "plan").main_steps == steps
    make_plan(plan_cfg, tmp_path / "plan", "emit")
    assert f"of the main run's {steps} steps" in capsys.readouterr().out


def test_the_repetition_allowance_counts_the_windows_the_subsample_keeps(make_config):
    cfg = make_config(data={"subsample": 0.5, "max_repetition": 1.5})
    budget = 100.0 * cfg.data.seq_len  # tokens of 100 windows
    caps = allowance_caps(cfg, [40, 101, 1000], budget)  # 20, 51 and 500 windows kept, each seen 1.5 times at most
    assert caps.tolist() == pytest.approx([20 * 1.5 / 100, 51 * 1.5 / 100, 1.0], rel=1e-12)


def test_plan_cli_flags_set_the_objective_and_report_errors(make_config, tmp_path, capsys):
    cfg = _plan_config(make_config)
    path = tmp_path / "cfg.yaml"
    path.write_text(dump_yaml(cfg))
    assert cli_main(["plan", str(path), "--out", str(tmp_path / "p"), "--objective", "code=two"]) == 2
    assert "--objective: 'code=two' is not DOMAIN=NUMBER" in capsys.readouterr().err
    assert cli_main(["plan", str(path), "--out", str(tmp_path / "p"), "--max-rise", "poetry=0.1", "--emit"]) == 2
    assert "plan.max_rise names unknown domain(s) ['poetry']" in capsys.readouterr().err
    assert cli_main(["plan", str(path), "--out", str(tmp_path / "p"), "--budget", "0", "--emit"]) == 2
    assert "plan.budget" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ bad inputs


def _edited_plan(planned, tmp_path, edit) -> Path:
    doc = json.loads((planned[1] / "plan.json").read_text())
    edit(doc)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))
    return path


def test_a_plan_for_other_domains_is_refused(planned, tmp_path):
    cfg = copy.deepcopy(planned[0])

    def rename(doc):
        doc["domains"] = ["prose", "code", "poetry"]
        for key in ("recommended", "predicted", "predicted_w0", "init", "objective"):
            doc[key]["poetry"] = doc[key].pop("math")

    cfg.mixing.plan = str(_edited_plan(planned, tmp_path, rename))
    cfg.run.out_dir = str(tmp_path / "run")
    with pytest.raises(DataError, match=r"a plan for the domains \['prose', 'code', 'poetry'\].*run `velocitune plan`"):
        train(cfg)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["recommended"].pop("code"), "recommended.*no value for domain"),
    (lambda d: d["recommended"].update(code=0.9), "recommended shares must be >= 0 and sum to 1"),
    (lambda d: d["recommended"].update(prose=d["recommended"]["prose"] + d["recommended"]["code"] + 0.1, code=-0.1),
     r"recommended shares must be >= 0.*smallest -0.1"),
    (lambda d: d.update(version=7), "plan format version 7"),
    (lambda d: d["predicted"].update(math="low"), r"predicted.*\['math'\] must be a finite number"),
])
def test_a_malformed_plan_is_refused_with_what_to_do(planned, tmp_path, edit, message):
    path = _edited_plan(planned, tmp_path, edit)
    with pytest.raises(DataError, match=message):
        runfiles.read_plan(path, NAMES)


def test_a_truncated_or_missing_plan_is_refused(planned, tmp_path):
    cfg, out = copy.deepcopy(planned[0]), planned[1]
    bad = tmp_path / "plan.json"
    bad.write_text((out / "plan.json").read_text()[:200])
    cfg.run.out_dir = str(tmp_path / "run")
    cfg.mixing.plan = str(bad)
    with pytest.raises(DataError, match="plan.json"):
        train(cfg)
    cfg.mixing.plan = str(tmp_path / "nowhere.json")
    with pytest.raises(DataError, match="does not exist; re-run `velocitune plan`"):
        train(cfg)


def test_a_plan_made_for_another_budget_is_refused(planned, tmp_path):
    cfg, out = copy.deepcopy(planned[0]), planned[1]
    cfg.run.out_dir = str(tmp_path / "run")
    cfg.mixing.plan = str(out / "plan.json")
    cfg.train.steps = 90
    with pytest.raises(ConfigError, match="made for a run of .* tokens, this run trains"):
        train(cfg)
