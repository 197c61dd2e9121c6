"""Tests for velocitune.prepare.sources: every input format end to end (files, directories, globs, text,
JSON Lines plain/.gz/.zst, Parquet), and one test per kind of bad input file."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
from conftest import paragraphs, ref_ids, run_prepare, split_docs, token_stream, write_docs

from velocitune.errors import DataError
from velocitune.shards import PreparedData, open_shard

# -- every input format, end to end --------------------------------------------------------------


def _all_formats(root: Path) -> dict[str, list[str]]:
    """One domain per format; returns the documents each should yield, in the documented order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs: dict[str, list[str]] = {}
    text = root / "text"
    (text / "sub").mkdir(parents=True)
    (text / ".git").mkdir()
    files = {"b.md": "# Title\n\nsome markdown", "a.txt": "plain text file", "sub/c.py": "def f(x):\n    return x",
             "sub/d.rst": "Heading\n=======", "e.tex": "\\section{Intro} math $x^2$",
             "z.c": "int main() { return 0; }"}
    for rel, t in files.items():
        (text / rel).write_text(t)
    (text / ".hidden.txt").write_text("hidden files are skipped")
    (text / ".git" / "x.txt").write_text("so are hidden directories")
    (text / "data.csv").write_text("a,b\n1,2")  # not a supported extension: ignored
    (text / "empty.txt").write_text("")  # an empty document: skipped, counted
    # Sorted by full path: a.txt, b.md, e.tex, sub/c.py, sub/d.rst, z.c (via --ext .c).
    docs["text"] = [files[k] for k in ["a.txt", "b.md", "e.tex", "sub/c.py", "sub/d.rst", "z.c"]]

    jl = paragraphs(1, 12)
    with open(root / "plain.jsonl", "w") as f:
        for t in jl[:6]:
            f.write(json.dumps({"text": t}) + "\n")
        f.write("\n")  # blank line: ignored
        f.write(json.dumps({"text": ""}) + "\n")  # empty: skipped, counted
        f.write(json.dumps({"text": None, "meta": 1}) + "\n")  # null: skipped, counted
        for t in jl[6:]:
            f.write(json.dumps({"text": t, "lang": "en"}) + "\n")
    docs["jsonl"] = jl

    gz = paragraphs(2, 9) + ["unicode: héllo wörld ✓ 日本語"]
    with gzip.open(root / "g.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in gz)
    docs["gz"] = gz

    zs = paragraphs(3, 8)
    raw = "".join(json.dumps({"text": t}) + "\n" for t in zs).encode()
    (root / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    docs["zst"] = zs

    pqd = paragraphs(4, 11)
    pq.write_table(pa.table({"text": pqd, "n": list(range(11))}), root / "p.parquet", row_group_size=4)
    docs["parquet"] = pqd
    return docs


def test_every_format_end_to_end(tmp_path, tokenizer_dir, hf):
    expected = _all_formats(tmp_path / "in")
    domains = {"text": [str(tmp_path / "in" / "text")], "jsonl": str(tmp_path / "in" / "plain.jsonl"),
               "gz": str(tmp_path / "in" / "g.jsonl.gz"), "zst": str(tmp_path / "in" / "z.jsonl.zst"),
               "parquet": str(tmp_path / "in" / "p.parquet")}
    out = tmp_path / "out"
    m = run_prepare(tokenizer_dir, out, domains, val_fraction=0.2, extensions=[".c"], shard_tokens=64)

    assert m["tokenizer"]["vocab_size"] == len(hf) == 300
    assert m["tokenizer"]["eos_token_id"] == hf.eos_token_id
    assert m["tokenizer"]["hash"] == hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert m["dtype"] == "uint16"
    assert [e["name"] for e in m["domains"]] == list(domains)
    eos = hf.eos_token_id
    for e in m["domains"]:
        name = e["name"]
        ref = [ref_ids(hf, t) for t in expected[name]]
        train, val = token_stream(out, m, name, "train"), token_stream(out, m, name, "val")
        assert e["train"]["tokens"] == train.size and e["val"]["tokens"] == val.size
        assert train.size + val.size == sum(map(len, ref))  # token counts = direct tokenization
        # Val = whole documents; train = the others, both in document order.
        val_docs, train_docs = split_docs(val, eos), split_docs(train, eos)
        val_idx = [ref.index(d) for d in val_docs]
        assert val_idx == sorted(val_idx) and len(val_idx) >= 1
        assert train_docs == [d for i, d in enumerate(ref) if i not in val_idx]
        assert (e["train"]["documents"], e["val"]["documents"]) == (len(train_docs), len(val_docs))
        assert all(open_shard(out / rel).size == 64 for rel in e["train"]["shards"][:-1])
    by = {e["name"]: e for e in m["domains"]}
    assert by["text"]["empty_documents"] == 1 and by["jsonl"]["empty_documents"] == 2
    assert by["text"]["files"] == 7  # 6 documents + the empty file
    total = sum(e["train"]["tokens"] for e in m["domains"])
    assert m["w0"] == {e["name"]: e["train"]["tokens"] / total for e in m["domains"]}
    # What the training side reads back.
    data = PreparedData(out)
    assert data.domains == list(domains)
    np.testing.assert_allclose(data.w0.sum(), 1.0)
    np.testing.assert_array_equal(data.val("gz").read(0, data.val("gz").n_tokens), token_stream(out, m, "gz", "val"))


def test_text_field_option(tmp_path, tokenizer_dir, hf):
    texts = paragraphs(5, 6)
    src = write_docs(tmp_path / "c.jsonl", texts, field="content")
    m = run_prepare(tokenizer_dir, tmp_path / "out", {"c": str(src)}, text_field="content")
    e = m["domains"][0]
    assert e["train"]["tokens"] + e["val"]["tokens"] == sum(len(ref_ids(hf, t)) for t in texts)


def test_glob_source(tmp_path, tokenizer_dir, hf):
    texts = paragraphs(17, 6)
    for i in range(3):
        write_docs(tmp_path / f"s{i}.jsonl", texts[2 * i : 2 * i + 2])
    m = run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "s*.jsonl")})
    e = m["domains"][0]
    assert e["files"] == 3 and e["train"]["tokens"] + e["val"]["tokens"] == sum(len(ref_ids(hf, t)) for t in texts)


