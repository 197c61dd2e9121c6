"""Tests for velocitune.prepare.split: the val split follows the documented rule, is deterministic and does
not move when documents are added; degenerate domains are refused."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
from conftest import paragraphs, ref_ids, run_prepare, split_docs, token_stream, write_docs

from velocitune.errors import DataError


def _h(text: str) -> int:
    """The documented val hash: blake2b-64 of the UTF-8 text, big-endian."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _reference_val(hf, texts: list[str], fraction: float, cap: int) -> list[int]:
    """The documented rule with a plain sort: candidates (hash < fraction*2^64) in hash order, taken
    while the tokens already taken are below the cap; at least the lowest-hash document."""
    hashes = [_h(t) for t in texts]
    cands = sorted((h, i) for i, h in enumerate(hashes) if h < int(fraction * 2**64))
    chosen, total = [], 0
    for _, i in cands:
        if total >= cap:
            break
        chosen.append(i)
        total += len(ref_ids(hf, texts[i]))
    if not chosen:
        chosen = [min(range(len(texts)), key=lambda i: hashes[i])]
    return sorted(chosen)


def _val_indices(out: Path, m: dict, name: str, hf, texts: list[str]) -> list[int]:
    ref = [ref_ids(hf, t) for t in texts]
    return sorted(ref.index(d) for d in split_docs(token_stream(out, m, name, "val"), hf.eos_token_id))


@pytest.mark.parametrize("cap", [10**9, 300, 1])
def test_val_split_follows_the_rule(tmp_path, tokenizer_dir, hf, cap):
    texts = paragraphs(6, 150)
    src = write_docs(tmp_path / "d.jsonl", texts)
    m = run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(src)}, val_fraction=0.2, val_tokens=cap)
    got = _val_indices(tmp_path / "out", m, "d", hf, texts)
    assert got == _reference_val(hf, texts, 0.2, cap)
    if cap == 10**9:
        assert 15 <= len(got) <= 45  # about 20 % of 150
    if cap == 1:
        assert len(got) == 1


def test_val_split_is_deterministic_and_stable_when_documents_are_added(tmp_path, tokenizer_dir, hf):
    texts = paragraphs(7, 80)
    a = run_prepare(tokenizer_dir, tmp_path / "a", {"d": str(write_docs(tmp_path / "a.jsonl", texts))},
                    val_fraction=0.15)
    b = run_prepare(tokenizer_dir, tmp_path / "b", {"d": str(write_docs(tmp_path / "b.jsonl", texts))},
                    val_fraction=0.15)
    assert (tmp_path / "a/d/val_00000.bin").read_bytes() == (tmp_path / "b/d/val_00000.bin").read_bytes()
    assert (tmp_path / "a/d/train_00000.bin").read_bytes() == (tmp_path / "b/d/train_00000.bin").read_bytes()
    assert a["domains"][0]["val"] == b["domains"][0]["val"] and a["domains"][0]["train"] == b["domains"][0]["train"]
    before = {texts[i] for i in _val_indices(tmp_path / "a", a, "d", hf, texts)}
    # Add documents, and shuffle the file order: the old documents' val membership must not move.
    more = texts + [f"new {t}" for t in paragraphs(8, 60)]
    random.Random(0).shuffle(more)
    c = run_prepare(tokenizer_dir, tmp_path / "c", {"d": str(write_docs(tmp_path / "c.jsonl", more))},
                    val_fraction=0.15)
    after = {more[i] for i in _val_indices(tmp_path / "c", c, "d", hf, more)}
    assert after & set(texts) == before
    assert after - set(texts)  # some new documents joined val


def test_small_domain_gets_one_val_document(tmp_path, tokenizer_dir, hf):
    texts = paragraphs(9, 5)
    assert all(_h(t) >= int(0.01 * 2**64) for t in texts)  # none is a val candidate
    m = run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(write_docs(tmp_path / "d.jsonl", texts))})
    assert _val_indices(tmp_path / "out", m, "d", hf, texts) == [min(range(5), key=lambda i: _h(texts[i]))]
    assert m["domains"][0]["train"]["documents"] == 4


def test_domain_without_documents(tmp_path, tokenizer_dir):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("")
    write_docs(tmp_path / "d" / "b.jsonl", [""])
    with pytest.raises(DataError, match="domain 'd' yields no documents"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "d")})


def test_val_would_take_the_whole_domain(tmp_path, tokenizer_dir):
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(DataError, match="domain 'one' has a single document"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"one": str(tmp_path / "one.txt")})
    src = write_docs(tmp_path / "same.jsonl", ["same text"] * 4)
    with pytest.raises(DataError, match="domain 'same': the val split would take all 4 documents"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"same": str(src)})
    src = write_docs(tmp_path / "two.jsonl", ["first document", "second document"])
    with pytest.raises(DataError, match="domain 'two': the val split would take all 2.*--val-fraction"):
        run_prepare(tokenizer_dir, tmp_path / "out", {"two": str(src)}, val_fraction=0.999999)
