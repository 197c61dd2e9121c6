"""Fixtures of tests/prepare/: a small byte-level BPE tokenizer trained on `paragraphs` documents, and the
same tokenizer through transformers (the reference prepare's token streams are checked against)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import paragraphs

EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(paragraphs(99, 200) + ["def f(x):\n    return x * 2\n"] * 20, trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf(tokenizer_dir):
    """The reference: the same tokenizer through transformers' own __call__ (not prepare's path)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
