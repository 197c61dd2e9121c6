"""The tokenizer and the processes that run it.

`load_tokenizer` loads a local Hugging Face tokenizer and describes it (`TokenizerInfo`: vocabulary,
EOS, the hash that identifies it, and the spec a worker rebuilds it from); `Encoder` tokenizes
batches of documents in `workers` processes and hands the results back in job order.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from velocitune.errors import DataError
from velocitune.fileio import require_dir
from velocitune.shards import choose_dtype


@dataclass(frozen=True)
class TokenizerInfo:
    name_or_path: str
    vocab_size: int
    hash: str
    eos_token_id: int
    spec: dict  # what a worker needs to rebuild the exact same encoder (see _BatchEncoder)
    fingerprint: str = ""  # model.vocab_fingerprint: lets `train` refuse a model with another vocabulary

    def manifest(self) -> dict:
        return {"name_or_path": self.name_or_path, "vocab_size": self.vocab_size, "hash": self.hash,
                "eos_token_id": self.eos_token_id, "vocab_fingerprint": self.fingerprint}


def _tokenizer_hash(directory: Path, vocab_files: Iterable[str]) -> str:
    """sha256 of tokenizer.json; without one, of the vocab files present (each name, NUL, content),
    else of every file in the directory."""
    if (directory / "tokenizer.json").is_file():
        return hashlib.sha256((directory / "tokenizer.json").read_bytes()).hexdigest()
    names = sorted(n for n in set(vocab_files) if (directory / n).is_file())
    if not names:
        names = sorted(p.name for p in directory.iterdir() if p.is_file())
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode() + b"\0")
        h.update((directory / n).read_bytes())
    return h.hexdigest()


def load_tokenizer(tokenizer_dir: str | os.PathLike) -> TokenizerInfo:
    """Load a local Hugging Face tokenizer directory (never downloads) and describe it."""
    directory = Path(tokenizer_dir).expanduser().absolute()
    hint = ("pass --tokenizer a local Hugging Face tokenizer directory (with tokenizer.json or vocab "
            "files, e.g. written by tokenizer.save_pretrained(DIR))")
    require_dir(directory, "tokenizer directory", hint)
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception as e:  # transformers raises many types (OSError, ValueError, JSON errors ...)
        raise DataError(
            f"could not load a tokenizer from {directory} ({type(e).__name__}: {e}); {hint}"
        ) from None
    if tok.eos_token_id is None:
        raise DataError(
            f"the tokenizer in {directory} has no EOS token, which prepare appends after every "
            f"document; set \"eos_token\" in its tokenizer_config.json (e.g. \"<|endoftext|>\")"
        )
    vocab_size = len(tok)
    dtype = choose_dtype(vocab_size)
    spec: dict = {"eos": int(tok.eos_token_id), "dtype": dtype.name}
    if getattr(tok, "is_fast", False) and getattr(tok, "backend_tokenizer", None) is not None:
        # The serialised backend rebuilds in a worker in milliseconds without importing transformers.
        spec.update(kind="fast", json=tok.backend_tokenizer.to_str())
    else:
        spec.update(kind="hf", dir=str(directory))
    vocab_files = getattr(tok, "vocab_files_names", {}).values()
    from velocitune.model import vocab_fingerprint

    return TokenizerInfo(str(directory), vocab_size, _tokenizer_hash(directory, vocab_files),
                         int(tok.eos_token_id), spec, vocab_fingerprint(tok))


class _BatchEncoder:
    """Encodes a list of documents (no special tokens) into one flat token array, EOS after each."""

    def __init__(self, spec: dict):
        self.eos = int(spec["eos"])
        self.dtype = np.dtype(spec["dtype"])
        if spec["kind"] == "fast":
            from tokenizers import Tokenizer

            tk = Tokenizer.from_str(spec["json"])
            tk.no_truncation()
            tk.no_padding()
            # encode_batch_fast (tokenizers >= 0.21) skips character offsets we do not use.
            encode = getattr(tk, "encode_batch_fast", tk.encode_batch)
            self._ids = lambda texts: [e.ids for e in encode(texts, add_special_tokens=False)]
        else:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(spec["dir"], local_files_only=True)
            self._ids = lambda texts: tok(texts, add_special_tokens=False)["input_ids"]

    def encode(self, texts: list[str], lengths_only: bool = False) -> tuple[np.ndarray | None, np.ndarray]:
        """(tokens (sum(lengths),) in the shard dtype or None, lengths (len(texts),) int64 incl. EOS)."""
        ids = self._ids(texts)
        lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
        if lengths_only:
            return None, lengths
        out = np.empty(int(lengths.sum()), dtype=self.dtype)
        pos = 0
        for x in ids:
            n = len(x)
            out[pos : pos + n] = x  # numpy raises OverflowError for an id the dtype cannot hold
            out[pos + n] = self.eos
            pos += n + 1
        return out, lengths


_WORKER: _BatchEncoder | None = None


def _init_worker(spec: dict) -> None:
    global _WORKER
    # One thread per worker process: the pool already uses every core we were given.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = _BatchEncoder(spec)


def _encode_in_worker(texts: list[str], lengths_only: bool) -> tuple[np.ndarray | None, np.ndarray]:
    assert _WORKER is not None, "worker not initialised"
    return _WORKER.encode(texts, lengths_only)


class Encoder:
    """Tokenizes batches in `workers` processes (in this process when workers == 1), results in order."""

    def __init__(self, spec: dict, workers: int):
        self.workers = workers
        self._inline = _BatchEncoder(spec) if workers <= 1 else None
        # spawn, not fork: the parent may hold tokenizer threads and tqdm's monitor thread.
        self._pool = (multiprocessing.get_context("spawn").Pool(workers, _init_worker, (spec,))
                      if workers > 1 else None)
        self._max_inflight = 2 * workers + 1  # keeps every worker busy; bounds queued text in memory

    def map(self, jobs: Iterable[tuple[Any, list[str]]],
            lengths_only: bool = False) -> Iterator[tuple[Any, np.ndarray | None, np.ndarray]]:
        """(meta, tokens, lengths) for each (meta, texts) job, in job order."""
        if self._inline is not None:
            for meta, texts in jobs:
                yield (meta, *self._inline.encode(texts, lengths_only))
            return
        assert self._pool is not None
        pending: deque = deque()
        for meta, texts in jobs:
            pending.append((meta, self._pool.apply_async(_encode_in_worker, (texts, lengths_only))))
            while len(pending) >= self._max_inflight:
                m, result = pending.popleft()
                yield (m, *result.get())
        while pending:
            m, result = pending.popleft()
            yield (m, *result.get())

    def __enter__(self) -> Encoder:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._pool is not None:
            if exc_type is None:
                self._pool.close()
            else:
                self._pool.terminate()
            self._pool.join()
