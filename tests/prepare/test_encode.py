"""Tests for velocitune.prepare.encode: both encoder paths and the worker pool write the same tokens as the
tokenizer itself; a tokenizer that does not load or has no EOS is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import paragraphs, ref_ids, run_prepare, write_docs

from velocitune.errors import DataError
from velocitune.prepare import load_tokenizer
from velocitune.prepare.encode import Encoder, _BatchEncoder


def test_encoder_paths_agree(tokenizer_dir, hf):
    # The serialised-backend path (fast tokenizers) and the transformers path (any other tokenizer)
    # must write the same tokens: EOS after every document, nothing else added.
    info = load_tokenizer(tokenizer_dir)
    assert info.spec["kind"] == "fast"
    texts = paragraphs(20, 5) + ["héllo ✓", " leading space"]
    fast_tokens, fast_lengths = _BatchEncoder(info.spec).encode(texts)
    slow_spec = {**info.spec, "kind": "hf", "dir": str(tokenizer_dir)}
    hf_tokens, hf_lengths = _BatchEncoder(slow_spec).encode(texts)
    ref = [ref_ids(hf, t) for t in texts]
    assert fast_tokens.dtype == np.uint16
    assert fast_tokens.tolist() == hf_tokens.tolist() == [i for r in ref for i in r]
    assert fast_lengths.tolist() == hf_lengths.tolist() == [len(r) for r in ref]
    assert _BatchEncoder(info.spec).encode(texts, lengths_only=True)[0] is None


def test_worker_pool_matches_the_inline_encoder(tokenizer_dir):
    # Two spawned workers (initializer + module-level function, pickled by reference) return every
    # job's tokens in job order, the same as encoding in this process.
    spec = load_tokenizer(tokenizer_dir).spec
    jobs = [(k, paragraphs(30 + k, 1 + k % 4)) for k in range(9)]
    with Encoder(spec, 1) as inline:
        want = [(m, t.tolist(), n.tolist()) for m, t, n in inline.map(jobs)]
    with Encoder(spec, 2) as pool:
        got = [(m, t.tolist(), n.tolist()) for m, t, n in pool.map(jobs)]
        lengths = [(m, t, n.tolist()) for m, t, n in pool.map(jobs, lengths_only=True)]
    assert got == want
    assert lengths == [(m, None, n) for m, _, n in want]


def test_tokenizer_that_does_not_load(tmp_path):
    src = write_docs(tmp_path / "d.jsonl", ["a", "b"])
    with pytest.raises(DataError, match="tokenizer directory '.*nope' does not exist"):
        run_prepare(tmp_path / "nope", tmp_path / "out", {"d": str(src)})
    bad = tmp_path / "bad_tok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{ this is not a tokenizer")
    (bad / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(DataError, match="could not load a tokenizer from .*bad_tok"):
        run_prepare(bad, tmp_path / "out", {"d": str(src)})


def test_tokenizer_without_eos(tmp_path, tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    no_eos = tmp_path / "no_eos"
    PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json")).save_pretrained(no_eos)
    src = write_docs(tmp_path / "d.jsonl", ["a", "b"])
    with pytest.raises(DataError, match="has no EOS token.*eos_token"):
        run_prepare(no_eos, tmp_path / "out", {"d": str(src)})
