"""Shared tiny fixtures: a byte-level BPE tokenizer, a three-domain corpus, its prepared shards, and a
training config small enough that a run takes seconds on one CPU thread."""

from __future__ import annotations

import json
import random
import socket
from pathlib import Path

import numpy as np
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
        # signal eval: most tests exercise the evaluation path at update points (faults, overhead, timing); the
        # default's own signal (train, issue 27) is tested where it is named (golden "default", test_rules)
        "mixing": {"rule": "velocitune", "signal": "eval", "interval": 4,
                   "target_values": {"prose": 3.0, "code": 2.0, "math": 1.5}},
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
    """The demo pipeline shrunk to toy sizes (sequence, batch, model, eval tokens, interval) for end-to-end tests."""
    from velocitune.demo import pipeline

    monkeypatch.setattr(pipeline, "SEQ_LEN", 32)
    monkeypatch.setattr(pipeline, "BATCH", 8)
    monkeypatch.setattr(pipeline, "MODEL", {"hidden_size": 32, "n_layers": 2, "n_heads": 2, "intermediate_size": 64})
    monkeypatch.setattr(pipeline, "EVAL_TOKENS", 256)
    monkeypatch.setattr(pipeline, "INTERVAL", 4)
    monkeypatch.setattr(pipeline, "DOWNSTREAM_EXAMPLES", 12)
    return pipeline


# The embedded demo corpus at a tiny scale, shared by tests/demo/ and tests/studies/: their modules run with
# the network refused (`pytestmark = pytest.mark.usefixtures("no_network")`), so a build that needed it fails.

DEMO_SCALE = 0.02


@pytest.fixture(scope="module")
def no_network():
    """Refuse every outgoing connection, so a test that needed the network would fail."""

    def refuse(*args, **kwargs):
        raise AssertionError("the demo corpus tried to open a network connection")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "create_connection", refuse)
        mp.setenv("HF_HUB_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def demo_corpus(no_network, tmp_path_factory) -> dict[str, Path]:
    """The demo corpus at DEMO_SCALE: {domain: JSONL path}."""
    from velocitune.demo.corpus import build_corpus

    return build_corpus(tmp_path_factory.mktemp("demo_corpus"), scale=DEMO_SCALE, progress=False)


def jsonl_texts(path: Path) -> list[str]:
    """The `text` of every line of a corpus JSONL file."""
    return [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()]


# Scaling-law curves shared by tests/laws/ (written independently of velocitune.laws' internals).


def data_law(D, E, B, beta):
    return E + B * np.power(D, -beta)


def design_points(seed, noise=0.002):
    """docs/design.md §4.1 check: L = 1.6 + 120/D^0.3, 10 points over 2–20 % of 2e9 tokens."""
    rng = np.random.default_rng(seed)
    D = np.linspace(0.02, 0.2, 10) * 2e9
    return D, data_law(D, 1.6, 120.0, 0.3) * (1 + noise * rng.standard_normal(10))


DESIGN_TRUE = 1.6 + 120.0 / 2e9**0.3  # 1.79448


# Documents, runs and read-backs shared by tests/prepare/ (its tokenizer fixtures: tests/prepare/conftest.py).

_WORDS = ("alpha beta gamma delta model token shard domain loss weight velocity learn code math "
          "def return import class for while if else print value").split()


def paragraphs(seed: int, n: int, lo: int = 5, hi: int = 40) -> list[str]:
    rng = random.Random(seed)
    # The index makes every document distinct (identical documents share a hash by design).
    return [f"{i}: " + " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi))) for i in range(n)]


def ref_ids(hf, text: str) -> list[int]:
    """The reference: `text` through transformers' own __call__ (not prepare's path), then EOS."""
    return hf(text, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]


def token_stream(out: Path, manifest: dict, name: str, split: str) -> np.ndarray:
    from velocitune.shards import open_shard

    entry = next(e for e in manifest["domains"] if e["name"] == name)
    parts = [np.asarray(open_shard(out / rel)) for rel in entry[split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def split_docs(stream: np.ndarray, eos: int) -> list[list[int]]:
    """Split a token stream back into documents (each ends with EOS)."""
    assert stream.size == 0 or stream[-1] == eos
    cuts = np.flatnonzero(stream == eos)
    return [stream[a + 1 : b + 1].tolist() for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]


def write_docs(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def run_prepare(tok, out, domains, **kw) -> dict:
    from velocitune.prepare import prepare_corpus

    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return prepare_corpus(tok, out, domains, **kw)


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def two_domains(root: Path) -> dict[str, list[str]]:
    (root / "txt").mkdir(parents=True)
    for i, t in enumerate(paragraphs(10, 12, 20, 60)):
        (root / "txt" / f"{i:02d}.txt").write_text(t)
    write_docs(root / "j.jsonl", paragraphs(11, 40, 10, 50))
    return {"txt": [str(root / "txt")], "json": [str(root / "j.jsonl")]}


def train_interrupted_at(monkeypatch, cfg, step: int) -> None:
    """Run `velocitune.train.train(cfg)` and interrupt it (KeyboardInterrupt) as step `step` begins, as a kill
    would: the steps before it are done and logged, the checkpoints before it written."""
    import velocitune.train as T

    real = T.step_lr

    def crash(c, s, steps):
        if s == step:
            raise KeyboardInterrupt("simulated kill")
        return real(c, s, steps)

    monkeypatch.setattr(T, "step_lr", crash)
    with pytest.raises(KeyboardInterrupt):
        T.train(cfg)
    monkeypatch.setattr(T, "step_lr", real)