# -- bad input: one test each ---------------------------------------------------------------------


def test_missing_path(tmp_path, tokenizer_dir):
    with pytest.raises(DataError, match=r"domain 'd'.*nope.*does not exist"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "nope")})


def test_glob_matching_nothing(tmp_path, tokenizer_dir):
    with pytest.raises(DataError, match=r"domain 'd'.*matches no files"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "*.jsonl")})


def test_directory_without_supported_files(tmp_path, tokenizer_dir):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"domain 'd'.*no input files.*--ext \.csv"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "d")})


def test_explicit_file_with_unsupported_extension(tmp_path, tokenizer_dir):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"domain 'd'.*unsupported extension \.csv.*--ext \.csv"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "x.csv")})


def test_non_utf8_files_are_skipped_and_counted(tmp_path, tokenizer_dir, hf, caplog):
    d = tmp_path / "d"
    d.mkdir()
    texts = paragraphs(18, 4)
    for i, t in enumerate(texts):
        (d / f"{i}.txt").write_text(t)
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    # A JSON Lines file whose 2nd line is bad: skipped whole, its 1st line not counted either.
    (d / "bad.jsonl").write_bytes(b'{"text": "fine line"}\n{"text": "caf\xe9"}\n')
    # Parquet binary columns are decoded as UTF-8: a good one is read, a bad one skipped whole.
    import pyarrow as pa
    import pyarrow.parquet as pq

    extra = paragraphs(19, 2)
    pq.write_table(pa.table({"text": pa.array([x.encode() for x in extra], pa.binary())}), d / "good.parquet")
    pq.write_table(pa.table({"text": pa.array([b"ok", b"caf\xe9"], pa.binary())}), d / "bad.parquet")
    with caplog.at_level(logging.WARNING, logger="velocitune.prepare"):
        m = run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(d)})
    e = m["domains"][0]
    assert e["skipped_files"] == 3
    assert e["train"]["documents"] + e["val"]["documents"] == 6
    assert e["train"]["tokens"] + e["val"]["tokens"] == sum(len(ref_ids(hf, t)) for t in texts + extra)
    for name in ("latin1.txt", "bad.jsonl", "bad.parquet"):
        assert name in caplog.text
    assert "not valid UTF-8" in caplog.text
    with pytest.raises(DataError, match=r"domain 'd'.*bad\.jsonl is not valid UTF-8.*--strict"):
        run_prepare(tokenizer_dir, tmp_path / "out2", {"d": str(d)}, strict=True)


def test_malformed_json_line(tmp_path, tokenizer_dir):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
    with pytest.raises(DataError, match=r"domain 'd'.*d\.jsonl, line 3: malformed JSON"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(p)})
    p.write_text('{"text": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"line 2: a JSON list"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(p)})


def test_missing_text_field(tmp_path, tokenizer_dir):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"body": "b", "id": 2}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: no field 'text'.*\['body', 'id'\].*--text-field"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(p)})
    p.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"line 1: field 'text' is a int"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(p)})


def test_parquet_missing_column(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet has no column 'text'; its columns are \['body'\]"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "d.parquet")})


def test_corrupt_compressed_file(tmp_path, tokenizer_dir):
    p = tmp_path / "d.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:30])
    with pytest.raises(DataError, match=r"cannot read or decompress .*d\.jsonl\.gz"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(p)})


def test_corrupt_parquet_file(tmp_path, tokenizer_dir):
    (tmp_path / "d.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataError, match=r"domain 'd'.*d\.parquet is not a readable Parquet file"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "d.parquet")})
