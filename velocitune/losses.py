"""Per-token and per-domain next-token loss, computed without materialising full fp32 logits.

The training loop needs, for every micro-batch, (a) the token-mean loss to backpropagate and
(b) each domain's NLL sum and token count for the mixing signal (docs/design.md §3 "train" signal). The
output head of a language model turns `N` hidden states into `N × V` logits; for `N = 8k` tokens and
`V = 50k` that is 1.6 GB in fp32 *per copy*, and autograd keeps several copies. Here the head runs
chunk by chunk, and backward recomputes each chunk's logits from the saved hidden states, so peak
memory scales with `chunk_tokens × V` instead of `N × V` (docs/design.md §6 rule 6). Per-domain sums stay on
the device (`index_add_` into float64 accumulators); nothing here calls `.item()` or otherwise
waits for the device.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from velocitune.errors import ConfigError, TrainingError
from velocitune.model import unwrap_chain, unwrap_model

IGNORE_INDEX = -100


class LossOutput(NamedTuple):
    """What one micro-batch's forward pass yields."""

    loss: Tensor  # scalar, token-mean NLL over the micro-batch's valid tokens, differentiable
    nll_sum: Tensor  # (k,) float64, detached: summed token NLL per domain
    count: Tensor  # (k,) float64: number of valid (non-ignored) tokens per domain


def _apply_softcap(z: Tensor, softcap: float | None) -> Tensor:
    # Gemma-2/3 style final logit soft-capping: cap · tanh(z / cap).
    return z if softcap is None else torch.tanh(z / softcap) * softcap


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    # Under autocast the head matmul runs in the autocast dtype; otherwise in the inputs' dtype.
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


