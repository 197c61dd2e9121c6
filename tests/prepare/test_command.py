"""Tests for velocitune.prepare.command: `velocitune prepare` through the CLI, its flags on the project's one
config system (the `prepare` section, data.path, log.progress), --merge, --help, and bad input."""

from __future__ import annotations

import json

import pytest
from conftest import paragraphs, run_prepare, two_domains, write_docs

from velocitune.cli import main as cli
from velocitune.errors import DataError
from velocitune.shards import PreparedData


def _error(capsys) -> str:
    return capsys.readouterr().err


def test_cli_flags_and_repeated_domain(tmp_path, tokenizer_dir, hf, capsys):
    a = write_docs(tmp_path / "a.jsonl", paragraphs(12, 6))
    b = write_docs(tmp_path / "b.jsonl", paragraphs(13, 6))
    c = write_docs(tmp_path / "c.jsonl", paragraphs(14, 5))
    assert cli(["prepare", f"--tokenizer={tokenizer_dir}", "--out", str(tmp_path / "out"), "--domain", f"x={a}",
                "--domain", f"y={c}", "--domain", f"x={b}", "--workers", "1", "--no-progress",
                "--val-fraction", "0.3", "--val-tokens", "50", "--data.seq_len=4"]) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [e["name"] for e in m["domains"]] == ["x", "y"]
    assert m["domains"][0]["sources"] == [str(a), str(b)]
    assert m["settings"]["val_fraction"] == 0.3 and m["settings"]["val_tokens"] == 50
    x = m["domains"][0]
    assert x["train"]["documents"] + x["val"]["documents"] == 12
    assert "prepared" in capsys.readouterr().out


def test_one_config_file_for_prepare_and_train_with_overrides_and_flags(tmp_path, tokenizer_dir, monkeypatch):
    """The same YAML file serves prepare (its `prepare:` section, data.path) and train; relative paths are
    relative to the working directory; a flag wins over a dotted override, which wins over the file."""
    monkeypatch.chdir(tmp_path)
    write_docs(tmp_path / "a.jsonl", paragraphs(15, 8))
    write_docs(tmp_path / "b.jsonl", paragraphs(16, 8))
    (tmp_path / "cpt.yaml").write_text(
        f"data: {{path: prepared, seq_len: 16}}\nmodel: {{tokenizer: {tokenizer_dir}}}\n"
        "prepare:\n  domains:\n    a: a.jsonl\n    b: [b.jsonl]\n  val_fraction: 0.25\n  workers: 1\n"
        "log: {progress: false}\n")
    assert cli(["prepare", "cpt.yaml", "--prepare.val_fraction=0.4", "--val-fraction", "0.5"]) == 0
    m = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert m["settings"]["val_fraction"] == 0.5
    assert m["domains"][1]["sources"] == [str(tmp_path / "b.jsonl")]
    assert m["tokenizer"]["name_or_path"] == str(tokenizer_dir)  # model.tokenizer is the default tokenizer
    assert cli(["prepare", "cpt.yaml", "--prepare.val_fraction=0.4", "--out=again"]) == 0
    assert json.loads((tmp_path / "again" / "manifest.json").read_text())["settings"]["val_fraction"] == 0.4


def test_cli_merge(tmp_path, tokenizer_dir):
    domains = two_domains(tmp_path / "in")
    for i in range(2):
        run_prepare(tokenizer_dir, tmp_path / f"p{i}", domains, num_shards=2, shard_index=i)
    assert cli(["prepare", "--merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out",
                str(tmp_path / "m"), "--no-progress", "--data.seq_len=4"]) == 0
    assert PreparedData(tmp_path / "m").domains == ["txt", "json"]


def test_cli_help_mentions_every_option(capsys):
    with pytest.raises(SystemExit):
        cli(["prepare", "--help"])
    text = capsys.readouterr().out
    for flag in ["--tokenizer", "--out", "--domain", "--val-tokens", "--val-fraction", "--workers",
                 "--text-field", "--ext", "--strict", "--shard-tokens", "--num-shards", "--shard-index",
                 "--merge", "--no-progress", "--help-config", "config", ".jsonl.zst", "Parquet", "prepare.domains",
                 "hf:PATH[:SPLIT][:FIELD]"]:
        assert flag in text, flag
    with pytest.raises(SystemExit):
        cli(["prepare", "--help-config"])
    keys = capsys.readouterr().out
    assert "prepare:" in keys and "  domains: {}" in keys and "  val_tokens: 1000000" in keys


