"""Tests for velocitune.fileio: JSON-lines logs and resume truncation, atomic files, JSON reads, path kinds."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from velocitune import fileio
from velocitune.errors import DataError
from velocitune.fileio import (
    JsonlWriter,
    atomic_write_json,
    atomic_write_text,
    install_dir,
    output_dir,
    output_file,
    read_json,
    read_jsonl,
    require_dir,
    require_file,
    truncate_after,
)


def _record(step: int) -> dict:
    # The kind of values a training loop logs: numpy and torch scalars, a per-domain dict.
    return {
        "step": step,
        "tokens": np.int64(step * 2048),
        "loss": torch.tensor(3.0 - 0.01 * step),
        "lr": np.float32(1e-3),
        "domain_loss": {"math": np.float64(2.5), "code": torch.tensor([1.25])},
        "weights": np.array([0.25, 0.75]),
    }


def test_writer_converts_scalars_and_flushes_each_record(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    with JsonlWriter(path) as w:
        w.write(_record(1))
        # Flushed without closing: another reader sees the record now.
        lines = path.read_text().splitlines()
        assert len(lines) == 1
        w.write(_record(2))
        w.sync()
    recs = read_jsonl(path)
    assert recs[0] == {
        "step": 1,
        "tokens": 2048,
        "loss": pytest.approx(2.99, abs=1e-6),
        "lr": float(np.float32(1e-3)),
        "domain_loss": {"math": 2.5, "code": [1.25]},
        "weights": [0.25, 0.75],
    }
    assert [r["step"] for r in recs] == [1, 2]
    assert type(recs[0]["tokens"]) is int


def test_writer_rejects_unknown_types(tmp_path):
    with JsonlWriter(tmp_path / "m.jsonl") as w, pytest.raises(TypeError, match="object"):
        w.write({"step": 1, "x": object()})


def test_resume_truncates_to_the_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    uninterrupted = tmp_path / "a.jsonl"
    with JsonlWriter(uninterrupted) as w:
        for step in range(1, 13):
            w.write(_record(step))

    # The crashed run logged steps 1..9 after its last checkpoint at step 6, and died mid-line.
    resumed = tmp_path / "b.jsonl"
    with JsonlWriter(resumed) as w:
        for step in range(1, 10):
            w.write(_record(step))
    with open(resumed, "a") as f:
        f.write(json.dumps({"step": 10, "loss": 2.9})[:11])

    with pytest.warns(UserWarning, match=r"b\.jsonl: dropped a partial last line \(line 10"):
        assert truncate_after(resumed, 6) == 3
    with JsonlWriter(resumed) as w:
        for step in range(7, 13):
            w.write(_record(step))
    assert resumed.read_bytes() == uninterrupted.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]  # no temp files left


def test_truncate_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    with JsonlWriter(path) as w:
        for step in range(5):
            w.write({"step": step})
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        truncate_after(path, 2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]


def test_truncate_edge_cases(tmp_path):
    assert truncate_after(tmp_path / "missing.jsonl", 3) == 0
    assert not (tmp_path / "missing.jsonl").exists()
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    mtime = path.stat().st_mtime_ns
    assert truncate_after(path, 5) == 0
    assert path.stat().st_mtime_ns == mtime  # nothing to drop: the file is not rewritten
    path.write_text('{"step": 1}\n{"loss": 2}\n')
    with pytest.raises(DataError, match=r"line 2: the record has no numeric 'step'"):
        truncate_after(path, 5)


def test_read_jsonl_errors_and_tails(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "loss": \n{"step": 3}\n')
    with pytest.raises(DataError, match=r"m\.jsonl, line 2: not valid JSON"):
        read_jsonl(path)

    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object per line, got list"):
        read_jsonl(path)

    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="partial last line"):
        assert read_jsonl(path) == [{"step": 1}, {"step": 2}]

    # A complete record that only lacks its newline is kept (and the writer adds the newline).
    path.write_text('{"step": 1}\n{"step": 2}')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    with JsonlWriter(path) as w:
        w.write({"step": 3})
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_writer_drops_a_partial_tail_before_appending(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="partial last line"):
        w = JsonlWriter(path)
    w.write({"step": 2})
    w.close()
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


def test_atomic_writes(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"loss": np.float32(0.5), "steps": np.int64(3), "w": np.array([1, 2])})
    assert json.loads(path.read_text()) == {"loss": 0.5, "steps": 3, "w": [1, 2]}
    assert path.read_text().endswith("\n")
    atomic_write_text(path, "replaced")
    assert path.read_text() == "replaced"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_failed_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "old: 1\n")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        atomic_write_text(path, "new: 2\n")
    assert path.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_json_default_conversions():
    assert fileio.json_default(torch.tensor(2)) == 2
    assert fileio.json_default(np.bool_(True)) is True
    with pytest.raises(TypeError, match="set"):
        fileio.json_default({1})


def test_read_json_names_a_damaged_file(tmp_path):
    good = tmp_path / "a.json"
    good.write_text('{"x": [1, 2.5]}')
    assert read_json(good) == {"x": [1, 2.5]}
    cut = tmp_path / "cut.json"
    cut.write_text('{"x": [1, 2')
    with pytest.raises(DataError, match=r"cut\.json is not valid JSON \(line 1, column 12: .*cut short: rerun it"):
        read_json(cut, fix="rerun it")
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(DataError, match=r"bin\.json is not UTF-8 text"):
        read_json(binary)
    with pytest.raises(DataError, match=r"is not UTF-8 text"):
        read_jsonl(binary)


def test_paths_of_the_wrong_kind_are_named(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    d = tmp_path / "dir"
    d.mkdir()
    assert require_file(f, "the tokenizer") == f and require_dir(d, "the data") == d
    with pytest.raises(DataError, match=r"the data '.*file\.txt' is a file, but a directory is needed here; hint"):
        require_dir(f, "the data", "hint")
    with pytest.raises(DataError, match=r"the config '.*dir' is a directory, but a file is needed here"):
        require_file(d, "the config")
    with pytest.raises(DataError, match=r"'.*nope' does not exist; run prepare"):
        require_dir(tmp_path / "nope", "the data", "run prepare")
    with pytest.raises(DataError, match=r"cannot be created: '.*file\.txt' is a file, not a directory"):
        output_dir(f / "sub", "run.out_dir")
    assert output_dir(tmp_path / "new" / "deep", "x").is_dir()
    with pytest.raises(DataError, match=r"is a directory; give the path of the file to write"):
        output_file(d, "--out")
    assert output_file(tmp_path / "made" / "t.json", "--out").parent.is_dir()


def test_install_dir_replaces_an_older_copy(tmp_path):
    final = tmp_path / "step_1"
    for content in ("old", "new"):
        tmp = tmp_path / f".tmp-{content}"
        tmp.mkdir()
        (tmp / "f").write_text(content)
        install_dir(tmp, final)
    assert (final / "f").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_1"]
