"""Memory per device (velocitune.memory): components against hand computations, how checkpointing, FSDP2 and
the micro-batch move them, the printed line and the refusal; activation checkpointing and the attention
kernels against the plain run; `velocitune train --dry-run`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from velocitune.errors import ConfigError
from velocitune.memory import GIB, MARGIN_FIXED, ModelShape, check_fits, estimate_memory

# A Llama-like shape with round numbers: H=1024, I=2816, 16 heads of 64, 4 kv heads (H_kv=256), 8 layers.
SHAPE = ModelShape(n_params=100_000_000, block_params=10_000_000, n_layers=8, hidden=1024, intermediate=2816,
                   n_heads=16, n_kv_heads=4, vocab=32000)


def test_components_match_hand_computation():
    est = estimate_memory(SHAPE, micro_batch=2, seq_len=512, loss_chunk_tokens=512, act_bytes=2)
    assert est.params == 400_000_000  # 1e8 fp32 parameters
    assert est.grads == 400_000_000
    assert est.optimizer == 800_000_000  # two fp32 moments; fp32 params need no master copy
    assert est.gathered == est.buckets == 0  # one process: no wrapper
    N = 1024  # tokens of a micro-batch
    # Per token of a block: norms 2·2·4·1024 = 16384; linear inputs 2·2·1024 = 4096;
    # attention 2·(4·1024 + 3·256) = 9728; MLP 4·2·2816 = 22528 → 52736 bytes.
    block = N * 52736
    # 8 blocks + final norm (fp32 input, normalised, fp32 output kept for the head: 12 B·H) + lse (4 B) per token.
    assert est.activations == 8 * block + N * (12 * 1024 + 4)
    assert est.logits == 2 * 512 * 32000 * 4  # one chunk of 512 tokens: fp32 logits and softmax
    body = 1_600_000_000 + est.activations + est.logits
    assert est.margin == MARGIN_FIXED + int(0.05 * body)
    assert est.total == body + est.margin


def test_low_precision_params_add_a_master_copy_and_eager_keeps_the_scores():
    est = estimate_memory(SHAPE, micro_batch=1, seq_len=128, loss_chunk_tokens=4096, param_bytes=2, act_bytes=2)
    assert est.params == est.grads == 200_000_000
    assert est.optimizer == 1_200_000_000  # fp32 master 4 B + two fp32 moments 8 B
    sdpa = estimate_memory(SHAPE, micro_batch=2, seq_len=128, loss_chunk_tokens=4096, act_bytes=2)
    eager = estimate_memory(SHAPE, micro_batch=2, seq_len=128, loss_chunk_tokens=4096, act_bytes=2,
                            attn_implementation="eager")
    # 8 layers × (B=2 · 16 heads · 128² scores) × (fp32 softmax 4 B + its bf16 cast 2 B)
    assert eager.activations - sdpa.activations == 8 * 2 * 16 * 128 * 128 * 6


def test_checkpointing_keeps_block_inputs_and_one_block():
    kw = dict(micro_batch=4, seq_len=1024, loss_chunk_tokens=2048, act_bytes=2)
    off = estimate_memory(SHAPE, **kw)
    on = estimate_memory(SHAPE, checkpointing="block", **kw)
    N, block, tail = 4096, 4096 * 52736, 4096 * (12 * 1024 + 4)
    assert off.activations == 8 * block + tail
    assert on.activations == 8 * N * 1024 * 4 + block + tail  # fp32 block inputs + one recomputed block
    assert on.activations < off.activations / 3
    assert (on.params, on.grads, on.optimizer, on.logits) == (off.params, off.grads, off.optimizer, off.logits)


def test_fsdp2_divides_states_by_world_size_and_adds_gathered_blocks():
    kw = dict(micro_batch=1, seq_len=256, loss_chunk_tokens=2048, act_bytes=2)
    one = estimate_memory(SHAPE, **kw)
    fsdp = estimate_memory(SHAPE, strategy="fsdp2", world_size=8, gather_bytes=2, **kw)
    assert fsdp.params == one.params // 8 and fsdp.grads == one.grads // 8 and fsdp.optimizer == one.optimizer // 8
    # root (1e8 - 8·1e7 = 2e7 params) and two blocks in bf16, one block's fp32 gradients
    assert fsdp.gathered == 20_000_000 * 2 + 2 * 10_000_000 * 2 + 10_000_000 * 4
    offload = estimate_memory(SHAPE, strategy="fsdp2", world_size=8, gather_bytes=2, cpu_offload=True, **kw)
    assert offload.params == offload.grads == offload.optimizer == 0 and offload.gathered == fsdp.gathered
    ddp = estimate_memory(SHAPE, strategy="ddp", world_size=8, **kw)
    assert (ddp.params, ddp.buckets) == (one.params, 400_000_000)  # buckets: a flat fp32 copy of every gradient


def test_monotonic_in_micro_batch():
    totals = [estimate_memory(SHAPE, micro_batch=b, seq_len=512, loss_chunk_tokens=2048).total for b in (1, 2, 4, 8, 16)]
    assert all(a < b for a, b in zip(totals, totals[1:]))


def test_refusal_says_what_to_change():
    est = estimate_memory(SHAPE, micro_batch=8, seq_len=2048, loss_chunk_tokens=2048, act_bytes=2)
    check_fits(est, est.total, " free on cuda:0", micro_batch=8, checkpointing="off", strategy="single", world_size=1)
    with pytest.raises(ConfigError) as e:
        check_fits(est, 8 * GIB, " free on cuda:0 (80.0 GiB total)", micro_batch=8, checkpointing="off",
                   strategy="single", world_size=1)
    msg = str(e.value)
    assert msg.startswith(f"the estimated memory per device, {est.total / GIB:.2f} GiB (params 0.37, grads 0.37, ")
    assert "exceeds the 8.0 GiB free on cuda:0 (80.0 GiB total); lower train.micro_batch_size (now 8;" in msg
    assert "set train.activation_checkpointing=block" in msg and "dist.strategy=fsdp2" in msg
    assert msg.endswith("To start anyway, set train.memory_check=false")


def test_shape_from_a_built_model():
    from velocitune.dist import transformer_blocks
    from velocitune.model import build_model, num_params

    model = build_model(384, 32, 2, 2, 64, n_kv_heads=1)
    shape = ModelShape.from_model(model, transformer_blocks(model))
    # a block: q 32·32, k and v 32·16 each, o 32·32, gate/up/down 3·32·64, two norms 2·32
    assert shape.block_params == 1024 + 2 * 512 + 1024 + 3 * 2048 + 64
    assert (shape.n_layers, shape.hidden, shape.intermediate, shape.kv_hidden, shape.vocab) == (2, 32, 64, 16, 384)
    assert shape.n_params == num_params(model)


# ------------------------------------------------------------------------ checkpointing and attention kernels


def _one_step(make_config, name, attn="sdpa", **train):
    """Loss and gradients of the first step of a tiny run's Trainer (no training loop)."""
    from velocitune.dist import DistEnv
    from velocitune.train import Trainer

    cfg = make_config(name, train=train, model={"attn_implementation": attn})
    trainer = Trainer(cfg, DistEnv())
    plan = trainer.state.mixing.plan(0)
    loss = trainer._forward_backward(plan)
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters()}
    return trainer, float(loss), grads