class _ChunkedLinearNLL(torch.autograd.Function):
    """Per-token NLL of `softcap(hidden @ weightᵀ + bias)`, chunk by chunk, recomputing in backward.

    Saved for backward: hidden (N, H), weight (V, H), bias, labels (N,) and the per-token
    log-sum-exp (N,) fp32 — never a (N, V) tensor. Backward recomputes one chunk's logits at a time,
    turns them into the softmax in place and folds them into the input and weight gradients, so its
    extra memory is one (chunk, V) fp32 buffer (two with soft-capping). The matmuls run in an
    explicit compute dtype, the same in forward and backward, so the recomputed logits match the
    saved log-sum-exp bit for bit.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        chunk_tokens: int,
        softcap: float | None,
        ignore_index: int,
        grad_enabled: bool,
    ) -> Tensor:
        n = hidden.shape[0]
        dtype = _compute_dtype(hidden, weight)
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        valid = labels != ignore_index  # (N,) bool
        # Ignored positions gather at class 0 and are zeroed afterwards: no data-dependent branch.
        safe_labels = torch.where(valid, labels, torch.zeros_like(labels))  # (N,)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,)
        nll = torch.empty(n, dtype=torch.float32, device=hidden.device)  # (N,)
        probs = None  # (N, V) softmax, kept only when everything fits in one chunk (no recompute then)
        for start in range(0, n, chunk_tokens):
            end = min(start + chunk_tokens, n)
            z = _apply_softcap(F.linear(hidden[start:end].to(dtype), w, b).float(), softcap)  # (C, V)
            picked = z.gather(1, safe_labels[start:end, None]).squeeze(1)  # (C,) logit of each label
            # Log-sum-exp in z's own buffer: torch.logsumexp allocates a second (C, V) temporary, which
            # on CPU is a fresh mmap page-faulted in on every call (a fifth of an evaluation forward).
            zmax = z.amax(dim=-1, keepdim=True)  # (C, 1)
            zmax = torch.where(zmax.abs() == math.inf, torch.zeros_like(zmax), zmax)
            e = z.sub_(zmax).exp_()  # (C, V) exp(z - max), in place of z
            sumexp = e.sum(dim=-1)  # (C,)
            lse[start:end] = sumexp.log().add_(zmax.squeeze(1))
            nll[start:end] = lse[start:end] - picked
            if n <= chunk_tokens and softcap is None and grad_enabled:
                probs = e.div_(sumexp[:, None])  # the softmax, still in z's buffer: no recompute in backward
            del z, e
        nll = torch.where(valid, nll, torch.zeros_like(nll))
        ctx.save_for_backward(hidden, weight, bias, safe_labels, valid, lse, probs)
        ctx.chunk_tokens = chunk_tokens
        ctx.softcap = softcap
        ctx.dtype = dtype
        return nll

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_nll: Tensor):  # type: ignore[override]
        hidden, weight, bias, safe_labels, valid, lse, probs = ctx.saved_tensors
        softcap: float | None = ctx.softcap
        dtype: torch.dtype = ctx.dtype
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, chunk = hidden.shape[0], ctx.chunk_tokens
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        # d nll_t / d z_t = softmax(z_t) - onehot(label_t), times the incoming gradient; ignored
        # tokens are the constant 0, so their scale is 0.
        scale = torch.where(valid, grad_nll.float(), torch.zeros_like(lse))  # (N,)
        grad_h = torch.empty_like(hidden) if need_h else None
        # The head gradient is accumulated over chunks in fp32 even for bf16 weights (one rounding).
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            h = hidden[start:end].to(dtype)  # (C, H)
            if probs is not None:  # single chunk: forward kept the softmax, nothing to recompute
                z, tanh, g = None, None, probs
            else:
                z = F.linear(h, w, b).float()  # (C, V) pre-cap logits
                if softcap is None:
                    tanh, g = None, z
                else:
                    tanh = z.div_(softcap).tanh_()  # (C, V), reuses z's buffer
                    g = tanh * softcap  # capped logits
                g.sub_(lse[start:end, None]).exp_()  # softmax, in place
            minus_one = torch.full((end - start, 1), -1.0, device=g.device)
            g.scatter_add_(1, safe_labels[start:end, None], minus_one)  # - onehot(label)
            g.mul_(scale[start:end, None])
            if tanh is not None:
                g.mul_(tanh.square_().neg_().add_(1.0))  # through cap·tanh(z/cap): d/dz = 1 - tanh²
            del z, tanh
            g = g.to(dtype)  # (C, V) gradient w.r.t. the pre-cap logits
            if grad_h is not None:
                grad_h[start:end] = g @ w
            if grad_w is not None:
                grad_w.add_(g.t() @ h)
            if grad_b is not None:
                grad_b.add_(g.sum(0))
            del g
        return (
            grad_h,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
            None,
            None,
        )


def _module_chunk_nll(
    head: nn.Module, hidden: Tensor, labels: Tensor, softcap: float | None, ignore_index: int
) -> Tensor:
    # (C, H) -> (C,) fp32; used for heads that are not a plain linear map.
    z = _apply_softcap(head(hidden).float(), softcap)  # (C, V)
    return F.cross_entropy(z, labels, reduction="none", ignore_index=ignore_index)


def chunked_token_nll(
    hidden: Tensor,
    head: nn.Module | Tensor,
    labels: Tensor,
    chunk_tokens: int = 2048,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
) -> Tensor:
    """Per-token next-token NLL in nats, (N,) float32, without keeping any (N, V) tensor.

    hidden: (N, H) final hidden states; labels: (N,) target ids (`ignore_index` → NLL 0).
    head: an `nn.Linear` (bias allowed; tied or not), a (V, H) weight tensor, or any module mapping
    (C, H) → (C, V). Linear heads use a fused chunked autograd function; other modules run each chunk
    under `torch.utils.checkpoint` so their logits are recomputed in backward. Logits are cast to
    fp32 before the softmax, like Hugging Face's loss. `softcap` applies `cap·tanh(z/cap)` to the
    logits (Gemma-2/3 `final_logit_softcapping`).
    """
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(f"hidden must be (N, H) and labels (N,); got {tuple(hidden.shape)} and {tuple(labels.shape)}")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if isinstance(head, Tensor):
        weight, bias = head, None
    elif type(head) is nn.Linear:
        weight, bias = head.weight, head.bias
    else:
        weight = bias = None
    if weight is not None:
        # Grad mode is off inside Function.forward, so the caller's mode travels as an argument.
        return _ChunkedLinearNLL.apply(hidden, weight, bias, labels, chunk_tokens, softcap, ignore_index,
                                       torch.is_grad_enabled())

    needs_graph = torch.is_grad_enabled() and (
        hidden.requires_grad or any(p.requires_grad for p in head.parameters())
    )
    pieces = []
    for start in range(0, hidden.shape[0], chunk_tokens):
        h, y = hidden[start : start + chunk_tokens], labels[start : start + chunk_tokens]
        if needs_graph:
            pieces.append(
                checkpoint(_module_chunk_nll, head, h, y, softcap, ignore_index, use_reentrant=False)
            )
        else:
            pieces.append(_module_chunk_nll(head, h, y, softcap, ignore_index))
    return torch.cat(pieces)


def domain_sums(
    nll: Tensor, token_domain: Tensor, k: int, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Per-domain NLL sums and token counts, (k,) float64 each, accumulated on nll's device.

    nll: (N,) per-token NLL (detached here: these are statistics, not a loss);
    token_domain: (N,) int64 domain index of each token, in [0, k) (not checked: checking would
    sync with the device); valid: (N,) bool, False for tokens that must not count.
    """
    values = nll.detach().to(torch.float64)  # (N,)
    ones = torch.ones_like(values)
    if valid is not None:
        values = torch.where(valid, values, torch.zeros_like(values))
        ones = valid.to(torch.float64)
    sums = torch.zeros(k, dtype=torch.float64, device=nll.device).index_add_(0, token_domain, values)
    counts = torch.zeros(k, dtype=torch.float64, device=nll.device).index_add_(0, token_domain, ones)
    return sums, counts