def test_duplicate_domain_name_in_yaml(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("data: {path: out}\nprepare:\n  tokenizer: tok\n  domains:\n    code: a/\n    math: m.jsonl\n"
                   "    code: b/\n")
    assert cli(["prepare", str(cfg)]) == 2
    assert "line 7: the key 'code' is given twice" in _error(capsys)


def test_unknown_yaml_key_and_old_flat_files(tmp_path, capsys):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("data: {path: o}\nprepare: {tokenizer: tok, val_token: 5}\n")
    assert cli(["prepare", str(cfg)]) == 2
    assert "unknown config key 'prepare.val_token'. Did you mean 'prepare.val_tokens'?" in _error(capsys)
    cfg.write_text("tokenizer: tok\nout: o\ndomains: {a: a.jsonl}\n")  # the velocitune 0.1 layout
    assert cli(["prepare", str(cfg)]) == 2
    err = _error(capsys)
    assert "is a velocitune 0.1 prepare file" in err and "put the keys under `prepare:`" in err


def test_bad_domain_flag_and_name(tmp_path, tokenizer_dir, capsys):
    assert cli(["prepare", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path), "--domain", "nopath"]) == 2
    assert "NAME=PATH" in _error(capsys)
    with pytest.raises(DataError, match="domain name 'a/b' is not allowed"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"a/b": str(tmp_path)})


def test_missing_pieces_and_an_output_path_that_is_a_file(tmp_path, tokenizer_dir, capsys):
    assert cli(["prepare", "--tokenizer", str(tokenizer_dir), "--domain", "a=x.jsonl"]) == 2
    assert "no output directory: pass --out DIR (or data.path" in _error(capsys)
    assert cli(["prepare", "--out", str(tmp_path / "o"), "--domain", "a=x.jsonl"]) == 2
    assert "no tokenizer: pass --tokenizer DIR" in _error(capsys)
    assert cli(["prepare", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "o")]) == 2
    assert "no domains: pass --domain NAME=PATH" in _error(capsys)
    (tmp_path / "f").write_text("x")
    assert cli(["prepare", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "f" / "o"),
                "--domain", "a=x.jsonl"]) == 2
    assert "is a file, not a directory" in _error(capsys)


def test_cli_warns_on_a_small_val_split_and_refuses_one_without_a_window(tmp_path, tokenizer_dir, capsys, caplog):
    """A small corpus at the default val_fraction: the user hears at prepare time, not from a later command.
    (The warning is a log record: on a terminal Python's last-resort handler prints it to stderr.)"""
    docs = write_docs(tmp_path / "d.jsonl", paragraphs(3, 30, 20, 40))
    argv = ["prepare", f"--tokenizer={tokenizer_dir}", "--domain", f"d={docs}", "--workers", "1", "--no-progress"]
    assert cli(argv + ["--out", str(tmp_path / "a"), "--data.seq_len=8"]) == 0
    val = json.loads((tmp_path / "a" / "manifest.json").read_text())["domains"][0]["val"]["tokens"]
    capsys.readouterr()
    seq_len = val // 3 - 1  # three windows of seq_len + 1 tokens
    with caplog.at_level("WARNING", logger="velocitune.prepare"):
        assert cli(argv + ["--out", str(tmp_path / "b"), f"--data.seq_len={seq_len}"]) == 0
    err = "\n".join(r.getMessage() for r in caplog.records)
    assert (f"domain 'd': its validation split holds only 3 window(s) of data.seq_len + 1 = {seq_len + 1} tokens "
            f"({val:,} tokens), a noisy val loss; 8 or more are advised: raise --val-fraction (now 0.01") in err
    assert cli(argv + ["--out", str(tmp_path / "c"), f"--data.seq_len={val}"]) == 2
    assert (f"error: domain 'd': its validation split holds {val:,} tokens, 0 whole window(s) of data.seq_len + 1 "
            f"= {val + 1} tokens, fewer than the 1 needed to measure a val loss; raise --val-fraction (now 0.01; about"
            in capsys.readouterr().err)
