"""Tests for velocitune.prepare.pipeline: reruns skip finished domains and redo changed ones, an interrupted
run resumes to identical bytes, bad settings are refused."""

from __future__ import annotations

import json

import pytest
from conftest import read_tree, run_prepare, two_domains, write_docs

from velocitune.errors import ConfigError, DataError
from velocitune.prepare import pipeline, split
from velocitune.shards import ShardWriter


def test_rerun_skips_finished_domains_and_redoes_changed_ones(tmp_path, tokenizer_dir, monkeypatch):
    domains = two_domains(tmp_path / "in")
    out = tmp_path / "out"
    first = run_prepare(tokenizer_dir, out, domains, val_fraction=0.1)
    stats = {rel: (out / rel).stat().st_mtime_ns for rel in read_tree(out)}

    def no_scan(*a, **k):
        raise AssertionError("a finished domain was tokenized again")

    monkeypatch.setattr(pipeline, "scan_domain", no_scan)
    again = run_prepare(tokenizer_dir, out, domains, val_fraction=0.1)
    assert again == first
    assert {rel: (out / rel).stat().st_mtime_ns for rel in read_tree(out) if rel != "manifest.json"} == \
        {rel: t for rel, t in stats.items() if rel != "manifest.json"}
    monkeypatch.undo()

    # A changed input redoes only its domain.
    with open(tmp_path / "in" / "j.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document about velocity"}) + "\n")
    scanned = []
    real_scan = pipeline.scan_domain
    monkeypatch.setattr(pipeline, "scan_domain",
                        lambda name, *a, **k: scanned.append(name) or real_scan(name, *a, **k))
    third = run_prepare(tokenizer_dir, out, domains, val_fraction=0.1)
    assert scanned == ["json"]
    assert third["domains"][0] == first["domains"][0]
    assert third["domains"][1]["inputs_hash"] != first["domains"][1]["inputs_hash"]
    n = lambda m: m["domains"][1]["train"]["documents"] + m["domains"][1]["val"]["documents"]  # noqa: E731
    assert n(third) == n(first) + 1
    # Changing a split setting redoes everything.
    scanned.clear()
    run_prepare(tokenizer_dir, out, domains, val_fraction=0.2)
    assert scanned == ["txt", "json"]


def test_interrupted_run_resumes_to_identical_bytes(tmp_path, tokenizer_dir, monkeypatch):
    domains = two_domains(tmp_path / "in")
    monkeypatch.setattr(split, "_BATCH_DOCS", 3)  # several batches per domain
    kw = dict(val_fraction=0.1, shard_tokens=200)
    run_prepare(tokenizer_dir, tmp_path / "clean", domains, **kw)

    out = tmp_path / "killed"
    closes = []
    real_close = ShardWriter.close

    def dying_close(self):
        closes.append(self.path.parent.name)
        if closes.count("json") == 3:  # a few shards into the second domain
            raise KeyboardInterrupt
        return real_close(self)

    monkeypatch.setattr(ShardWriter, "close", dying_close)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(tokenizer_dir, out, domains, **kw)
    monkeypatch.setattr(ShardWriter, "close", real_close)
    left = read_tree(out)
    assert "txt/.done" in left and "json/.done" not in left and "manifest.json" not in left
    assert any(k.startswith("json/train_") for k in left)  # finished shards of the cut domain remain
    # As if killed harder: a stray temp file and a truncated shard.
    (out / "json" / ".train_00009.bin.123.dead.tmp").write_bytes(b"partial")
    victim = next(out / k for k in left if k.startswith("json/train_"))
    victim.write_bytes(victim.read_bytes()[:40])

    run_prepare(tokenizer_dir, out, domains, **kw)
    assert read_tree(out) == read_tree(tmp_path / "clean")


def test_shard_index_out_of_range(tmp_path, tokenizer_dir):
    src = write_docs(tmp_path / "d.jsonl", ["a", "b"])
    with pytest.raises(DataError, match="--shard-index 3 is out of range for --num-shards 3"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(src)}, num_shards=3, shard_index=3)


def test_bad_settings(tmp_path, tokenizer_dir):
    src = write_docs(tmp_path / "d.jsonl", ["a", "b"])
    for kw, match in [({"val_fraction": 1.0}, "val_fraction"), ({"val_tokens": 0}, "val_tokens"),
                      ({"shard_tokens": 0}, "shard_tokens"), ({"workers": 0}, "workers")]:
        with pytest.raises(ConfigError, match=match):
            run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(src)}, **kw)
