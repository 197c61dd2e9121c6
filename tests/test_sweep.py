"""The sweep runner: grid expansion, parallel subprocess arms, skipping finished arms on a re-run."""

from __future__ import annotations

import json

import pytest

from velocitune.config import dump_yaml
from velocitune.errors import ConfigError
from velocitune.sweep import Arm, arm_status, expand, parse_grid, run_arms


def test_parse_and_expand_grid():
    grid = parse_grid(["mixing.rule=static,dbl", "--mixing.eta=0.5,1"])
    assert grid == {"mixing.rule": ["static", "dbl"], "mixing.eta": ["0.5", "1"]}
    arms = expand(grid, range(2), fixed=["--train.steps=5"])
    assert len(arms) == 8
    assert arms[0].name == "rule=static,eta=0.5/seed0"
    assert arms[0].overrides == ["--train.steps=5", "--mixing.rule=static", "--mixing.eta=0.5",
                                 "--run.arm=rule=static,eta=0.5", "--train.seed=0"]
    assert [a.name for a in expand({}, [0, 1])] == ["base/seed0", "base/seed1"]
    for bad in (["mixing.rule"], ["a.b=1", "a.b=2"], ["a.b="]):
        with pytest.raises(ConfigError):
            parse_grid(bad)


def test_run_arms_in_parallel_and_skip_finished(make_config, tmp_path):
    cfg = make_config("base", train={"steps": 6}, checkpoint={"interval": 0, "save_final": False})
    path = tmp_path / "base.yaml"
    path.write_text(dump_yaml(cfg))
    arms = [Arm("static/seed0", ["--mixing.rule=static", "--run.arm=static"]),
            Arm("dbl/seed0", ["--mixing.rule=dbl", "--run.arm=dbl", "--mixing.interval=2"])]
    dirs = run_arms(path, arms, tmp_path / "sweep", parallel=2, progress=False)
    for d, arm in zip(dirs, ("static", "dbl")):
        summary = json.loads((d / "summary.json").read_text())
        assert summary["complete"] and summary["arm"] == arm and summary["steps"] == 6
        assert arm_status(d) == "done"
    mtime = (dirs[0] / "summary.json").stat().st_mtime_ns
    run_arms(path, arms, tmp_path / "sweep", parallel=2, progress=False)  # nothing to do
    assert (dirs[0] / "summary.json").stat().st_mtime_ns == mtime


def test_failed_arm_is_reported_with_its_log(make_config, tmp_path):
    cfg = make_config("base", train={"steps": 4})
    path = tmp_path / "base.yaml"
    path.write_text(dump_yaml(cfg))
    with pytest.raises(Exception, match=r"bad/seed0 \(exit 2; see .*seed0.log\)"):
        run_arms(path, [Arm("bad/seed0", ["--mixing.rule=nonsense"])], tmp_path / "sw", parallel=1, progress=False)
    assert "mixing.rule" in (tmp_path / "sw" / "bad" / "seed0.log").read_text()
