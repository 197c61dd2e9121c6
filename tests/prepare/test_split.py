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


# -- the val split's size against data.seq_len (issue 28 item 3) -----------------------------------------------


def test_check_val_size_refuses_no_window_warns_under_useful_and_names_what_to_change(caplog):
    from velocitune.prepare.settings import MIN_VAL_WINDOWS, USEFUL_VAL_WINDOWS, make_settings
    from velocitune.prepare.split import check_val_size

    assert (MIN_VAL_WINDOWS, USEFUL_VAL_WINDOWS) == (1, 8)
    settings = make_settings(val_fraction=0.01, val_tokens=1_000_000)
    # 1,566 tokens at seq_len 256: 6 windows of 257 (the newcomer's corpus): a warning, with the val_fraction
    # that would give 8 windows, 0.01 * 8 * 257 / 1566 = 0.0131.
    with caplog.at_level("WARNING", logger="velocitune.prepare"):
        check_val_size("web", 1566, 256, settings)
    (rec,) = caplog.records
    assert rec.getMessage() == (
        "domain 'web': its validation split holds only 6 window(s) of data.seq_len + 1 = 257 tokens (1,566 "
        "tokens), a noisy val loss; 8 or more are advised: raise --val-fraction (now 0.01; about 0.013 would "
        "give 8), lower data.seq_len (now 256) or give the domain more data")
    caplog.clear()
    with caplog.at_level("WARNING", logger="velocitune.prepare"):
        check_val_size("web", 8 * 257, 256, settings)  # exactly 8 windows: nothing to say
    assert caplog.records == []
    # 256 tokens: not one window of 257. The suggested fraction (0.08) is below 0.5, so it is given.
    with pytest.raises(DataError) as err:
        check_val_size("web", 256, 256, settings)
    assert str(err.value) == (
        "domain 'web': its validation split holds 256 tokens, 0 whole window(s) of data.seq_len + 1 = 257 "
        "tokens, fewer than the 1 needed to measure a val loss; raise --val-fraction (now 0.01; about 0.08 "
        "would give 8), lower data.seq_len (now 256) or give the domain more data")
    # A val_tokens cap below 8 windows is named too; a fraction past 0.5 is not suggested.
    small_cap = make_settings(val_fraction=0.2, val_tokens=500)
    with pytest.raises(DataError, match=r"raise --val-fraction \(now 0.2\) and --val-tokens \(now 500\) to at "
                                        r"least 2,056, lower data.seq_len"):
        check_val_size("web", 200, 256, small_cap)


def test_prepare_refuses_a_val_split_without_a_window_before_marking_the_domain_done(tmp_path, tokenizer_dir):
    from velocitune.errors import ConfigError

    docs = write_docs(tmp_path / "d.jsonl", paragraphs(3, 30, 20, 40))
    m = run_prepare(tokenizer_dir, tmp_path / "ok", {"d": [str(docs)]}, val_fraction=0.1)
    val_tokens = m["domains"][0]["val"]["tokens"]
    assert val_tokens > 0
    # A window one token longer than the whole val split: refused, and the domain is not marked done.
    with pytest.raises(DataError, match=rf"domain 'd': its validation split holds {val_tokens:,} tokens, 0 whole "):
        run_prepare(tokenizer_dir, tmp_path / "bad", {"d": [str(docs)]}, val_fraction=0.1, seq_len=val_tokens)
    assert not (tmp_path / "bad" / "d" / ".done").exists() and not (tmp_path / "bad" / "manifest.json").exists()
    # Exactly one window fits: accepted (with a warning), same bytes as without the check.
    again = run_prepare(tokenizer_dir, tmp_path / "one", {"d": [str(docs)]}, val_fraction=0.1,
                        seq_len=val_tokens - 1)
    assert again["domains"][0]["val"] == {**m["domains"][0]["val"], "shards": again["domains"][0]["val"]["shards"]}
    # A finished domain is checked again on a rerun with a longer window (its inputs did not change).
    with pytest.raises(DataError, match="0 whole window"):
        run_prepare(tokenizer_dir, tmp_path / "one", {"d": [str(docs)]}, val_fraction=0.1, seq_len=val_tokens)
    # The val_tokens cap is checked before any work.
    with pytest.raises(ConfigError, match=r"val_tokens 10 caps every domain's validation split below 1 window\(s\) "
                                          r"of data.seq_len \+ 1 = 11 tokens; raise --val-tokens to at least 11"):
        run_prepare(tokenizer_dir, tmp_path / "cap", {"d": [str(docs)]}, val_tokens=10, seq_len=10)
    assert not (tmp_path / "cap").exists()
