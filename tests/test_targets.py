"""Stages A and B: init-loss, the proxy run and the per-domain fits written to targets.json."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from velocitune import laws
from velocitune.cli import main as cli_main
from velocitune.config import dump_yaml
from velocitune.errors import FitError, VelocituneError
from velocitune.fileio import read_jsonl
from velocitune.schedule import lr_schedule
from velocitune.targets import estimate_targets, fit_domain, proxy_config, proxy_eval_steps, proxy_warning
from velocitune.train import train

NAMES = ["prose", "code", "math"]


def test_proxy_eval_steps_cover_a_tenth_to_the_end():
    assert proxy_eval_steps(100, 10) == [10, 20, 30, 40, 50, 60, 70, 80, 90, 100]
    pts = proxy_eval_steps(37, 10)
    assert pts[0] == 4 and pts[-1] == 37 and pts == sorted(set(pts))


def test_proxy_config_is_static_w0_on_a_subsample(make_config):
    cfg = make_config(train={"steps": 200, "warmup_steps": 20}, mixing={"weights": {"prose": 0.2, "code": 0.3, "math": 0.5}})
    cfg.targets.fraction, cfg.targets.points = 0.1, 10
    pc = proxy_config(cfg, cfg_dir := Path("/tmp/x"), 200)
    assert pc.mixing.rule == "static" and pc.mixing.weights is None and pc.mixing.targets is None
    assert cfg.mixing.pace is True and pc.mixing.pace is False  # the main run paces (robust); the static proxy not
    assert pc.data.subsample == 0.1 and pc.train.steps == 20 and pc.train.warmup_steps == 2
    assert pc.train.lr == cfg.train.lr and pc.train.batch_size == cfg.train.batch_size
    assert pc.eval.points == proxy_eval_steps(20, 10) and pc.checkpoint.save_final is False
    # The proxy's schedule is the main one compressed: both end at min LR and peak at the same LR.
    main, proxy = lr_schedule(cfg, 200), lr_schedule(pc, 20)
    assert proxy.max() == pytest.approx(main.max()) and proxy[-1] == pytest.approx(main[-1])
    assert str(cfg_dir) == pc.run.out_dir


def test_constant_proxy_schedule_keeps_the_peak_lr_without_anneal(make_config):
    cfg = make_config(train={"steps": 200, "warmup_steps": 20})
    cfg.targets.fraction, cfg.targets.points, cfg.targets.proxy_schedule = 0.1, 10, "constant"
    pc = proxy_config(cfg, Path("/tmp/x"), 200)
    lrs = lr_schedule(pc, 20)
    assert pc.train.schedule == "constant" and pc.train.warmup_steps == 2
    assert np.all(lrs[2:] == cfg.train.lr) and lrs[0] < cfg.train.lr
    with pytest.raises(VelocituneError, match="targets.proxy_schedule' is 'cosine'; allowed: compressed, constant"):
        make_config(targets={"proxy_schedule": "cosine"})


def _law_points(E=1.8, B=60.0, beta=0.35, n=8):
    tokens = np.geomspace(2e5, 2e6, n)
    return tokens, E + B / tokens**beta


def test_fit_domain_chinchilla_extrapolates_the_law():
    tokens, losses = _law_points()
    S = (np.linspace(0.1, 1, 8), np.zeros(8))
    d, _ = fit_domain("code", tokens, losses, 3.5, 2e7, "chinchilla", S, (10.0, 0.0))
    assert d["predictor"] == "chinchilla" and not d["guarded"]
    assert d["target"] == pytest.approx(1.8 + 60.0 / 2e7**0.35, abs=1e-3)
    assert d["interval"][0] <= d["target"] <= d["interval"][1]
    assert d["points"][0] == [tokens[0], losses[0]]


def test_fit_domain_auto_falls_back_on_a_flat_curve_and_flags_degrading_domains():
    tokens = np.geomspace(2e5, 2e6, 8)
    flat = 2.5 - 0.001 * np.log(tokens / 2e5)  # barely moving: the chinchilla checks must fail
    S1 = np.linspace(0.01, 0.1, 8)
    d, _ = fit_domain("replay", tokens, flat, 2.45, 2e7, "auto", (S1, np.zeros(8)), (1.0, 0.0))
    assert d["warnings"], "a near-flat curve must be flagged"
    assert d["predictor"] in ("cpt_law", "loglinear")
    assert d["guarded"] and any("predicted to get worse" in w for w in d["warnings"])


def test_fit_domain_needs_four_finite_points():
    tokens, losses = _law_points(n=5)
    losses[1:3] = np.nan
    with pytest.raises(FitError, match="only 3 usable proxy points"):
        fit_domain("math", tokens, losses, 3.0, 2e7, "chinchilla", (np.ones(5), np.zeros(5)), (1.0, 0.0))


def _recipe(cfg, fraction, points, predictor):
    """cfg with its targets section set to the proxy recipe (a copy, so one test can vary it)."""
    import copy

    c = copy.deepcopy(cfg)
    c.targets.fraction, c.targets.points, c.targets.predictor = fraction, points, predictor
    return c


def test_estimate_targets_end_to_end_and_train_reads_them(make_config, tmp_path):
    cfg = make_config("main", train={"steps": 40}, mixing={"target_values": None})
    out = tmp_path / "t" / "targets.json"
    doc = estimate_targets(_recipe(cfg, 0.5, 5, "chinchilla"), out)
    assert out.is_file() and out.with_suffix(".png").stat().st_size > 10_000
    assert doc["main_steps"] == 40 and doc["proxy_steps"] == 20
    assert doc["budget_tokens"] == 40 * 8 * 32
    evals = read_jsonl(tmp_path / "t" / "proxy" / "eval.jsonl")
    init = json.loads((tmp_path / "t" / "init_loss.json").read_text())["domains"]
    for n in NAMES:
        d = doc["domains"][n]
        assert len(d["points"]) == 5
        assert d["init"] == pytest.approx(evals[0]["losses"][n]) == pytest.approx(init[n]["loss"])
        # The recorded points are the proxy's val losses at its eval steps, in tokens.
        by_step = {r["step"]: r["losses"][n] for r in evals}
        assert [p[1] for p in d["points"]] == [by_step[s] for s in proxy_eval_steps(20, 5)]
        if d["predictor"] == "chinchilla":
            fit = laws.fit_data_law(np.array([p[0] for p in d["points"]]), np.array([p[1] for p in d["points"]]))
            assert d["target"] == pytest.approx(float(fit.predict(40 * 8 * 32)), rel=1e-6)
    res = train(make_config("uses", train={"steps": 12}, mixing={"target_values": None, "targets": str(out)}))
    summary = json.loads((res.out_dir / "summary.json").read_text())
    assert summary["targets"] == {n: doc["domains"][n]["target"] for n in NAMES}
    assert (res.out_dir / "targets.json").is_file()


def test_cli_init_loss_and_targets(make_config, tmp_path, capsys):
    cfg = make_config("cli", train={"steps": 20}, mixing={"target_values": None})
    path = tmp_path / "cli.yaml"
    path.write_text(dump_yaml(cfg))
    assert cli_main(["init-loss", str(path), "--out", str(tmp_path / "il.json")]) == 0
    doc = json.loads((tmp_path / "il.json").read_text())
    assert set(doc["domains"]) == set(NAMES) and all(v["loss"] > 0 for v in doc["domains"].values())
    assert cli_main(["targets", str(path), "--fraction", "0.5", "--points", "4", "--predictor", "auto",
                     "--out", str(tmp_path / "tg" / "targets.json")]) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli_main(["targets", str(path), "--points", "2"]) == 2


def test_identical_proxy_is_reused_and_a_changed_one_rerun(make_config, tmp_path, monkeypatch):
    cfg = make_config("reuse", train={"steps": 40}, mixing={"target_values": None})
    out = tmp_path / "r" / "targets.json"
    estimate_targets(_recipe(cfg, 0.5, 5, "chinchilla"), out)
    calls = []
    import velocitune.train as train_mod

    monkeypatch.setattr(train_mod, "train", lambda pc, resume=False, **kw: calls.append(pc))
    cfg.train.threads = 2  # does not shape the run: the finished proxy is reused
    estimate_targets(_recipe(cfg, 0.5, 5, "cpt_law"), tmp_path / "r" / "targets_cpt.json")
    assert calls == []
    cfg.train.lr = 5e-3  # shapes the run: the proxy must be run again
    from velocitune.errors import DataError

    with pytest.raises((FileNotFoundError, DataError)):  # the stubbed train writes nothing to read back
        estimate_targets(_recipe(cfg, 0.5, 5, "chinchilla"), tmp_path / "r" / "targets_lr.json")
    assert len(calls) == 1 and calls[0].train.lr == 5e-3


def test_targets_go_where_train_reads_them_even_inside_the_run_directory(make_config, tmp_path):
    """The SmolLM2 recipe's layout: targets.json and init_loss.json inside the run's own out_dir, named by
    mixing.targets / mixing.init_loss. `targets` writes them there (its proxy must not need init_loss.json,
    which does not exist yet), and `train` uses them without copying targets.json onto itself."""
    run = tmp_path / "run"
    cfg = make_config("run", train={"steps": 40},
                      mixing={"target_values": None, "targets": str(run / "targets.json"),
                              "init_loss": str(run / "init_loss.json")},
                      targets={"fraction": 0.5, "points": 5, "predictor": "chinchilla"})
    doc = estimate_targets(cfg)
    assert (run / "targets.json").is_file() and (run / "init_loss.json").is_file()
    res = train(cfg)
    summary = json.loads((res.out_dir / "summary.json").read_text())
    assert summary["targets"] == {n: doc["domains"][n]["target"] for n in NAMES}
    init = json.loads((run / "init_loss.json").read_text())["domains"]
    assert summary["init_loss"] == {n: init[n]["loss"] for n in NAMES}


def test_targets_json_holds_each_fit_drawn_with_its_own_law(make_config, tmp_path):
    """fit_curve follows the fitted law over the proxy, prediction_curve over the main run to the target."""
    cfg = make_config("curves", train={"steps": 40}, mixing={"target_values": None},
                      targets={"fraction": 0.5, "points": 6, "predictor": "cpt_law"})
    doc = estimate_targets(cfg, tmp_path / "c" / "targets.json")
    for n in NAMES:
        d = doc["domains"][n]
        fit, pred = np.array(d["fit_curve"]), np.array(d["prediction_curve"])
        assert fit[0, 0] == d["points"][0][0] and fit[-1, 0] == d["points"][-1][0]  # over the proxy's points
        assert pred[-1, 0] == doc["budget_tokens"] and pred[-1, 1] == pytest.approx(d["target"], rel=1e-12)
        # The fitted curve passes near the points it was fitted to (R² > 0.9 is one of the checks).
        at = {t: l for t, l in fit}
        close = [abs(at[t] - l) for t, l in d["points"] if t in at]
        assert close and np.mean(close) < 0.1


# ------------------------------------------------------------------- preemption, resume, short-run warnings


def preempt_at(monkeypatch, step: int, arm: str = "proxy") -> None:
    """SIGTERM to this process as step `step` of the run labelled `arm` begins, once (what `kill` or a
    scheduler sends): that run stops after the step, with a checkpoint, and the CLI exits 75."""
    import velocitune.train as T

    real, sent = T.step_lr, []

    def term(c, s, steps):
        if s == step and c.run.arm == arm and not sent:
            sent.append(s)
            os.kill(os.getpid(), signal.SIGTERM)  # handled before os.kill returns: the guard records it
        return real(c, s, steps)

    monkeypatch.setattr(T, "step_lr", term)


def _numbers(path: Path) -> dict:
    """targets.json without the proxy's wall time (the one value a resume may change)."""
    doc = json.loads(path.read_text())
    doc.pop("proxy_wall_time_s")
    return doc