def token_nll(model: nn.Module, input_ids: Tensor, labels: Tensor, chunk_tokens: int = 2048) -> Tensor:
    """Per-token NLL (B·T,) float32 of a causal LM on (B, T) inputs and already-shifted labels.

    The final hidden states come from the model's decoder (see `loss_path` below) and
    go through the output head chunk by chunk; a model with no decoder or head to find falls back,
    with a one-time warning, to its full logits.
    """
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids and labels must both be (B, T); got {tuple(input_ids.shape)} and {tuple(labels.shape)}"
        )
    b, t = input_ids.shape
    flat_labels = labels.reshape(-1)  # (B·T,)
    path = loss_path(model)
    if path.head is None:
        logits = model(input_ids=input_ids).logits  # (B, T, V): the documented fallback
        return F.cross_entropy(
            logits.float().reshape(b * t, -1), flat_labels, reduction="none", ignore_index=IGNORE_INDEX
        )
    hidden = final_hidden_states(path, input_ids)  # (B, T, H)
    return chunked_token_nll(
        hidden.reshape(b * t, -1), path.head, flat_labels, chunk_tokens, IGNORE_INDEX, path.softcap
    )


def forward_losses(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    seq_domain: Tensor,
    k: int,
    chunk_tokens: int = 2048,
) -> LossOutput:
    """One micro-batch's loss for backward plus its per-domain NLL sums and token counts.

    input_ids, labels: (B, T) int64, labels already shifted (labels[b, t] is the target for
    input_ids[b, t]), -100 = ignore; seq_domain: (B,) int64 domain of each sequence, in [0, k).
    `loss` is the mean NLL over the micro-batch's valid tokens (0 when none is valid, where Hugging
    Face would give NaN). No host sync.
    """
    b, t = input_ids.shape
    if seq_domain.shape != (b,):
        raise ValueError(f"seq_domain must be (B,) = ({b},); got {tuple(seq_domain.shape)}")
    nll = token_nll(model, input_ids, labels, chunk_tokens)  # (B·T,)
    valid = labels.reshape(-1) != IGNORE_INDEX  # (B·T,)
    token_domain = seq_domain.reshape(b, 1).expand(b, t).reshape(-1)  # (B·T,)
    nll_sum, count = domain_sums(nll, token_domain, k, valid)
    loss = nll.sum() / valid.sum().clamp(min=1)
    return LossOutput(loss=loss, nll_sum=nll_sum, count=count)


# A fused linear cross-entropy: (hidden (n, H), weight (V, H), labels (n,), bias | None) -> the summed NLL of
# the valid labels, a differentiable scalar (Liger Kernel's on CUDA; `chunked_nll_sum` anywhere).
FusedNLLSum = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]


def chunked_nll_sum(chunk_tokens: int = 2048, softcap: float | None = None) -> FusedNLLSum:
    """The chunked path as a FusedNLLSum: the reference the fused kernel is checked against."""
    def nll_sum(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None) -> Tensor:
        return _ChunkedLinearNLL.apply(hidden, weight, bias, labels, chunk_tokens, softcap, IGNORE_INDEX,
                                       torch.is_grad_enabled()).sum()
    return nll_sum


