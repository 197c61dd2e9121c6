"""Tests for velocitune.prepare.merge: a sharded prepare merged equals a single run, byte for byte; parts of
different runs are refused."""

from __future__ import annotations

import json

import pytest
from conftest import read_tree, run_prepare, two_domains

from velocitune.errors import DataError
from velocitune.prepare import merge_prepared, split
from velocitune.shards import PreparedData


def test_sharded_prepare_and_merge_equal_a_single_run(tmp_path, tokenizer_dir, monkeypatch):
    domains = two_domains(tmp_path / "in")
    monkeypatch.setattr(split, "_BATCH_DOCS", 4)
    kw = dict(val_fraction=0.1, shard_tokens=150)
    single = run_prepare(tokenizer_dir, tmp_path / "single", domains, **kw)
    parts = []
    for i in range(3):
        part = tmp_path / f"part{i}"
        # One part through a 2-process pool: the pool path must write the same bytes.
        m = run_prepare(tokenizer_dir, part, domains, num_shards=3, shard_index=i, workers=2 if i == 1 else 1, **kw)
        assert m["part"] == {"index": i, "count": 3} and "w0" not in m
        parts.append(part)
    with pytest.raises(DataError, match="part 2 of a 3-way.*--merge"):
        PreparedData(parts[2])
    with pytest.raises(DataError, match="every part 0..N-1"):
        merge_prepared(parts[:2], tmp_path / "bad", progress=False)
    merged = merge_prepared(list(reversed(parts)), tmp_path / "merged", progress=False)
    assert merged == single
    assert read_tree(tmp_path / "merged") == read_tree(tmp_path / "single")
    # The parts split the documents, not the val rule: their val sets add up to the single run's.
    for k, e in enumerate(single["domains"]):
        p = [json.loads((d / "manifest.json").read_text())["domains"][k] for d in parts]
        assert sum(x["val"]["documents"] for x in p) == e["val"]["documents"]
        assert sum(x["train"]["documents"] for x in p) == e["train"]["documents"]


def test_merge_refuses_parts_of_different_runs(tmp_path, tokenizer_dir):
    domains = two_domains(tmp_path / "in")
    parts = [run_prepare(tokenizer_dir, tmp_path / f"p{i}", domains, num_shards=2, shard_index=i,
                         val_fraction=0.1 if i == 0 else 0.2) and tmp_path / f"p{i}" for i in range(2)]
    with pytest.raises(DataError, match="different settings"):
        merge_prepared(parts, tmp_path / "m", progress=False)
    run_prepare(tokenizer_dir, tmp_path / "whole", domains)
    with pytest.raises(DataError, match="not a part"):
        merge_prepared([tmp_path / "whole"], tmp_path / "m", progress=False)
    with pytest.raises(DataError, match="no manifest.json"):
        merge_prepared([tmp_path / "in"], tmp_path / "m", progress=False)


def test_merge_checks_the_whole_val_split_against_seq_len(tmp_path, tokenizer_dir):
    """Parts hold a share of each val split, so the window check is made on the merged split."""
    domains = two_domains(tmp_path / "in")
    for i in range(2):
        run_prepare(tokenizer_dir, tmp_path / f"p{i}", domains, num_shards=2, shard_index=i, val_fraction=0.1,
                    seq_len=10**5)  # not one window in any val split, but a part is not checked
    parts = [tmp_path / "p0", tmp_path / "p1"]
    merged = merge_prepared(parts, tmp_path / "m", progress=False)
    val = {e["name"]: e["val"]["tokens"] for e in merged["domains"]}
    longest = max(val.values())
    with pytest.raises(DataError, match=r"domain '\w+': its validation split holds [\d,]+ tokens, 0 whole window"):
        merge_prepared(parts, tmp_path / "m2", progress=False, seq_len=longest)
    # The reused domains of an earlier merge are checked too.
    with pytest.raises(DataError, match="0 whole window"):
        merge_prepared(parts, tmp_path / "m", progress=False, seq_len=longest)
    assert merge_prepared(parts, tmp_path / "m", progress=False, seq_len=min(val.values()) - 1) == merged
