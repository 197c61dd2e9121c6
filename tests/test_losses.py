"""Tests for velocitune.losses: chunked per-token NLL, per-domain sums, and the model-level loss."""

from __future__ import annotations

import math
import socket
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from velocitune.errors import TrainingError
from velocitune.losses import (
    IGNORE_INDEX,
    check_loss_path,
    chunked_token_nll,
    domain_sums,
    forward_losses,
)
from velocitune.model import build_model

transformers = pytest.importorskip("transformers")


def reference_nll(hidden, weight, bias, labels, softcap=None):
    """Full-logits per-token NLL through plain autograd: the thing the chunked version replaces."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits, labels, reduction="none", ignore_index=IGNORE_INDEX)


def make_head_problem(n=37, h=8, v=50, bias=True, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) * scale
    weight = torch.randn(v, h, generator=g) * scale
    b = torch.randn(v, generator=g) if bias else None
    labels = torch.randint(0, v, (n,), generator=g)
    labels[::5] = IGNORE_INDEX
    return hidden, weight, b, labels


def linear_of(weight, bias):
    """An nn.Linear computing with exactly these (leaf) tensors, so their .grad fills."""
    lin = nn.Linear(weight.shape[1], weight.shape[0])
    del lin.weight, lin.bias
    lin.weight, lin.bias = weight, bias
    return lin


def grads_of(fn, tensors, upstream):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in tensors]
    out = fn(*leaves)
    (out * upstream).sum().backward()
    return out.detach(), [leaf.grad if leaf is not None else None for leaf in leaves]


@pytest.mark.parametrize("chunk", [1, 7, 37, 100])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_chunked_nll_matches_full_logits_values_and_grads(chunk, bias, softcap):
    # scale 2 makes logits large enough that soft-capping at 3 changes them substantially
    hidden, weight, b, labels = make_head_problem(bias=bias, scale=2.0)
    upstream = torch.linspace(0.5, 2.0, hidden.shape[0])  # non-uniform upstream gradient

    def ours(h, w, bb):
        # without bias the head is given as a bare weight tensor, with bias as an nn.Linear
        return chunked_token_nll(h, w if bb is None else linear_of(w, bb), labels, chunk, softcap=softcap)

    got, got_grads = grads_of(ours, [hidden, weight, b], upstream)
    want, want_grads = grads_of(
        lambda h, w, bb: reference_nll(h, w, bb, labels, softcap), [hidden, weight, b], upstream
    )
    assert got.dtype == torch.float32 and got.shape == labels.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.all(got[labels == IGNORE_INDEX] == 0)
    for g_ours, g_ref in zip(got_grads, want_grads):
        if g_ref is None:
            assert g_ours is None
        else:
            torch.testing.assert_close(g_ours, g_ref, atol=1e-5, rtol=1e-4)


def test_softcap_actually_changes_the_loss():
    # guards the softcap test above against logits too small for capping to matter
    hidden, weight, b, labels = make_head_problem(scale=2.0)
    capped = chunked_token_nll(hidden, weight, labels, 8, softcap=3.0)
    plain = chunked_token_nll(hidden, weight, labels, 8)
    assert (capped - plain).abs().max() > 0.5


class ScaledHead(nn.Module):
    """A head that is not an nn.Linear: exercises the checkpointed generic-module path."""

    def __init__(self, h, v):
        super().__init__()
        self.proj = nn.Linear(h, v)
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.proj(x) * self.scale


def test_generic_module_head_matches_reference_with_grads():
    torch.manual_seed(0)
    head = ScaledHead(8, 40)
    hidden, _, _, labels = make_head_problem(n=23, v=40)
    hidden = hidden.requires_grad_(True)
    got = chunked_token_nll(hidden, head, labels, chunk_tokens=6)
    got.sum().backward()
    grads = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()
    want = F.cross_entropy(head(hidden).float(), labels, reduction="none", ignore_index=IGNORE_INDEX)
    want.sum().backward()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for g, p in zip(grads, [hidden] + list(head.parameters())):
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)


def saved_numel_during(fn):
    """Total number of elements autograd saves for backward while running fn()."""
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(sizes)


@pytest.mark.parametrize("generic_head", [False, True])
def test_autograd_saves_no_logits(generic_head):
    # N·V = 64,000 dominates N·H = 512 and V·H = 8,000: saving every chunk's logits (or their
    # log-softmax) would exceed the bound; saving hidden, weight and per-token scalars would not.
    n, h, v = 64, 8, 1000
    torch.manual_seed(0)
    hidden = torch.randn(n, h, requires_grad=True)
    head = ScaledHead(h, v) if generic_head else nn.Linear(h, v)
    labels = torch.randint(0, v, (n,))
    out, saved = saved_numel_during(lambda: chunked_token_nll(hidden, head, labels, chunk_tokens=16))
    assert saved < n * v / 4
    # the naive version saves at least the full (N, V) log-softmax: the measurement can tell
    _, naive_saved = saved_numel_during(lambda: F.cross_entropy(head(hidden).float(), labels, reduction="none"))
    assert naive_saved >= n * v
    out.sum().backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_bf16_autocast_close_to_fp32_and_grad_dtypes():
    hidden, weight, b, labels = make_head_problem(n=30, h=16, v=64)
    head = nn.Linear(16, 64)
    with torch.no_grad():
        head.weight.copy_(weight * 0.3)
        head.bias.copy_(b)
    h = hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = chunked_token_nll(h, head, labels, chunk_tokens=8)
    got.sum().backward()
    want = reference_nll(hidden, head.weight.detach(), head.bias.detach(), labels)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=0.1, rtol=0.05)
    assert h.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32


def test_chunked_nll_rejects_bad_shapes():
    with pytest.raises(ValueError):
        chunked_token_nll(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError):
        chunked_token_nll(torch.zeros(6, 4), torch.zeros(5, 4), torch.zeros(6, dtype=torch.long), chunk_tokens=0)


def test_domain_sums_against_python_loop():
    g = torch.Generator().manual_seed(1)
    nll = torch.rand(50, generator=g) * 5
    dom = torch.randint(0, 4, (50,), generator=g)
    dom[dom == 2] = 1  # domain 2 gets no token: its sum and count must be exactly 0
    valid = torch.rand(50, generator=g) > 0.3
    sums, counts = domain_sums(nll, dom, 4, valid)
    assert sums.dtype == torch.float64 and counts.dtype == torch.float64
    for d in range(4):
        ref_sum = sum(float(nll[i]) for i in range(50) if int(dom[i]) == d and bool(valid[i]))
        ref_count = sum(1 for i in range(50) if int(dom[i]) == d and bool(valid[i]))
        assert math.isclose(float(sums[d]), ref_sum, rel_tol=1e-6, abs_tol=1e-9)
        assert float(counts[d]) == ref_count
    all_sums, all_counts = domain_sums(nll, dom, 4)
    assert float(all_counts.sum()) == 50
    assert math.isclose(float(all_sums.sum()), float(nll.double().sum()), rel_tol=1e-9)


def test_domain_sums_are_detached():
    nll = torch.rand(6, requires_grad=True)
    sums, _ = domain_sums(nll * 2, torch.zeros(6, dtype=torch.long), 1)
    assert not sums.requires_grad


# ------------------------------------------------------------------------------------------
# forward_losses on real Hugging Face models

V = 97


def tiny_model(kind: str):
    torch.manual_seed(0)
    common = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)
    if kind == "llama-tied":
        return build_model(V, 32, 2, 4, intermediate_size=48, tie_embeddings=True)
    if kind == "llama-untied":
        return build_model(V, 32, 2, 4, intermediate_size=48, n_kv_heads=2, tie_embeddings=False)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg)
    if kind == "qwen2":
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(num_key_value_heads=2, **common))
    if kind == "mistral":
        return transformers.MistralForCausalLM(transformers.MistralConfig(num_key_value_heads=2, **common))
    if kind == "gemma2-softcap":
        cfg = transformers.Gemma2Config(num_key_value_heads=2, head_dim=8, final_logit_softcapping=2.0, **common)
        return transformers.Gemma2ForCausalLM(cfg)
    raise AssertionError(kind)


def windows(b=3, t=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (b, t + 1), generator=g)


def param_grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied", "gpt2", "qwen2", "mistral", "gemma2-softcap"])
def test_forward_losses_matches_hf_loss_and_grads(kind):
    model = tiny_model(kind).float().train()
    # dropout off so two forwards are identical; GPT-2 has dropout by default
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    full = windows()
    ref = model(input_ids=full, labels=full)  # HF shifts internally
    ref.loss.backward()
    want = param_grads(model)
    model.zero_grad(set_to_none=True)

    out = forward_losses(model, full[:, :-1], full[:, 1:], torch.zeros(3, dtype=torch.long), k=1, chunk_tokens=8)
    out.loss.backward()
    got = param_grads(model)
    assert abs(float(out.loss.detach()) - float(ref.loss.detach())) < 1e-5
    assert float(out.count[0]) == full[:, 1:].numel()
    assert math.isclose(float(out.nll_sum[0]) / float(out.count[0]), float(ref.loss.detach()), rel_tol=1e-5)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4, msg=name)


def test_softcap_model_is_actually_capped():
    # with cap 2 every capped logit lies in (-2, 2): the per-token loss is at most ln V + 4
    model = tiny_model("gemma2-softcap")
    with torch.no_grad():
        model.lm_head.weight.mul_(50.0)
        full = windows()
        out = forward_losses(model, full[:, :-1], full[:, 1:], torch.zeros(3, dtype=torch.long), k=1)
        ref = model(input_ids=full, labels=full).loss
    assert abs(out.loss.item() - float(ref)) < 1e-5
    assert out.loss.item() <= math.log(V) + 4.0


def python_reference_sums(model, inputs, labels, seq_domain, k):
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=inputs).logits.double(), dim=-1)
    sums, counts = [0.0] * k, [0] * k
    for b in range(inputs.shape[0]):
        for t in range(inputs.shape[1]):
            y = int(labels[b, t])
            if y == IGNORE_INDEX:
                continue
            d = int(seq_domain[b])
            sums[d] -= float(logp[b, t, y])
            counts[d] += 1
    return sums, counts


def test_mixed_batch_per_domain_sums_and_ignore_index():
    model = tiny_model("llama-untied")
    full = windows(b=5, t=9, seed=3)
    inputs, labels = full[:, :-1], full[:, 1:].clone()
    labels[0, :4] = IGNORE_INDEX
    labels[3, -1] = IGNORE_INDEX
    seq_domain = torch.tensor([2, 0, 2, 1, 0])
    k = 4  # domain 3 absent from the batch
    out = forward_losses(model, inputs, labels, seq_domain, k, chunk_tokens=7)  # 7 does not divide 45
    ref_sums, ref_counts = python_reference_sums(model, inputs, labels, seq_domain, k)
    assert out.nll_sum.dtype == torch.float64 and not out.nll_sum.requires_grad
    assert out.count.tolist() == [float(c) for c in ref_counts]
    torch.testing.assert_close(out.nll_sum, torch.tensor(ref_sums, dtype=torch.float64), atol=1e-4, rtol=1e-6)
    want_loss = sum(ref_sums) / sum(ref_counts)
    assert abs(float(out.loss.detach()) - want_loss) < 1e-5


def test_all_ignored_batch_gives_zero_loss_not_nan():
    model = tiny_model("llama-tied")
    inputs = windows(b=2, t=5)[:, :-1]
    out = forward_losses(model, inputs, torch.full_like(inputs, IGNORE_INDEX), torch.tensor([0, 1]), k=2)
    assert out.loss.item() == 0.0
    assert out.count.tolist() == [0.0, 0.0] and out.nll_sum.tolist() == [0.0, 0.0]


def test_compile_wrapper_is_unwrapped_with_a_warning():
    model = tiny_model("llama-tied")
    full = windows()
    want = forward_losses(model, full[:, :-1], full[:, 1:], torch.zeros(3, dtype=torch.long), 1).loss
    compiled = torch.compile(model)  # lazy: nothing compiles unless its forward is called
    with pytest.warns(UserWarning, match="torch.compile"):
        got = forward_losses(compiled, full[:, :-1], full[:, 1:], torch.zeros(3, dtype=torch.long), 1).loss
    assert got.item() == pytest.approx(want.item(), abs=1e-6)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_forward_runs_through_the_wrapper():
    import torch.distributed as dist

    model = tiny_model("llama-untied")
    full = windows()
    inputs, labels = full[:, :-1], full[:, 1:]
    ref = forward_losses(model, inputs, labels, torch.zeros(3, dtype=torch.long), 1)
    ref.loss.backward()
    want = param_grads(model)
    model.zero_grad(set_to_none=True)

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ddp = nn.parallel.DistributedDataParallel(model)
        calls = []
        ddp.register_forward_pre_hook(lambda *_: calls.append(1))  # fires only if DDP.forward runs
        out = forward_losses(ddp, inputs, labels, torch.zeros(3, dtype=torch.long), 1)
        out.loss.backward()
        assert calls == [1]
        assert out.loss.item() == pytest.approx(ref.loss.item(), abs=1e-6)
        got = param_grads(model)
        for name in want:
            torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=1e-5, msg=name)
    finally:
        dist.destroy_process_group()


class NoDecoderLM(nn.Module):
    """A causal LM that is not a Hugging Face model: only its logits are available."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, 16)
        self.out = nn.Linear(16, V)

    def forward(self, input_ids):
        return SimpleNamespace(logits=self.out(torch.tanh(self.emb(input_ids))))


