"""The model side of a training run, built once at set-up: the model, its wrapping, the optimizer, autocast.

`build_engine` seeds the RNGs, loads or builds the model (and the tokenizer final/ ships with), applies
activation checkpointing, checks the memory estimate against the device before the model takes any device
memory, checks once that the chunked loss equals the model's own logits, compiles on request, wraps the
model for DDP/FSDP2 (velocitune/dist.py) and makes AdamW. The training loop (velocitune/train.py) only
uses what this returns.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from velocitune import dist
from velocitune.config import Config
from velocitune.errors import ConfigError
from velocitune.layout import Layout
from velocitune.losses import check_loss_path, liger_nll_sum, loss_path
from velocitune.memory import MemoryEstimate, ModelShape, check_fits, device_capacity, estimate_memory
from velocitune.model import check_attn_implementation, checkpoint_blocks, load_tokenizer, make_model
from velocitune.shards import PreparedData


@dataclass
class Engine:
    """model: the bare model (save_pretrained, parameters); net: the same model wrapped for the forward
    passes (DDP/FSDP2, or itself); autocast: a context factory (bf16 on CUDA, else a no-op); fused: the
    Liger loss kernel, or None for the chunked head; memory: the estimate per device, and the device's
    capacity with where it comes from (for the printed line)."""

    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    autocast: Callable[[], contextlib.AbstractContextManager]
    fused: Any
    tokenizer: Any
    memory: MemoryEstimate
    capacity: int
    capacity_where: str


def build_engine(cfg: Config, env: dist.DistEnv, data: PreparedData, layout: Layout,
                 first_window: np.ndarray) -> Engine:
    """Seeds, the model (and tokenizer), autocast, wrapping and the optimizer; `first_window` (1, L) token ids
    check the chunked loss against the model's own logits."""
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed % 2**32)
    device = env.device
    check_attn_implementation(cfg.model.attn_implementation, device)
    if cfg.train.loss_kernel == "liger" and device.type != "cuda":
        raise ConfigError(f"train.loss_kernel=liger runs Liger Kernel's Triton kernels, on CUDA only; this run is "
                          f"on {device}: use train.loss_kernel=chunked (the same losses, any device)")
    model = make_model(cfg, data)
    blocks = dist.transformer_blocks(model)
    if cfg.train.activation_checkpointing == "block":
        checkpoint_blocks(blocks)
    bf16 = device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
    memory, capacity, where = check_memory(cfg, env, layout, model, blocks, bf16)  # before any device memory
    tok_dir = cfg.model.tokenizer or cfg.model.path or data.manifest["tokenizer"].get("name_or_path")
    tokenizer = None
    if cfg.model.tokenizer or (tok_dir and Path(tok_dir).is_dir()):
        tokenizer = load_tokenizer(tok_dir)  # a model.tokenizer that does not exist is an error, not skipped
    model.to(device)
    model.train()  # load_model returns eval mode
    # Once, before any step: the chunked loss must equal the model's own logits (catches unknown heads).
    check_loss_path(model, torch.from_numpy(first_window).to(device))
    # train.loss_kernel=liger: the fused kernel in place of the chunked head (None: the chunked path).
    fused = liger_nll_sum(loss_path(model).softcap) if cfg.train.loss_kernel == "liger" else None
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    if cfg.train.compile:
        # Compile the decoder in place: the chunked loss calls it directly and runs the head itself.
        getattr(model, "base_model", model).compile()
    offload = env.distributed and cfg.dist.fsdp_cpu_offload
    net = dist.wrap_model(model, cfg.dist.strategy, env, bf16, cpu_offload=offload)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    t = cfg.train
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        # The fused kernel needs device parameters; offloaded shards live on the host.
        lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda" and not offload,
    )
    return Engine(model, net, optimizer, autocast, fused, tokenizer, memory, capacity, where)


def check_memory(cfg: Config, env: dist.DistEnv, lay: Layout, model: torch.nn.Module, blocks: list[torch.nn.Module],
                 bf16: bool) -> tuple[MemoryEstimate, int, str]:
    """The memory estimate per device and the device's capacity; ConfigError when the estimate exceeds it."""
    strategy = cfg.dist.strategy if env.distributed else "single"
    param_bytes = next(model.parameters()).element_size()
    memory = estimate_memory(
        ModelShape.from_model(model, blocks), micro_batch=lay.micro, seq_len=lay.seq_len,
        loss_chunk_tokens=cfg.train.loss_chunk_tokens, strategy=strategy, world_size=env.world_size,
        param_bytes=param_bytes, act_bytes=2 if bf16 else param_bytes,
        gather_bytes=2 if bf16 and strategy == "fsdp2" else None,  # dist.wrap_model's MixedPrecisionPolicy
        checkpointing=cfg.train.activation_checkpointing, attn_implementation=cfg.model.attn_implementation,
        cpu_offload=strategy == "fsdp2" and cfg.dist.fsdp_cpu_offload,
    )
    capacity, where = device_capacity(env.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if cfg.train.memory_check:
        check_fits(memory, capacity, where, micro_batch=lay.micro, checkpointing=cfg.train.activation_checkpointing,
                   strategy=strategy, world_size=env.world_size)
    return memory, capacity, where
