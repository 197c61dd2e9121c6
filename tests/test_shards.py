"""Tests for velocitune.shards: the shard format, its failure modes, windows, and PreparedData."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from velocitune.errors import DataError
from velocitune.shards import (
    HEADER_BYTES,
    DomainTokens,
    PreparedData,
    ShardWriter,
    choose_dtype,
    open_shard,
    read_header,
    write_shard,
)


def test_choose_dtype_boundaries():
    assert choose_dtype(1) == np.uint16
    assert choose_dtype(65536) == np.uint16  # ids 0..65535 fit
    assert choose_dtype(65537) == np.uint32
    assert choose_dtype(152_064) == np.uint32
    with pytest.raises(ValueError):
        choose_dtype(0)


@pytest.mark.parametrize("dtype,high", [(np.uint16, 2**16), (np.uint32, 2**32)])
def test_round_trip(tmp_path, dtype, high):
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, high, size=1001, dtype=np.int64)
    tokens[:2] = [0, high - 1]  # both ends of the range survive
    path = write_shard(tmp_path / "s.bin", tokens, dtype)
    assert read_header(path) == (np.dtype(dtype), 1001)
    assert path.stat().st_size == HEADER_BYTES + 1001 * np.dtype(dtype).itemsize
    # Header layout, decoded independently of the module.
    raw = path.read_bytes()
    magic, version, code, count = struct.unpack_from("<8sIIQ", raw)
    assert (magic, version, code, count) == (b"VTUNETOK", 1, 1 if dtype == np.uint16 else 2, 1001)
    body = np.frombuffer(raw[HEADER_BYTES:], dtype=np.dtype(dtype).newbyteorder("<"))
    np.testing.assert_array_equal(body, tokens)
    mm = open_shard(path)
    assert mm.dtype == dtype and mm.shape == (1001,)
    np.testing.assert_array_equal(mm, tokens)
    assert [p.name for p in tmp_path.iterdir()] == ["s.bin"]  # no temp file left behind


def test_empty_shard(tmp_path):
    path = write_shard(tmp_path / "e.bin", np.zeros(0, dtype=np.int64), np.uint16)
    assert read_header(path) == (np.dtype(np.uint16), 0)
    assert open_shard(path).size == 0


def test_write_refuses_ids_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="do not fit"):
        write_shard(tmp_path / "s.bin", np.array([1, 65536]), np.uint16)
    with pytest.raises(ValueError, match="do not fit"):
        write_shard(tmp_path / "s.bin", np.array([-1, 3]), np.uint32)
    assert list(tmp_path.iterdir()) == []


def test_writer_streams_and_aborts_atomically(tmp_path):
    with ShardWriter(tmp_path / "s.bin", np.uint16) as w:
        w.write(np.arange(5))
        w.write(np.arange(5, 12))
        assert not (tmp_path / "s.bin").exists()  # invisible until closed
    np.testing.assert_array_equal(open_shard(tmp_path / "s.bin"), np.arange(12))
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "t.bin", np.uint16) as w:
            w.write(np.arange(3))
            raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin"]


def _corrupt(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "offset,data,match",
    [(0, b"NOTATOK!", "not a velocitune token shard"),
     (8, struct.pack("<I", 7), "format version 7"),
     (12, struct.pack("<I", 9), "unknown dtype code 9"),
     (16, struct.pack("<Q", 11), "truncated or corrupted")],
)
def test_bad_header_fails_loudly(tmp_path, offset, data, match):
    path = write_shard(tmp_path / "s.bin", np.arange(10), np.uint16)
    _corrupt(path, offset, data)
    for fn in (read_header, open_shard, lambda p: DomainTokens([p])):
        with pytest.raises(DataError, match=match) as err:
            fn(path)
        assert str(path) in str(err.value) and "velocitune prepare" in str(err.value)


def test_truncated_file(tmp_path):
    path = write_shard(tmp_path / "s.bin", np.arange(10), np.uint32)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DataError, match="truncated"):
        open_shard(path)
    path.write_bytes(path.read_bytes()[:20])  # not even a whole header
    with pytest.raises(DataError, match="shorter than its 32-byte header"):
        open_shard(path)
    with pytest.raises(DataError, match="missing"):
        open_shard(tmp_path / "nope.bin")


def _domain(tmp_path: Path, sizes: list[int], dtype=np.uint16, seed: int = 0) -> tuple[DomainTokens, np.ndarray]:
    """Shards of the given sizes holding one random stream; returns (DomainTokens, the stream)."""
    stream = np.random.default_rng(seed).integers(0, np.iinfo(dtype).max, size=sum(sizes), dtype=np.int64)
    paths, pos = [], 0
    for i, n in enumerate(sizes):
        paths.append(write_shard(tmp_path / f"train_{i:05d}.bin", stream[pos : pos + n], dtype))
        pos += n
    return DomainTokens(paths), stream


def test_windows_cross_shard_boundaries(tmp_path):
    # Shards shorter than a window, an empty shard, and boundaries in the middle of windows.
    tokens, stream = _domain(tmp_path, [7, 3, 0, 25, 1, 40], dtype=np.uint32)
    L = 4
    assert tokens.n_tokens == 76 and tokens.n_windows(L) == 76 // 5
    idx = np.arange(tokens.n_windows(L))
    got = tokens.windows(idx, L)
    assert got.dtype == np.int64 and got.shape == (15, 5)
    np.testing.assert_array_equal(got, stream[: 15 * 5].reshape(15, 5))
    # Unordered, repeated indices.
    idx = np.array([14, 0, 1, 1, 7, 2])
    np.testing.assert_array_equal(tokens.windows(idx, L), np.stack([stream[j * 5 : j * 5 + 5] for j in idx]))


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(0, 60), min_size=1, max_size=6), seq_len=st.integers(1, 40),
       data=st.data())
def test_windows_match_numpy_reference(tmp_path_factory, sizes, seq_len, data):
    tokens, stream = _domain(tmp_path_factory.mktemp("dt"), sizes)
    W = seq_len + 1
    n = tokens.n_windows(seq_len)
    assert n == len(stream) // W
    if n == 0:
        assert tokens.windows(np.zeros(0, dtype=np.int64), seq_len).shape == (0, W)
        return
    idx = np.array(data.draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=20)))
    ref = np.stack([stream[j * W : (j + 1) * W] for j in idx])
    np.testing.assert_array_equal(tokens.windows(idx, seq_len), ref)
    a = data.draw(st.integers(0, len(stream)))
    b = data.draw(st.integers(a, len(stream)))
    np.testing.assert_array_equal(tokens.read(a, b), stream[a:b])


def test_windows_rejects_out_of_range(tmp_path):
    tokens, _ = _domain(tmp_path, [10, 10])
    assert tokens.n_windows(4) == 4
    with pytest.raises(IndexError):
        tokens.windows(np.array([4]), 4)
    with pytest.raises(IndexError):
        tokens.windows(np.array([-1]), 4)
    with pytest.raises(ValueError):
        tokens.windows(np.array([0.5]), 4)


def test_mixed_dtypes_refused(tmp_path):
    a = write_shard(tmp_path / "a.bin", np.arange(4), np.uint16)
    b = write_shard(tmp_path / "b.bin", np.arange(4), np.uint32)
    with pytest.raises(DataError, match="mix dtypes"):
        DomainTokens([a, b])


# -- PreparedData on a directory written by hand (independent of velocitune.prepare) -----------------


def _make_prepared(root: Path, spec: dict[str, tuple[list[int], int]], vocab: int = 300) -> dict:
    """Write a prepared dir: spec = {domain: ([train shard sizes], val size)}; returns the streams."""
    rng = np.random.default_rng(1)
    streams, entries = {}, []
    for name, (train_sizes, val_size) in spec.items():
        (root / name).mkdir(parents=True)
        entry = {"name": name, "sources": [f"/data/{name}"], "inputs_hash": f"h-{name}", "files": 1,
                 "skipped_files": 0, "empty_documents": 0}
        for split, sizes in (("train", train_sizes), ("val", [val_size])):
            stream = rng.integers(0, vocab, size=sum(sizes))
            shards, pos = [], 0
            for i, n in enumerate(sizes):
                rel = f"{name}/{split}_{i:05d}.bin"
                write_shard(root / rel, stream[pos : pos + n], np.uint16)
                shards.append(rel)
                pos += n
            streams[(name, split)] = stream
            entry[split] = {"tokens": int(stream.size), "documents": 3, "shards": shards}
        (root / name / ".done").write_text(json.dumps({"inputs_hash": f"h-{name}", "part": None, "entry": entry}))
        entries.append(entry)
    total = sum(e["train"]["tokens"] for e in entries)
    manifest = {"format": "velocitune-prepared", "version": 1,
                "tokenizer": {"name_or_path": "/tok", "vocab_size": vocab, "hash": "abc", "eos_token_id": 0},
                "dtype": "uint16", "domains": entries,
                "w0": {e["name"]: e["train"]["tokens"] / total for e in entries}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    return streams


def test_prepared_data_reads_manifest(tmp_path):
    streams = _make_prepared(tmp_path, {"math": ([30, 20], 10), "code": ([150], 12)})
    data = PreparedData(tmp_path)
    assert data.domains == ["math", "code"]  # manifest order, not sorted
    np.testing.assert_allclose(data.w0, [50 / 200, 150 / 200])
    assert data.w0.dtype == np.float64
    assert (data.vocab_size, data.tokenizer_hash, data.eos_token_id, data.dtype) == (300, "abc", 0, np.uint16)
    np.testing.assert_array_equal(data.train("math").read(0, 50), streams[("math", "train")])
    np.testing.assert_array_equal(data.val("code").read(0, 12), streams[("code", "val")])
    assert data.train("math") is data.train("math")  # opened once
    info = data.domain_info("code")
    assert info["train"]["tokens"] == 150
    info["train"]["tokens"] = 0  # a copy: the manifest is not touched
    assert data.domain_info("code")["train"]["tokens"] == 150
    with pytest.raises(DataError, match="unknown domain 'prose'.*math"):
        data.train("prose")


def test_prepared_data_missing_root_and_manifest(tmp_path):
    with pytest.raises(DataError, match="does not exist.*velocitune prepare"):
        PreparedData(tmp_path / "nope")
    with pytest.raises(DataError, match="no manifest.json.*velocitune prepare"):
        PreparedData(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        PreparedData(tmp_path)


def test_prepared_data_unfinished_domain(tmp_path):
    _make_prepared(tmp_path, {"math": ([30], 10), "code": ([15], 12)})
    (tmp_path / "code" / ".done").unlink()
    with pytest.raises(DataError, match="'code'.*not finished.*re-run"):
        PreparedData(tmp_path)


def test_prepared_data_stale_manifest(tmp_path):
    _make_prepared(tmp_path, {"math": ([30], 10), "code": ([15], 12)})
    (tmp_path / "math" / ".done").write_text(json.dumps({"inputs_hash": "other"}))
    with pytest.raises(DataError, match="'math'.*inputs hash mismatch"):
        PreparedData(tmp_path)


def test_prepared_data_missing_shard(tmp_path):
    _make_prepared(tmp_path, {"math": ([30, 5], 10)})
    (tmp_path / "math" / "train_00001.bin").unlink()
    with pytest.raises(DataError, match="math/train_00001.bin.*missing.*velocitune prepare"):
        PreparedData(tmp_path)


def test_prepared_data_token_count_mismatch(tmp_path):
    _make_prepared(tmp_path, {"math": ([30], 10)})
    write_shard(tmp_path / "math" / "train_00000.bin", np.arange(29), np.uint16)
    data = PreparedData(tmp_path)
    with pytest.raises(DataError, match="29 tokens but the manifest says 30"):
        data.train("math")


def test_prepared_data_refuses_a_part(tmp_path):
    _make_prepared(tmp_path, {"math": ([30], 10)})
    m = json.loads((tmp_path / "manifest.json").read_text())
    m["part"] = {"index": 1, "count": 3}
    (tmp_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="part 1 of a 3-way.*--merge"):
        PreparedData(tmp_path)


def test_windows_from_a_memmapped_shard(tmp_path):
    # A 4M-token shard is memmapped, not loaded; windows come out right far into it.
    path = write_shard(tmp_path / "big.bin", np.arange(4_000_000) % 50_000, np.uint16)
    tokens = DomainTokens([path])
    got = tokens.windows(np.array([0, 1999]), 1999)
    np.testing.assert_array_equal(got[1], np.arange(1999 * 2000, 2000 * 2000) % 50_000)
    assert isinstance(tokens._shards[0], np.memmap)
    assert os.path.getsize(path) == HEADER_BYTES + 8_000_000