def test_fallback_to_full_logits_warns_once_and_is_correct():
    model = NoDecoderLM()
    full = windows()
    inputs, labels = full[:, :-1], full[:, 1:]
    with pytest.warns(UserWarning, match="full"):
        out = forward_losses(model, inputs, labels, torch.tensor([0, 1, 1]), 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forward_losses(model, inputs, labels, torch.tensor([0, 1, 1]), 2)  # no second warning
    ref_sums, ref_counts = python_reference_sums(model, inputs, labels, torch.tensor([0, 1, 1]), 2)
    torch.testing.assert_close(out.nll_sum, torch.tensor(ref_sums, dtype=torch.float64), atol=1e-4, rtol=1e-6)
    assert out.count.tolist() == [float(c) for c in ref_counts]


def test_unsupported_head_transform_falls_back_and_matches_hf():
    # Cohere multiplies logits by config.logit_scale: the chunked path would be wrong, so the
    # fallback must be taken and give HF's loss
    cfg = transformers.CohereConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, logit_scale=0.5
    )
    torch.manual_seed(0)
    model = transformers.CohereForCausalLM(cfg)
    full = windows()
    with pytest.warns(UserWarning, match="logit_scale"):
        out = forward_losses(model, full[:, :-1], full[:, 1:], torch.zeros(3, dtype=torch.long), 1)
    assert out.loss.item() == pytest.approx(model(input_ids=full, labels=full).loss.item(), abs=1e-5)


