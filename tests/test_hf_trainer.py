"""transformers.Trainer integration: planned batches reach the model, weights move as the rule says, and
the mixing state is saved with Trainer checkpoints and restored on resume."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from velocitune import mixing
from velocitune.integrations.hf_trainer import STATE_FILE, MixtureDataset, VelocituneCallback, trainer_args_for
from velocitune.model import build_model

TARGETS = {"prose": 3.0, "code": 2.0, "math": 1.5}


def _trainer(tiny_prepared, out, steps, resume_cb_state=None, save_steps=4):
    from transformers import Trainer, TrainingArguments

    data = MixtureDataset(tiny_prepared, seq_len=32, global_batch=8, steps=steps, seed=0)
    model = build_model(vocab_size=data.data.vocab_size, hidden_size=32, n_layers=2, n_heads=2,
                        intermediate_size=64, max_seq_len=64, seed=0)
    args = TrainingArguments(output_dir=str(out), learning_rate=3e-3, save_steps=save_steps, logging_steps=100,
                             report_to=[], use_cpu=True, seed=0, disable_tqdm=True, save_strategy="steps",
                             **trainer_args_for(data, per_device_batch=4, grad_accum=2))
    cb = VelocituneCallback(data, targets=TARGETS, interval=2, eval_tokens=128, log_file=out / "mix.jsonl")
    return Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]), data, cb


def test_trainer_weights_follow_the_rule_and_resume(tiny_prepared, tmp_path):
    trainer, data, cb = _trainer(tiny_prepared, tmp_path / "a", steps=8)
    trainer.train()
    assert [r["step"] for r in cb.history] == [3, 5, 7]
    names = data.names
    w = data.w0.copy()
    for rec in cb.history:
        v = mixing.velocity([rec["losses"][n] for n in names], cb.init, [TARGETS[n] for n in names], floor=0.02)
        np.testing.assert_allclose([rec["velocity"][n] for n in names], v, atol=1e-12)
        w = mixing.update_weights(w, v, eta=1.0, smoothing=0.0)  # default preset of make_rule: faithful
        np.testing.assert_allclose([rec["weights"][n] for n in names], w, atol=1e-9)
    assert not np.allclose(w, data.w0)
    # The sampler's schedule holds the updates, effective from the recorded steps.
    assert [s for s, _ in data.sampler.schedule][1:] == [3, 5, 7]
    assert (tmp_path / "a" / "checkpoint-4" / STATE_FILE).is_file()

    # Resume from checkpoint-4 in a fresh Trainer: the restored schedule continues identically.
    trainer2, data2, cb2 = _trainer(tiny_prepared, tmp_path / "a", steps=8)
    trainer2.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-4"))
    assert [r["step"] for r in cb2.history] == [3, 5, 7]
    assert cb2.history[0] == cb.history[0]  # restored, not recomputed
    for a, b in zip(cb2.history[1:], cb.history[1:]):
        np.testing.assert_allclose(list(a["losses"].values()), list(b["losses"].values()), rtol=1e-4)


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
    from velocitune.errors import ConfigError

    data = MixtureDataset(tiny_prepared, seq_len=32, global_batch=8, steps=5)
    with pytest.raises(ConfigError, match="must equal the dataset's global_batch 8"):
        trainer_args_for(data, per_device_batch=3, grad_accum=2)
