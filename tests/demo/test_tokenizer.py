"""Tests for the demo tokenizer in velocitune.demo.tokenizer, trained on the tiny demo corpus.

Every test here runs with network connections refused.
"""

import json
from pathlib import Path

import pytest
from conftest import jsonl_texts

from velocitune.demo.tokenizer import EOS_TOKEN, train_tokenizer
from velocitune.errors import ConfigError, DataError

pytestmark = pytest.mark.usefixtures("no_network")

TRICKY = [
    "",
    " leading and trailing spaces  ",
    "tabs\tand\nnew lines\r\n\n\n",
    "a . , ; : ! ? ( ) [ ] { }  -- ''",
    "Ünïcödé – “quotes” — 数学 😀 \u200b",
    f"two docs{EOS_TOKEN}joined",
    "\x00\x01 control bytes \x7f",
]


@pytest.fixture(scope="module")
def tokenizer_dir(demo_corpus, tmp_path_factory) -> Path:
    return train_tokenizer(list(demo_corpus.values()), tmp_path_factory.mktemp("tok"), vocab_size=1024)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def test_tokenizer_has_eos_as_bos_and_pad(tokenizer):
    assert tokenizer.eos_token == EOS_TOKEN
    eos = tokenizer.eos_token_id
    assert eos == tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    assert tokenizer.pad_token_id == eos and tokenizer.bos_token_id == eos
    assert tokenizer.encode(EOS_TOKEN, add_special_tokens=False) == [eos]
    # Nothing is added around a text: encoding with special tokens on changes nothing.
    plain = tokenizer.encode("def f(x):", add_special_tokens=False)
    assert tokenizer.encode("def f(x):", add_special_tokens=True) == plain
    assert 256 < len(tokenizer) <= 1024


def test_tokenizer_round_trips_every_document_and_odd_text(demo_corpus, tokenizer):
    for name, path in demo_corpus.items():
        for doc in jsonl_texts(path):
            assert tokenizer.decode(tokenizer.encode(doc)) == doc, name
    for text in TRICKY:
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_learned_merges(demo_corpus, tokenizer):
    # A byte-level BPE that learned nothing would spend one token per byte.
    code = "\n".join(jsonl_texts(demo_corpus["code"]))
    assert len(code.encode("utf-8")) / len(tokenizer.encode(code)) > 2.0


def test_tokenizer_is_deterministic_and_skips_a_finished_build(demo_corpus, tokenizer_dir, tmp_path):
    files = list(demo_corpus.values())
    before = (tokenizer_dir / "tokenizer.json").stat().st_mtime_ns
    assert train_tokenizer(files, tokenizer_dir, vocab_size=1024) == tokenizer_dir
    assert (tokenizer_dir / "tokenizer.json").stat().st_mtime_ns == before

    again = train_tokenizer(files, tmp_path / "again", vocab_size=1024)
    assert (again / "tokenizer.json").read_bytes() == (tokenizer_dir / "tokenizer.json").read_bytes()

    # Other inputs retrain in place.
    train_tokenizer(files, again, vocab_size=600)
    vocab = json.loads((again / "tokenizer.json").read_text())["model"]["vocab"]
    assert len(vocab) == 600


def test_tokenizer_input_errors_name_the_file(tmp_path):
    with pytest.raises(DataError, match="missing.jsonl"):
        train_tokenizer([tmp_path / "missing.jsonl"], tmp_path / "tok")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2"):
        train_tokenizer([bad], tmp_path / "tok")
    with pytest.raises(ConfigError, match="vocab_size"):
        train_tokenizer([bad], tmp_path / "tok", vocab_size=100)
    with pytest.raises(ConfigError):
        train_tokenizer([], tmp_path / "tok")