def test_a_preempted_targets_proxy_is_refused_without_resume_and_resumes_bit_identical(make_config, tmp_path,
                                                                                       monkeypatch, capsys):
    cfg = make_config("pre", train={"steps": 40}, mixing={"target_values": None})
    path = tmp_path / "pre.yaml"
    path.write_text(dump_yaml(cfg))
    # fraction 0.2 of 40 steps is 8, but 10 points need 10 steps: the proxy runs 25 %, and says so.
    argv = ["targets", str(path), "--fraction", "0.2", "--points", "10", "--predictor", "chinchilla"]
    assert cli_main(argv + ["--out", str(tmp_path / "ref" / "targets.json")]) == 0
    said = capsys.readouterr()
    assert sum(line.startswith("config: rule=static steps=10 ") for line in said.out.splitlines()) == 1
    assert "version: 1" not in said.out, "the proxy prints its one config line, not its YAML"
    assert ("warning: the targets proxy runs 10 steps, 25% of the main run's 40 (targets.fraction=0.2 asks for "
            "20%): it needs one step per evaluation point (targets.points=10); lower targets.points (at least 4) or "
            "lengthen the main run (train.steps)") in said.err

    out = tmp_path / "cut" / "targets.json"
    proxy = out.parent / "proxy"
    preempt_at(monkeypatch, 6)
    assert cli_main(argv + ["--out", str(out)]) == 75
    said = capsys.readouterr().out
    assert ("preempted by SIGTERM at step 7: checkpoint written; continue with the same `velocitune targets` "
            "command and --resume (exit status 75)") in said
    assert not out.exists() and (proxy / "checkpoints" / "step_00000007").is_dir()

    # A plain re-run would throw the proxy away: refused, the checkpoint kept.
    assert cli_main(argv + ["--out", str(out)]) == 2
    assert (f"error: the proxy run directory {proxy} holds an unfinished proxy (checkpoint step_00000007); "
            f"pass --resume to continue it, or delete {proxy}") in capsys.readouterr().err
    assert (proxy / "checkpoints" / "step_00000007").is_dir()

    assert cli_main(argv + ["--out", str(out), "--resume"]) == 0
    assert "resumed from step 7" in capsys.readouterr().out
    assert _numbers(out) == _numbers(tmp_path / "ref" / "targets.json")
    steps = [r["step"] for r in read_jsonl(proxy / "eval.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 10, "the resumed proxy's log holds each step once"
    # Finished: --resume again reuses it as it is (nothing trained), and so does a plain re-run.
    before = (proxy / "summary.json").read_bytes()
    assert cli_main(argv + ["--out", str(out), "--resume"]) == 0
    assert cli_main(argv + ["--out", str(out)]) == 0
    assert (proxy / "summary.json").read_bytes() == before


def test_proxy_warning_only_when_a_short_run_stretches_the_proxy():
    assert proxy_warning(0.2, 20, 40).startswith("the targets proxy runs 20 steps, 50% of the main run's 40 "
                                                 "(targets.fraction=0.2 asks for 20%)")
    assert proxy_warning(0.2, 20, 100) is None  # 20 steps: exactly the fraction
    assert proxy_warning(0.2, 20, 1000) is None
    assert "runs 10 steps, 100%" in proxy_warning(0.2, 20, 10)  # never longer than the main run
