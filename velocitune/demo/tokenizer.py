"""The demo tokenizer: a byte-level BPE trained on the demo corpus, saved as a Hugging Face tokenizer dir.

A stamp beside it records what it was trained from, so that a directory already trained from the same
file contents, vocab size and recipe is reused as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from velocitune.demo.corpus import package_version
from velocitune.errors import ConfigError, DataError
from velocitune.fileio import atomic_write_text

EOS_TOKEN = "<|endoftext|>"  # end of every document; also BOS and pad

# Bump when the tokenizer recipe changes, so that directories built by the old recipe are retrained.
TOKENIZER_VERSION = 1
TOKENIZER_STAMP_NAME = "velocitune_tokenizer.json"


def train_tokenizer(
    files: list[Path], out_dir: str | os.PathLike, vocab_size: int = 8192, progress: bool = False
) -> Path:
    """Train a byte-level BPE on the `text` of JSONL `files`; save a Hugging Face tokenizer dir.

    `<|endoftext|>` (id 0) is EOS, and also BOS and pad, as in GPT-2; nothing is added around a
    text, and decoding gives back exactly the text encoded. Load the result with
    `AutoTokenizer.from_pretrained(out_dir, local_files_only=True)`. A directory already trained
    from the same file contents and vocab size is left as it is.
    """
    # Imported here: transformers takes seconds to import, and building the corpus never needs it.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    paths = [Path(f) for f in files]
    if not paths:
        raise ConfigError("train_tokenizer needs at least one JSONL file to learn from; pass the corpus files")
    if vocab_size < 512:
        raise ConfigError(f"tokenizer vocab_size must be at least 512 (256 bytes + merges + EOS), got {vocab_size}")
    for path in paths:
        if not path.is_file():
            raise DataError(f"tokenizer training file {path} does not exist; build the demo corpus first")
    out = Path(out_dir)
    stamp = {
        "format": "velocitune-demo-tokenizer",
        "version": TOKENIZER_VERSION,
        "vocab_size": vocab_size,
        "tokenizers": package_version("tokenizers"),
        "inputs_sha256": _files_sha256(paths),
    }
    stamp_path = out / TOKENIZER_STAMP_NAME
    if _read_json(stamp_path) == stamp and (out / "tokenizer.json").is_file():
        return out

    tokenizer = Tokenizer(models.BPE())
    # Byte-level: every string is representable (no unknown token) and decodes back exactly.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(_jsonl_texts(paths), trainer=trainer)

    out.mkdir(parents=True, exist_ok=True)
    stamp_path.unlink(missing_ok=True)  # the stamp is written last: present means complete
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,  # would turn "a ." into "a." on decode
    )
    wrapped.save_pretrained(str(out))
    atomic_write_text(stamp_path, json.dumps(stamp, indent=2, sort_keys=True) + "\n")
    return out


def _files_sha256(paths: list[Path]) -> str:
    """One digest of the files' contents, in the order given (names do not matter)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _jsonl_texts(paths: list[Path]) -> Iterator[str]:
    """The `text` field of every line of every file, in order."""
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield json.loads(line)["text"]
                except (ValueError, KeyError, TypeError) as err:
                    raise DataError(
                        f"{path}:{lineno} is not a JSON object with a 'text' string ({err}); "
                        f"each line of a tokenizer training file must look like {{\"text\": \"...\"}}"
                    ) from None
