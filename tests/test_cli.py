"""The command line: every subcommand has --help, errors are one line with exit status 2, shipped configs load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from velocitune.cli import main
from velocitune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["prepare", "init-loss", "targets", "train", "report", "demo", "sweep"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert len(capsys.readouterr().out) > 200


def test_python_dash_m_and_version():
    out = subprocess.run([sys.executable, "-m", "velocitune", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("velocitune ")


def test_user_errors_are_one_line_with_status_2(tmp_path, capsys):
    assert main(["train", "--train.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "error: unknown config key 'train.lrr'. Did you mean 'train.lr'?"
    assert main(["train", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["train", "--data.path=" + str(tmp_path / "nowhere"), "--run.out_dir=" + str(tmp_path / "r")]) == 2
    assert "nowhere" in capsys.readouterr().err
    assert main(["train", "--bogus"]) == 2
    assert "config overrides look like --section.key=value" in capsys.readouterr().err


def test_help_config_lists_keys(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help-config"])
    out = capsys.readouterr().out
    assert "mixing:" in out and "rule: 'velocitune'" in out


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(path)
