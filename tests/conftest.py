"""Shared tiny fixtures: a byte-level BPE tokenizer, a three-domain corpus, its prepared shards, and a
training config small enough that a run takes seconds on one CPU thread."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


def _prose(rng: random.Random, n: int) -> list[str]:
    words = "the a model learns data from every domain while loss falls and weights move slowly over time".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(40, 120))) + "." for _ in range(n)]


def _code(rng: random.Random, n: int) -> list[str]:
    docs = []
    for i in range(n):
        lines = [f"def f{i}(x, y):"]
        for j in range(rng.randint(3, 12)):
            lines.append(f"    x = x * {rng.randint(2, 9)} + y  # step {j}")
        lines.append("    return x")
        docs.append("\n".join(lines))
    return docs


def _math(rng: random.Random, n: int) -> list[str]:
    docs = []
    for _ in range(n):
        a, b = rng.randint(10, 999), rng.randint(10, 999)
        docs.append(f"Q: {a} + {b} = ?\nA: {a} + {b} = {a + b}.\nQ: {a} * 3 = ?\nA: {a * 3}.")
    return docs


GENERATORS = {"prose": _prose, "code": _code, "math": _math}
SIZES = {"prose": 60, "code": 120, "math": 400}


def write_jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    return {name: write_jsonl(root / f"{name}.jsonl", gen(rng, SIZES[name])) for name, gen in GENERATORS.items()}


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory, tiny_corpus) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for p in tiny_corpus.values() for line in p.read_text().splitlines()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>").save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_prepared(tmp_path_factory, tiny_corpus, tiny_tokenizer) -> Path:
    from velocitune.prepare import prepare_corpus

    out = tmp_path_factory.mktemp("prepared")
    prepare_corpus(tiny_tokenizer, out, {n: [str(p)] for n, p in tiny_corpus.items()},
                   val_fraction=0.1, val_tokens=4096, workers=1, progress=False)
    return out


def tiny_config(data_path: Path, out_dir: Path, **sections):
    """A Config for a seconds-long CPU run; keyword sections override, e.g. train={"steps": 10}."""
    from velocitune.config import from_dict

    base = {
        "run": {"out_dir": str(out_dir)},
        "data": {"path": str(data_path), "seq_len": 32},
        "model": {"hidden_size": 32, "n_layers": 2, "n_heads": 2, "intermediate_size": 64},
        "train": {"steps": 24, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "seed": 0, "threads": 1},
        "mixing": {"rule": "velocitune", "interval": 4, "target_values": {"prose": 3.0, "code": 2.0, "math": 1.5}},
        "eval": {"max_tokens": 256, "batch_size": 8},
        "log": {"interval": 4, "progress": False},
        "checkpoint": {"interval": 8, "keep": 2},
    }
    for sec, body in sections.items():
        base.setdefault(sec, {}).update(body)
    return from_dict(base)


@pytest.fixture
def make_config(tiny_prepared, tmp_path):
    def factory(name: str = "run", **sections):
        return tiny_config(tiny_prepared, tmp_path / name, **sections)

    return factory


@pytest.fixture
def toy_demo(monkeypatch):
    """The demo module shrunk to toy sizes (sequence, batch, model, eval tokens, interval) for end-to-end tests."""
    from velocitune import demo

    monkeypatch.setattr(demo, "SEQ_LEN", 32)
    monkeypatch.setattr(demo, "BATCH", 8)
    monkeypatch.setattr(demo, "MODEL", {"hidden_size": 32, "n_layers": 2, "n_heads": 2, "intermediate_size": 64})
    monkeypatch.setattr(demo, "EVAL_TOKENS", 256)
    monkeypatch.setattr(demo, "INTERVAL", 4)
    return demo