def liger_nll_sum(softcap: float | None = None) -> FusedNLLSum:
    """Liger Kernel's fused linear cross-entropy (Triton, CUDA) as a FusedNLLSum: logits are computed and
    consumed chunk by chunk inside the kernel, and the gradients are formed in the forward pass."""
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        raise ConfigError("train.loss_kernel=liger needs the liger-kernel package (pip install liger-kernel, "
                          "CUDA only); the default train.loss_kernel=chunked runs anywhere") from None
    kwargs = {"ignore_index": IGNORE_INDEX, "reduction": "sum"}
    if softcap is not None:
        kwargs["softcap"] = softcap
    loss_fn = LigerFusedLinearCrossEntropyLoss(**kwargs)

    def nll_sum(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None) -> Tensor:
        out = loss_fn(weight, hidden, labels, bias)
        return out[0] if isinstance(out, tuple) else out  # (loss, z_loss) when a version returns both
    return nll_sum


def fused_forward_losses(model: nn.Module, input_ids: Tensor, labels: Tensor, seq_domain: Tensor,
                         seq_domain_host: np.ndarray, k: int, fused: FusedNLLSum) -> LossOutput:
    """forward_losses with a fused linear cross-entropy, which gives sums rather than per-token NLL.

    Every sequence belongs to one domain, so the fused kernel runs once per domain present, on that domain's
    tokens: its sum is the domain's NLL sum, and the loss is their total over the valid tokens. The rows of
    each domain come from the plan on the host (`seq_domain_host`, (B,)), so choosing them never waits for
    the device. Heads other than a plain linear map (or soft-capped logits the kernel does not support)
    are the caller's to route to `forward_losses`.
    """
    b, t = input_ids.shape
    path = loss_path(model)
    if path.head is None or type(path.head) is not nn.Linear:
        raise TrainingError("train.loss_kernel=liger needs a plain linear output head; this model's is not one: "
                            "use train.loss_kernel=chunked")
    hidden = final_hidden_states(path, input_ids).reshape(b * t, -1)  # (B·T, H)
    flat = labels.reshape(-1)  # (B·T,)
    valid = flat != IGNORE_INDEX
    token_domain = seq_domain.reshape(b, 1).expand(b, t).reshape(-1)  # (B·T,)
    count = torch.zeros(k, dtype=torch.float64, device=hidden.device).index_add_(0, token_domain, valid.double())
    sums: list[Tensor] = []
    nll_sum = torch.zeros(k, dtype=torch.float64, device=hidden.device)
    positions = np.arange(t)
    for d in np.unique(seq_domain_host):
        rows = np.flatnonzero(seq_domain_host == d)
        idx = torch.from_numpy((rows[:, None] * t + positions).reshape(-1))  # (n_d·T,) token positions of domain d
        if hidden.device.type == "cuda":
            idx = idx.pin_memory()  # so that the copy is truly asynchronous, as assemble() does for the batch
        idx = idx.to(hidden.device, non_blocking=True)
        s_d = fused(hidden.index_select(0, idx), path.head.weight, flat.index_select(0, idx), path.head.bias)
        sums.append(s_d)
        nll_sum[int(d)] = s_d.detach().double()
    loss = torch.stack(sums).sum() / valid.sum().clamp(min=1)
    return LossOutput(loss=loss, nll_sum=nll_sum, count=count)


def check_loss_path(model: nn.Module, input_ids: Tensor, atol: float | None = None) -> float:
    """Check, once before training, that the chunked loss equals the model's own logits path.

    Runs both on `input_ids` (B, T) (predicting each next token; the last position is ignored)
    without gradients and returns the largest absolute per-token NLL difference in nats; raises
    TrainingError when it exceeds `atol` (a head transform velocitune does not model). `atol`
    defaults to 1e-3 nats for fp32 heads and 0.05 for lower precision, where the two paths' matmuls
    round differently. It host-syncs and runs the full logits: call it at setup, not per step.
    """
    inner = unwrap_model(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if atol is None:
        fp32 = head is None or getattr(head, "weight", torch.empty(0)).dtype == torch.float32
        atol = 1e-3 if fp32 else 0.05
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = input_ids[:, 1:]
    with torch.no_grad():
        ours = token_nll(model, input_ids, labels)  # (B·T,)
        logits = model(input_ids=input_ids).logits.float()  # (B, T, V)
        ref = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX
        )
    diff = float((ours - ref).abs().max())
    if not math.isfinite(diff) or diff > atol:
        raise TrainingError(
            f"the chunked loss of {type(inner).__name__} differs from the model's own logits by up to {diff:.3g} "
            f"nats per token (tolerance {atol}): its output head applies a transform velocitune does not model. "
            "Train a model whose head is a plain linear map (optionally soft-capped), or report the model class."
        )
    return diff