def test_block_checkpointing_gives_identical_gradients(make_config):
    """Recompute runs the same CPU kernels on the same inputs in the same order, so the gradients are bitwise
    equal (not just close); two micro-batches check it across gradient accumulation too."""
    plain_t, plain_loss, plain = _one_step(make_config, "plain", micro_batch_size=4)
    ck_t, ck_loss, ck = _one_step(make_config, "ck", micro_batch_size=4, activation_checkpointing="block")
    assert getattr(ck_t.net.model.layers[0], "_velocitune_checkpointed", False)
    assert ck_loss == plain_loss
    assert plain.keys() == ck.keys() and all(torch.equal(plain[n], ck[n]) for n in plain)
    assert any(float(g.abs().sum()) > 0 for g in ck.values())
    # the parameter names (checkpoints, save_pretrained) are unchanged
    assert [n for n, _ in ck_t.model.named_parameters()] == [n for n, _ in plain_t.model.named_parameters()]


def test_short_run_with_checkpointing(make_config):
    from velocitune.train import train

    base = train(make_config("base", train={"steps": 8}, checkpoint={"interval": 4}))
    ck = train(make_config("ck", train={"steps": 8, "activation_checkpointing": "block"}, checkpoint={"interval": 4}))
    assert ck.final_val_loss == pytest.approx(base.final_val_loss, rel=1e-5)
    assert (ck.out_dir / "final" / "config.json").is_file()


