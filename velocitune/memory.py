"""Memory per device of a training run, estimated before it starts (pure arithmetic, no allocation).

`estimate_memory` adds up what one rank holds at the peak of a training step: parameters, gradients,
optimizer state, what the strategy adds (FSDP2's all-gathered blocks, DDP's gradient buckets), the
activations one micro-batch saves for backward, the chunked loss's logits buffer and a margin. It takes
the strategy, world size, dtypes and an offload flag as inputs, so other precision or offload settings
are accounted for by passing them. `Trainer` prints it before training and refuses to start when it
exceeds the device's memory (`check_fits`); `benchmarks/memory.py` compares it with measured peaks.

The activation formula (`block_activation_bytes`) counts the tensors a Llama-style decoder block saves
for backward, per token (N = micro_batch · seq_len tokens; H hidden, I MLP width, H_kv = n_kv_heads ·
head_dim; `a` bytes of the matmul outputs (2 under bf16 autocast, 4 in fp32), `r` bytes of the residual
stream (the parameters' compute dtype: fp32 params keep it fp32 under autocast)):

- two RMSNorms, each: its input upcast to fp32 and the normalised x before the weight → 2 · 4·H
  (when the residual stream is fp32 the upcast is the input itself: it is still held, by the norm);
- the linear layers' inputs: the attention-normed and MLP-normed x, cast to `a` → 2 · a·H;
- attention: q and k before rotary (the rotation's mul saves them), q and k after it and v (saved by the
  attention kernel), the kernel's output and its reshaped copy fed to o_proj → a·(4H + 3·H_kv);
  eager attention also keeps the softmax (B, heads, T, T) in fp32 and its cast to `a`;
- SwiGLU MLP: gate and up outputs, silu(gate), and silu(gate)·up fed to down_proj → 4 · a·I.

With per-block activation checkpointing a block keeps only its input (N, H) in `r` bytes; during backward
one block at a time is recomputed, so one block's internals (the formula above) come on top.
The sum is an upper bound for the first micro-batch of a step (gradients grow while activations are
freed) and close to exact for later ones (the gradients of the first are already there).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

GIB = 1024**3
MARGIN_FIXED = 256 * 1024**2  # allocator fragmentation, the optimizer step's and backward's temporaries
MARGIN_SHARE = 0.05  # ... and a share of everything else, for the allocator's rounding and caching
STRATEGIES = ("single", "ddp", "fsdp2")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder the estimate needs."""

    n_params: int  # distinct parameters (tied embeddings counted once)
    block_params: int  # parameters of one decoder block
    n_layers: int
    hidden: int
    intermediate: int
    n_heads: int
    n_kv_heads: int
    vocab: int

    @property
    def kv_hidden(self) -> int:
        """H_kv: the width of k and v (n_kv_heads · head_dim), smaller than H under grouped-query attention."""
        return self.n_kv_heads * (self.hidden // self.n_heads)

    @classmethod
    def from_model(cls, model, blocks: list) -> ModelShape:
        """From a Hugging Face causal LM (its config) and its decoder blocks (`dist.transformer_blocks`)."""
        from velocitune.model import num_params, unwrap_model

        config = unwrap_model(model).config
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        heads = config.num_attention_heads
        return cls(n_params=num_params(model), block_params=sum(p.numel() for p in blocks[0].parameters()) if blocks else 0,
                   n_layers=config.num_hidden_layers, hidden=config.hidden_size,
                   intermediate=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
                   n_heads=heads, n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   vocab=config.vocab_size)


def shape_from_config(config_path: str) -> ModelShape:
    """The shape of the model a Hugging Face `config.json` describes, built on the meta device: parameters are
    counted without allocating them, so an 8B model's estimate needs neither its weights nor its memory."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from velocitune.dist import transformer_blocks

    config = AutoConfig.from_pretrained(config_path, local_files_only=True)  # a local file; never the Hub
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return ModelShape.from_model(model, transformer_blocks(model))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device of each component; `total` is their sum."""

    params: int
    grads: int
    optimizer: int
    gathered: int  # FSDP2: the unsharded root and the blocks all-gathered at a time, with their unsharded gradients
    buckets: int  # DDP: the gradient buckets (a flat copy of every gradient)
    activations: int  # the decoder blocks' saved tensors and the final norm's, for one micro-batch
    logits: int  # the chunked loss: one (chunk, vocab) fp32 chunk of logits and its softmax/gradient
    margin: int

    @property
    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))

    def line(self, capacity: int | None = None, where: str = "") -> str:
        """'3.21 GiB (params 0.50, grads 0.50, optimizer 1.00, activations 1.10, ...) of 80.0 GiB free on cuda:0'."""
        parts = ", ".join(f"{f.name} {getattr(self, f.name) / GIB:.2f}" for f in fields(self) if getattr(self, f.name))
        tail = f" of {capacity / GIB:.1f} GiB{where}" if capacity is not None else ""
        return f"{self.total / GIB:.2f} GiB ({parts}){tail}"