# ---------------------------------------------------------------------------------------------
# Finding the decoder and head of a (wrapped) Hugging Face model, for the chunked loss

# Config attributes of head transforms the chunked loss does not reproduce (Cohere's logit_scale,
# Granite's logits_scaling): such models use the full-logits fallback.
_UNSUPPORTED_HEAD_TRANSFORMS = ("logit_scale", "logits_scaling")

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


@dataclass(frozen=True)
class LossPath:
    """How to get a model's final hidden states and which head turns them into logits.

    decoder: the module returning the final (normed) hidden states as its first output, or None;
    head: the output projection, or None when the loss must fall back to the model's full logits;
    softcap: final logit soft-capping (Gemma-2/3), or None;
    call_target: a wrapper (DDP, FSDP) whose forward must run so that its gradient sync or
    unsharding happens; the decoder's output is then captured with a forward hook;
    keep_kwargs: forward arguments asking that call for one position of logits instead of T
    (`logits_to_keep=1`), when the model supports it.
    """

    decoder: nn.Module | None
    head: nn.Module | None
    softcap: float | None
    call_target: nn.Module | None
    keep_kwargs: dict


@functools.cache
def _logits_to_keep_kwargs(model_type: type) -> tuple[tuple[str, int], ...]:
    # Ask the model for 1 position of logits instead of T, when its forward supports it.
    params = inspect.signature(model_type.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            return ((name, 1),)
    return ()


def loss_path(model: nn.Module) -> LossPath:
    """Find the decoder and output head of a (possibly wrapped) Hugging Face causal LM.

    The decoder is the model's `base_model` (`model.model` for Llama/Qwen2/Mistral/Gemma,
    `model.transformer` for GPT-2); the head is `get_output_embeddings()`. A torch.compile wrapper
    around the whole model is bypassed (the decoder then runs eagerly; compile the decoder in place
    instead, e.g. `model.model.compile()`). When no decoder or head is found, or the head applies
    a transform the chunked loss does not reproduce, `head` is None and a warning says, once, that
    full logits are used.
    """
    inner, call_target, compiled = unwrap_chain(model)
    name = type(inner).__name__
    if compiled:
        _warn_once(
            f"compiled:{name}",
            f"forward_losses bypasses the torch.compile wrapper around {name} and runs its decoder eagerly; "
            "to compile, compile the decoder in place (e.g. model.model.compile()) instead of the whole model.",
        )
    config = getattr(inner, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    base = getattr(inner, "base_model", inner)
    decoder = base if base is not inner else None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    unsupported = [a for a in _UNSUPPORTED_HEAD_TRANSFORMS if getattr(config, a, None) not in (None, 1, 1.0)]
    if decoder is None or head is None or unsupported:
        reason = f"its head applies {unsupported[0]}" if unsupported else "no decoder/output head was found"
        _warn_once(
            f"fallback:{name}",
            f"forward_losses computes the full (B, T, V) logits of {name} ({reason}); memory grows with "
            "the vocabulary size.",
        )
        return LossPath(None, None, None, call_target, {})
    softcap = getattr(config, "final_logit_softcapping", None)
    keep = dict(_logits_to_keep_kwargs(type(inner))) if call_target is not None else {}
    return LossPath(decoder, head, float(softcap) if softcap else None, call_target, keep)


def final_hidden_states(path: LossPath, input_ids: Tensor) -> Tensor:
    """The decoder's final hidden states (B, T, H) for input_ids (B, T), without the head's logits."""
    if path.decoder is None:
        raise ValueError("this LossPath has no decoder: use the model's logits")
    if path.call_target is None:
        return path.decoder(input_ids=input_ids, use_cache=False)[0]
    # Through the wrapper, so DDP prepares its gradient reduction and FSDP unshards; the hook takes
    # the decoder's output and the head computes logits for one position only (when supported).
    captured: list[Tensor] = []
    handle = path.decoder.register_forward_hook(lambda _m, _args, out: captured.append(out[0]))
    try:
        path.call_target(input_ids=input_ids, use_cache=False, **path.keep_kwargs)
    finally:
        handle.remove()
    return captured[-1]