def test_eager_and_sdpa_give_the_same_losses(make_config):
    _, sdpa_loss, sdpa = _one_step(make_config, "sdpa", attn="sdpa")
    eager_t, eager_loss, eager = _one_step(make_config, "eager", attn="eager")
    assert eager_t.model.config._attn_implementation == "eager"
    assert eager_loss == pytest.approx(sdpa_loss, rel=1e-5)
    assert all(torch.allclose(eager[n], sdpa[n], atol=1e-6, rtol=1e-4) for n in sdpa)


def test_flash_attention_without_the_package_or_cuda_is_refused(monkeypatch):
    import importlib.util

    from velocitune import model as M

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flash_attn" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^model.attn_implementation is 'flash_attention_2' but the flash_attn "
                                          r"package is not installed; install it \(`pip install flash-attn`, CUDA only\)"):
        M.check_attn_implementation("flash_attention_2", torch.device("cpu"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else real(name, *a))
    with pytest.raises(ConfigError, match=r"^model.attn_implementation is 'flash_attention_2' but training runs on cpu "
                                          r"\(flash-attention needs a CUDA GPU\); use model.attn_implementation=sdpa"):
        M.check_attn_implementation("flash_attention_2", torch.device("cpu"))
    M.check_attn_implementation("eager", torch.device("cpu"))


# ------------------------------------------------------------------------ the printed line, the refusal, dry run


def test_memory_line_printed_and_refusal(make_config, capsys, monkeypatch):
    from velocitune import memory
    from velocitune.train import train

    train(make_config("ok", train={"steps": 2}, mixing={"rule": "static"}, checkpoint={"interval": 0}))
    printed = capsys.readouterr().out
    line = next(x for x in printed.splitlines() if x.startswith("estimated memory per device: "))
    assert " GiB available RAM; micro-batch 8 x 32 tok, activation_checkpointing=off, attn=sdpa" in line
    assert "(params 0.00, grads 0.00, optimizer 0.00, activations 0.00, logits 0.00, margin 0.25)" in line
    monkeypatch.setattr(memory, "device_capacity", lambda device, n=1: (10 * 1024**2, " available RAM"))
    monkeypatch.setattr("velocitune.engine.device_capacity", memory.device_capacity)
    cfg = make_config("refused", train={"steps": 2}, mixing={"rule": "static"})
    with pytest.raises(ConfigError, match=r"exceeds the 0.0 GiB available RAM; lower train.micro_batch_size \(now 8"):
        train(cfg)
    assert not Path(cfg.run.out_dir).exists()  # refused at set-up, before the run directory is made
    train(make_config("forced", train={"steps": 1, "memory_check": False}, mixing={"rule": "static"},
                      checkpoint={"interval": 0}))
    assert "(train.memory_check=false: not enforced)" in capsys.readouterr().out


def _cli(args):
    return subprocess.run([sys.executable, "-m", "velocitune", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def _write_config(make_config, tmp_path, name, **sections):
    from velocitune.config import dump_yaml

    cfg = make_config(name, **sections)
    path = tmp_path / f"{name}.yaml"
    path.write_text(dump_yaml(cfg))
    return cfg, path


def test_dry_run_prints_the_plan_and_writes_nothing(make_config, tmp_path):
    cfg, path = _write_config(make_config, tmp_path, "dry", train={"activation_checkpointing": "block"})
    r = _cli(["train", str(path), "--dry-run"])
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "steps 24 x 8 seq x 32 tok = 6,144 tokens" in out
    assert "estimated memory per device: " in out and "activation_checkpointing=block" in out
    # velocitune's eval signal: 3 domains x 256 val tokens / (3 x 4 steps x 256 tokens per step) = 25.0 %
    assert "estimated reweighting overhead: 25.0% (signal=eval; by FLOPs" in out
    assert f"dry run: nothing trained or written; run.out_dir {cfg.run.out_dir} is free" in out
    assert not Path(cfg.run.out_dir).exists()


def test_dry_run_errors_are_the_usual_one_line(make_config, tmp_path):
    _, path = _write_config(make_config, tmp_path, "bad_data", data={"path": str(tmp_path / "nowhere")})
    r = _cli(["train", str(path), "--dry-run"])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1
    assert "nowhere" in r.stderr and not (tmp_path / "bad_data").exists()
    r = _cli(["train", str(path), "--dry-run", "--train.activation_checkpointing=layer"])
    assert r.returncode == 2
    assert r.stderr.strip() == ("error: config key 'train.activation_checkpointing' is 'layer'; allowed: off, block.")
