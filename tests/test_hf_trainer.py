"""transformers.Trainer integration: planned batches reach the model, the callback drives the same mixing
controller as `velocitune train` with the same defaults, and its state (JSON) and log survive a resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from velocitune import mixing, runfiles
from velocitune.errors import ConfigError
from velocitune.integrations.hf_trainer import MixtureDataset, VelocituneCallback, trainer_args_for
from velocitune.model import build_model

TARGETS = {"prose": 3.0, "code": 2.0, "math": 1.5}


def _trainer(tiny_prepared, out, steps, save_steps=4, **callback):
    from transformers import Trainer, TrainingArguments

    data = MixtureDataset(tiny_prepared, seq_len=32, global_batch=8, steps=steps, seed=0)
    model = build_model(vocab_size=data.data.vocab_size, hidden_size=32, n_layers=2, n_heads=2,
                        intermediate_size=64, max_seq_len=64, seed=0)
    args = TrainingArguments(output_dir=str(out), learning_rate=3e-3, save_steps=save_steps, logging_steps=100,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, save_strategy="steps",
                             **trainer_args_for(data, per_device_batch=4, grad_accum=2))
    callback = {"targets": TARGETS, "interval": 2, "eval_tokens": 128, "log_file": out / "mix.jsonl", **callback}
    cb = VelocituneCallback(data, **callback)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]), data, cb


def test_trainer_weights_follow_the_rule_and_resume(tiny_prepared, tmp_path):
    trainer, data, cb = _trainer(tiny_prepared, tmp_path / "a", steps=8)
    trainer.train()
    # Step 0 holds w0; the updates after steps 2, 4, 6 take effect one step later (the loader prefetched).
    assert [r["step"] for r in cb.history] == [0, 3, 5, 7]
    names = data.names
    w = data.w0.copy()
    for rec in cb.history[1:]:
        v = mixing.velocity([rec["losses"][n] for n in names], cb.init, [TARGETS[n] for n in names], floor=0.02)
        np.testing.assert_allclose([rec["velocity"][n] for n in names], v, atol=1e-12)
        # The same default as the CLI's: the robust preset.
        w = mixing.update_weights(w, v, eta=1.0, smoothing=mixing.PRESETS["robust"]["smoothing"])
        np.testing.assert_allclose([rec["weights"][n] for n in names], w, atol=1e-9)
    assert not np.allclose(w, data.w0)
    # The sampler's schedule holds the updates, effective from the recorded steps.
    assert [s for s, _ in data.sampler.schedule][1:] == [3, 5, 7]
    saved = tmp_path / "a" / "checkpoint-4" / runfiles.CALLBACK_STATE_FILE
    doc = json.loads(saved.read_text())  # plain JSON, nothing to unpickle, in a versioned format
    assert (doc["format"], doc["version"]) == ("velocitune-callback-state", 1)
    assert doc["controller"]["rule"]["rule"] == "velocitune" and len(doc["controller"]["sig_sum"]) == 3
    logged = runfiles.read_log(tmp_path / "a" / "mix.jsonl", runfiles.MIXTURE, names)
    assert [r["step"] for r in logged] == [0, 3, 5, 7]

    # Resume from checkpoint-4 in a fresh Trainer: the restored schedule continues identically, and the
    # log is cut back to the checkpoint, so it ends with the same lines and no duplicates.
    trainer2, data2, cb2 = _trainer(tiny_prepared, tmp_path / "a", steps=8)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert [r["step"] for r in cb2.history] == [0, 3, 5, 7]
    assert cb2.history[:3] == cb.history[:3]  # restored, not recomputed
    for a, b in zip(cb2.history[3:], cb.history[3:]):
        np.testing.assert_allclose(list(a["losses"].values()), list(b["losses"].values()), rtol=1e-4)
    relogged = runfiles.read_log(tmp_path / "a" / "mix.jsonl", runfiles.MIXTURE, names)
    assert [r["step"] for r in relogged] == [0, 3, 5, 7]


def test_callback_defaults_are_the_configs(tiny_prepared, tmp_path):
    """No interval, no warm-up given: steps // 100 (here 1) and the Trainer's own warm-up (2 steps)."""
    from transformers import Trainer, TrainingArguments

    data = MixtureDataset(tiny_prepared, seq_len=32, global_batch=8, steps=6, seed=0)
    model = build_model(vocab_size=data.data.vocab_size, hidden_size=32, n_layers=2, n_heads=2,
                        intermediate_size=64, max_seq_len=64, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), learning_rate=3e-3, warmup_steps=2, report_to=[],
                             use_cpu=True, seed=0, disable_tqdm=True, save_strategy="no",
                             **trainer_args_for(data, per_device_batch=8))
    cb = VelocituneCallback(data, targets=TARGETS, eval_tokens=64)
    assert cb.mixing_config.preset == "robust" and cb.mixing_config.rule == "velocitune"
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    assert [r["step"] for r in cb.history] == [0, 3, 4, 5]  # updates after steps 2, 3, 4 (the last is 5)


def test_callback_checks_its_keys_like_a_config(tiny_prepared):
    data = MixtureDataset(tiny_prepared, seq_len=32, global_batch=8, steps=5)
    with pytest.raises(ConfigError, match="unknown config key 'mixing.smoothin'. Did you mean 'mixing.smoothing'"):
        VelocituneCallback(data, targets=TARGETS, smoothin=0.1)
    with pytest.raises(ConfigError, match="needs a target loss for every domain"):
        VelocituneCallback(data)
    with pytest.raises(ConfigError, match="mixing.signal=eval"):
        VelocituneCallback(data, targets=TARGETS, signal="train")


def test_dataset_items_follow_the_plan(tiny_prepared):
    data = MixtureDataset(tiny_prepared, seq_len=32, global_batch=8, steps=5, seed=1)
    assert len(data) == 40
    for step in range(5):
        plan = data.sampler.plan(step)
        assert [data.domain_of(step * 8 + p) for p in range(8)] == plan.domains.tolist()
        item = data[step * 8 + 3]
        win = data._tokens[data.names[plan.domains[3]]].windows(plan.windows[3:4], 32)[0]
        assert torch.equal(item["input_ids"], torch.from_numpy(win[:32]))


def test_batch_geometry_must_match(tiny_prepared):
    data = MixtureDataset(tiny_prepared, seq_len=32, global_batch=8, steps=5)
    with pytest.raises(ConfigError, match="must equal the dataset's global_batch 8"):
        trainer_args_for(data, per_device_batch=3, grad_accum=2)
