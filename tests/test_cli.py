"""The command line: every subcommand has --help, errors are one line with exit status 2, shipped configs load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from velocitune.cli import main
from velocitune.config import load_config

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["prepare", "init-loss", "targets", "plan", "train", "eval", "report", "sweep", "demo"]


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


def test_top_level_help_lists_commands_in_pipeline_order(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    order = ["prepare", "init-loss", "targets", "plan", "train", "eval", "report", "sweep", "demo"]
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("    ") and line.split()[0] in order]
    assert listed == order
    from velocitune.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert list(sub.choices) == order  # every command is listed, none is left out


def test_sweep_help_and_overrides(tmp_path, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        main(["sweep", "--help"])
    out = capsys.readouterr().out
    assert "Config overrides are accepted" in out and "--section.key=value" in out
    seen = {}
    monkeypatch.setattr("velocitune.sweep.main", lambda args: seen.setdefault("set", args.set) and 0)
    assert main(["sweep", "cfg.yaml", "--set", "train.lr=1e-4", "--train.steps=5", "--seeds", "1"]) == 0
    assert seen["set"] == ["train.lr=1e-4", "--train.steps=5"]
    assert main(["sweep", "cfg.yaml", "--bogus"]) == 2
    assert "config overrides look like --section.key=value" in capsys.readouterr().err


@pytest.mark.parametrize("rank, env_all, printed", [(None, None, True), ("0", None, True), ("1", None, False),
                                                     ("3", "all_ranks", True)])
def test_only_rank_0_prints_the_error_line(rank, env_all, printed, capsys, monkeypatch):
    for name, value in (("RANK", rank), ("VELOCITUNE_ERRORS", env_all)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert main(["train", "--train.lrr=1"]) == 2  # the same status on every rank
    err = capsys.readouterr().err
    assert (err.strip() == "error: unknown config key 'train.lrr'. Did you mean 'train.lr'?") == printed
    assert printed or err == ""


def test_a_missing_optional_package_is_one_error_line(capsys, monkeypatch):
    def needs(package):
        def handler(args):
            raise ModuleNotFoundError(f"No module named '{package}'", name=package)
        return handler

    monkeypatch.setattr("velocitune.report.main", needs("matplotlib"))
    assert main(["report", "somewhere"]) == 2
    assert capsys.readouterr().err.startswith("error: this command needs the `matplotlib` package, which is not "
                                              "installed: pip install matplotlib")
    monkeypatch.setattr("velocitune.report.main", needs("velocitune_typo"))
    with pytest.raises(ModuleNotFoundError):  # not a known optional package: a bug, shown as a traceback
        main(["report", "somewhere"])


def test_train_prints_one_config_line_and_verbose_the_whole_config(make_config, tmp_path, capsys):
    from velocitune.config import dump_yaml

    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(make_config()))
    assert main(["train", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert sum(line.startswith("config: rule=velocitune signal=eval steps=24 ") for line in out.splitlines()) == 1
    assert "version: 1" not in out
    assert main(["train", str(path), "--dry-run", "--verbose"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("version: 1\n") and "config: rule=" not in out


@pytest.mark.parametrize("command", ["targets", "plan"])
def test_targets_and_plan_pass_resume_and_verbose_to_their_proxies(command, make_config, tmp_path, monkeypatch,
                                                                    capsys):
    """--resume and --verbose reach every proxy's train() with the command's own resume line; the stubbed
    proxies write nothing, so the command then fails on their missing results (one error line)."""
    import velocitune.train as T
    from velocitune.config import dump_yaml

    calls = []
    monkeypatch.setattr(T, "train", lambda pc, **kw: calls.append(kw))
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(make_config(train={"steps": 60}, mixing={"target_values": None})))
    argv = [command, str(path), "--out", str(tmp_path / ("targets.json" if command == "targets" else "plan"))]
    for flags in ([], ["--resume", "--verbose"]):
        calls.clear()
        assert main(argv + flags) == 2
        assert capsys.readouterr().err.count("error: ") == 1
        assert calls and all(kw["verbose"] == bool(flags) for kw in calls)
        # Nothing to continue (no checkpoint): every proxy starts afresh, with or without --resume.
        assert all(kw["resume"] is False for kw in calls)
        assert all(kw["resume_hint"] == f"the same `velocitune {command}` command and --resume" for kw in calls)
    with pytest.raises(SystemExit):  # --resume continues running proxies: it does not go with --emit/--collect
        main(["plan", str(path), "--out", str(tmp_path / "p"), "--resume", "--collect"])