class DoubledLogitsLlama(transformers.LlamaForCausalLM):
    """A model whose forward transforms logits in a way loss_path cannot see."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 2
        return out


def test_check_loss_path_accepts_llama_and_catches_unknown_head_transform():
    model = tiny_model("llama-tied")
    ids = windows()[:, :8]
    assert check_loss_path(model, ids) < 1e-4
    odd = DoubledLogitsLlama(model.config)
    with pytest.raises(TrainingError, match="DoubledLogitsLlama"):
        check_loss_path(odd, ids)


@pytest.mark.gpu
def test_forward_losses_has_no_host_sync_on_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = tiny_model("llama-untied").cuda()
    full = windows().cuda()
    seq_domain = torch.tensor([0, 1, 0], device="cuda")
    forward_losses(model, full[:, :-1], full[:, 1:], seq_domain, 2)  # warm-up (lazy inits may sync)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = forward_losses(model, full[:, :-1], full[:, 1:], seq_domain, 2)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_single_chunk_fast_path_matches_recomputing_path():
    # One chunk keeps the softmax from forward instead of recomputing it in backward: same values and grads.
    torch.manual_seed(0)
    hidden = torch.randn(24, 16, requires_grad=True)
    head = torch.nn.Linear(16, 50, bias=True)
    labels = torch.randint(0, 50, (24,))
    labels[3] = -100
    grads = []
    for chunk in (24, 5):  # fast path, then the chunked recompute
        hidden.grad, head.weight.grad, head.bias.grad = None, None, None
        nll = chunked_token_nll(hidden, head, labels, chunk_tokens=chunk)
        (nll * torch.linspace(0.5, 2, 24)).sum().backward()
        grads.append((nll.detach(), hidden.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# train.loss_kernel=liger: the fused linear cross-entropy run once per domain (fused_forward_losses)


def _param_grads(model) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for p in model.parameters()]


def test_fused_per_domain_path_equals_the_chunked_path_values_and_grads():
    from velocitune.losses import chunked_nll_sum, fused_forward_losses

    full = windows(b=5, t=9, seed=4)
    inputs, labels = full[:, :-1], full[:, 1:].clone()
    labels[1, :3] = IGNORE_INDEX
    seq_domain = torch.tensor([2, 0, 2, 1, 0])
    k = 4  # domain 3 absent
    ref_model, model = tiny_model("llama-untied"), tiny_model("llama-untied")
    ref = forward_losses(ref_model, inputs, labels, seq_domain, k, chunk_tokens=7)
    ref.loss.backward()
    out = fused_forward_losses(model, inputs, labels, seq_domain, seq_domain.numpy(), k, chunked_nll_sum(7))
    out.loss.backward()
    torch.testing.assert_close(out.nll_sum, ref.nll_sum, atol=1e-5, rtol=1e-6)
    assert out.count.tolist() == ref.count.tolist() and out.nll_sum[3] == 0
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-6, rtol=1e-6)
    for g, g_ref in zip(_param_grads(model), _param_grads(ref_model)):
        torch.testing.assert_close(g, g_ref, atol=1e-6, rtol=1e-5)


def test_liger_kernel_is_refused_clearly_where_it_cannot_run(make_config):
    from velocitune.errors import ConfigError
    from velocitune.losses import liger_nll_sum
    from velocitune.train import train

    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"needs the liger-kernel package \(pip install liger-kernel"):
            liger_nll_sum()
    with pytest.raises(ConfigError, match="train.loss_kernel=liger runs Liger Kernel's Triton kernels, on CUDA only"):
        train(make_config(train={"loss_kernel": "liger"}))


@pytest.mark.gpu
def test_liger_kernel_gives_the_chunked_per_domain_losses_on_cuda():
    pytest.importorskip("liger_kernel")
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from velocitune.losses import fused_forward_losses, liger_nll_sum

    full = windows(b=6, t=64, seed=5).cuda()
    inputs, labels = full[:, :-1], full[:, 1:]
    seq_domain = torch.tensor([0, 1, 1, 2, 0, 2])
    ref_model, model = tiny_model("llama-untied").cuda(), tiny_model("llama-untied").cuda()
    ref = forward_losses(ref_model, inputs, labels, seq_domain.cuda(), 3)
    ref.loss.backward()
    out = fused_forward_losses(model, inputs, labels, seq_domain.cuda(), seq_domain.numpy(), 3, liger_nll_sum())
    out.loss.backward()
    torch.testing.assert_close(out.nll_sum, ref.nll_sum, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(out.loss, ref.loss, atol=1e-4, rtol=1e-4)
    for g, g_ref in zip(_param_grads(model), _param_grads(ref_model)):
        torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-3)