def block_activation_bytes(tokens: int, micro_batch: int, seq_len: int, shape: ModelShape, act_bytes: int,
                           attn_implementation: str = "sdpa") -> int:
    """Bytes one decoder block saves for backward for `tokens` = micro_batch · seq_len tokens (module docstring)."""
    H, I, Hkv = shape.hidden, shape.intermediate, shape.kv_hidden
    norms = 2 * 4 * H * 2  # two RMSNorms × (fp32 input, fp32 normalised x), each (N, H)
    linear_inputs = 2 * act_bytes * H  # the normed x cast for q/k/v and for gate/up, (N, H) each
    attention = act_bytes * (4 * H + 3 * Hkv)  # q, k pre- and post-rotary, v, output and its reshaped copy
    mlp = 4 * act_bytes * I  # gate, up, silu(gate), silu(gate)·up: (N, I) each
    per_token = norms + linear_inputs + attention + mlp
    scores = 0
    if attn_implementation == "eager":  # the explicit softmax (B, heads, T, T): fp32, plus its cast when a < 4
        scores = micro_batch * shape.n_heads * seq_len * seq_len * (4 + (act_bytes if act_bytes != 4 else 0))
    return tokens * per_token + scores


def estimate_memory(
    shape: ModelShape,
    *,
    micro_batch: int,
    seq_len: int,
    loss_chunk_tokens: int,
    strategy: str = "single",
    world_size: int = 1,
    param_bytes: int = 4,
    grad_bytes: int | None = None,
    act_bytes: int = 4,
    gather_bytes: int | None = None,
    checkpointing: str = "off",
    attn_implementation: str = "sdpa",
    cpu_offload: bool = False,
    margin_fixed: int = MARGIN_FIXED,
) -> MemoryEstimate:
    """Bytes per device for one rank of a run (see the module docstring for the activation formula).

    strategy: single (one process, no wrapper) | ddp | fsdp2; world_size: processes in the group;
    param_bytes / grad_bytes: storage dtype sizes of parameters and their gradients (grad defaults to param);
    act_bytes: matmul outputs (2 under bf16 autocast or FSDP2 bf16 compute, 4 in fp32);
    gather_bytes: FSDP2's unsharded (compute) parameter dtype (a MixedPrecisionPolicy's param_dtype;
    default param_bytes); cpu_offload: FSDP2 keeps sharded parameters, gradients and optimizer state in host
    memory (only the gathered blocks and activations stay on the device).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if checkpointing not in ("off", "block"):
        raise ValueError(f"checkpointing must be 'off' or 'block', got {checkpointing!r}")
    grad_bytes = param_bytes if grad_bytes is None else grad_bytes
    gather_bytes = param_bytes if gather_bytes is None else gather_bytes
    P = shape.n_params
    fsdp = strategy == "fsdp2" and world_size > 1
    # FSDP2 shards every parameter (dim 0, padded to a multiple of the world size): ceil(P / W) per rank.
    local = math.ceil(P / world_size) if fsdp else P
    on_device = 0 if (fsdp and cpu_offload) else 1
    params = local * param_bytes * on_device
    grads = local * grad_bytes * on_device
    # AdamW: two moments in fp32 (8 B/param); parameters stored below fp32 also need an fp32 master copy (4 B).
    optimizer = local * (8 + (4 if param_bytes < 4 else 0)) * on_device
    gathered = 0
    if fsdp:
        # The root (embeddings, final norm, head: everything outside the blocks) stays unsharded from its forward
        # to its backward; two blocks are unsharded at a time (the running one and the prefetched next), and
        # backward holds one block's unsharded gradients until their reduce-scatter.
        root = P - shape.n_layers * shape.block_params
        gathered = root * gather_bytes + 2 * shape.block_params * gather_bytes + shape.block_params * grad_bytes
    # DDP (gradient_as_bucket_view off, torch's default and ours) copies every gradient into its flat buckets.
    buckets = P * grad_bytes if strategy == "ddp" and world_size > 1 else 0
    N = micro_batch * seq_len  # tokens per micro-batch
    r = gather_bytes if fsdp else param_bytes  # the residual stream runs in the parameters' compute dtype
    block = block_activation_bytes(N, micro_batch, seq_len, shape, act_bytes, attn_implementation)
    if checkpointing == "block":
        blocks = shape.n_layers * N * shape.hidden * r + block  # every block's input (N, H) + one recomputed block
    else:
        blocks = shape.n_layers * block
    # After the blocks: the final norm (fp32 input and normalised x) and its output, the hidden states the chunked
    # loss keeps (N, H); the loss's per-token log-sum-exp (N,) fp32.
    activations = blocks + N * shape.hidden * (2 * 4 + r) + N * 4
    # The chunked loss materialises one (C, V) chunk of fp32 logits and its softmax (backward: its gradient),
    # never (N, V); a micro-batch smaller than a chunk is one chunk of N.
    logits = 2 * min(N, loss_chunk_tokens) * shape.vocab * 4
    body = params + grads + optimizer + gathered + buckets + activations + logits
    return MemoryEstimate(params=params, grads=grads, optimizer=optimizer, gathered=gathered, buckets=buckets,
                          activations=activations, logits=logits, margin=margin_fixed + int(MARGIN_SHARE * body))


def device_capacity(device, local_world_size: int = 1) -> tuple[int, str]:
    """(bytes this rank may use, what they are) on `device`.

    CUDA: the free memory `torch.cuda.mem_get_info` reports now (other processes on the GPU count; the
    CUDA context is already taken). CPU: the host's available RAM (psutil) shared by the processes of
    this host, since torchrun's CPU ranks share one machine; available, not total, because a run that
    swaps is as good as stopped.
    """
    import torch

    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return free, f" free on {device} ({total / GIB:.1f} GiB total)"
    import psutil

    available = psutil.virtual_memory().available
    share = f" per process, {local_world_size} on this host" if local_world_size > 1 else ""
    return available // max(1, local_world_size), f" available RAM{share}"


def check_fits(estimate: MemoryEstimate, capacity: int, where: str, *, micro_batch: int, checkpointing: str,
               strategy: str, world_size: int) -> None:
    """ConfigError saying what to change when the estimate exceeds `capacity` bytes."""
    from velocitune.errors import ConfigError

    if estimate.total <= capacity:
        return
    hints = [f"lower train.micro_batch_size (now {micro_batch}; gradient accumulation keeps the global batch)"]
    if checkpointing == "off":
        hints.append("set train.activation_checkpointing=block")
    if strategy != "fsdp2" or world_size == 1:
        hints.append("shard parameters, gradients and optimizer state with dist.strategy=fsdp2 over several GPUs")
    else:
        hints.append("add GPUs (FSDP2 divides parameters, gradients and optimizer state by their number)")
    raise ConfigError(
        f"the estimated memory per device, {estimate.line()}, exceeds the {capacity / GIB:.1f} GiB{where}; "
        + "; or ".join(hints) + ". To start anyway, set train.memory_check=false"
    )
