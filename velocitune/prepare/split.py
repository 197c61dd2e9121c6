"""A domain's hash-chosen validation split, and the train and val token streams written from it.

Per domain, two streaming passes over its documents (memory stays bounded whatever the corpus size):
1. scan: read every document, hash its text, and pick the validation documents: those with the
   lowest hashes (see `_ValSelector`); only val candidates (about `val_fraction` of the corpus) are
   tokenized here, to learn their lengths;
2. write: tokenize every document (in `workers` processes, in document order) and append it, followed
   by the EOS token, to the train or val token stream, cut into shards of `shard_tokens` tokens.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from velocitune.errors import DataError
from velocitune.manifest import DONE_MARKER
from velocitune.prepare.encode import Encoder
from velocitune.prepare.settings import MIN_VAL_WINDOWS, USEFUL_VAL_WINDOWS, Settings
from velocitune.prepare.sources import NotUtf8, SourceFile, is_utf8, iter_documents
from velocitune.shards import ShardWriter

log = logging.getLogger(__name__)

# A unit of tokenizer work: documents are grouped until ~this many characters (or documents).
# Small enough that the last batch of a domain leaves the other workers idle only briefly.
_BATCH_CHARS = 256 * 1024
_BATCH_DOCS = 4096
_HASH_SPACE = 2**64


def doc_hash(text: str) -> int:
    """A stable 64-bit hash of a document's UTF-8 text: decides the val split (same on every machine)."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


# ----------------------------------------------------------------------------------------------
# pass 1: scan a domain and choose its val documents


class _ValSelector:
    """Streaming choice of the val set among candidate documents (hash < val_fraction * 2^64).

    Rule: sort candidates by hash; take them in that order while the tokens already taken are below
    `cap` (so the last one may cross it). Identical documents share a hash and go together. Only the
    chosen candidates are kept (a max-heap on hash), so memory is bounded by the cap, not the corpus.
    """

    def __init__(self, cap: int):
        self.cap = cap
        self.total = 0
        self.groups: dict[int, list] = {}  # hash -> [tokens, [ordinals]]
        self._heap: list[int] = []  # negated hashes of the groups

    def add(self, h: int, ordinal: int, n_tokens: int) -> None:
        group = self.groups.get(h)
        if group is None:
            if self._heap and self.total >= self.cap and h > -self._heap[0]:
                return  # would be the last in hash order after the cap is reached: never chosen
            group = self.groups[h] = [0, []]
            heapq.heappush(self._heap, -h)
        group[0] += n_tokens
        group[1].append(ordinal)
        self.total += n_tokens
        # Drop the highest-hash group while the others already reach the cap without it.
        while self._heap:
            top = self.groups[-self._heap[0]]
            if self.total - top[0] < self.cap:
                break
            self.total -= top[0]
            del self.groups[-heapq.heappop(self._heap)]

    def ordinals(self) -> list[int]:
        return [o for _, ords in self.groups.values() for o in ords]


@dataclass
class DomainScan:
    """What pass 1 learns about a domain."""

    files: list[tuple[SourceFile, int]]  # every readable file and its non-empty document count
    skipped: list[str]  # files skipped as not UTF-8
    n_docs: int  # non-empty documents; their ordinals are 0 .. n_docs-1 in file order
    n_empty: int  # empty or null documents (not counted, not written)
    val_ordinals: np.ndarray  # sorted int64 ordinals of the val documents


def _candidate_batches(name: str, files: list[SourceFile], settings: Settings, state: dict,
                       bar: tqdm) -> Iterator[tuple[tuple[list[int], list[int]], list[str]]]:
    """Reads the whole domain once; yields batches of val candidates ((hashes, ordinals), texts) and
    fills `state` with per-file counts, skipped files and the lowest hash seen."""
    threshold = int(settings.val_fraction * _HASH_SPACE)
    hashes: list[int] = []
    ordinals: list[int] = []
    texts: list[str] = []
    chars = 0
    ordinal = 0
    for f in files:
        if f.kind != "text" and not is_utf8(f, settings.text_field, name):
            _skip_file(name, f.path, settings.strict, state["skipped"])
            continue
        first = ordinal
        try:
            for loc, text in iter_documents(f, settings.text_field, name):
                if not text:
                    state["n_empty"] += 1
                    continue
                try:
                    h = doc_hash(text)
                except UnicodeEncodeError:
                    where = f"line {loc}" if f.kind == "jsonl" else f"row {loc}"
                    raise DataError(
                        f"domain {name!r}: {f.path}, {where}: the text contains an unpaired surrogate "
                        f"escape (e.g. \\ud800), which is not valid Unicode; fix or remove it"
                    ) from None
                if h < state["min_hash"]:
                    state["min_hash"], state["min_ordinals"] = h, [ordinal]
                elif h == state["min_hash"]:
                    state["min_ordinals"].append(ordinal)
                if h < threshold:
                    hashes.append(h)
                    ordinals.append(ordinal)
                    texts.append(text)
                    chars += len(text)
                    if chars >= _BATCH_CHARS or len(texts) >= _BATCH_DOCS:
                        yield (hashes, ordinals), texts
                        hashes, ordinals, texts, chars = [], [], [], 0
                ordinal += 1
        except NotUtf8:
            _skip_file(name, f.path, settings.strict, state["skipped"])
            continue
        state["files"].append((f, ordinal - first))
        bar.update(ordinal - first)
    state["n_docs"] = ordinal
    if texts:
        yield (hashes, ordinals), texts


def _skip_file(domain: str, path: str, strict: bool, skipped: list[str]) -> None:
    if strict:
        raise DataError(
            f"domain {domain!r}: {path} is not valid UTF-8; re-encode it (e.g. `iconv -f latin1 -t "
            f"utf-8`) or remove it, or drop --strict to skip such files with a warning"
        )
    log.warning("domain %r: skipping %s: not valid UTF-8 (counted in the manifest's skipped_files; "
                "--strict makes this an error)", domain, path)
    skipped.append(path)


def scan_domain(name: str, files: list[SourceFile], settings: Settings, encoder: Encoder,
                 progress: bool) -> DomainScan:
    """Pass 1: count documents and choose the val split (module docstring); errors on degenerate domains."""
    state: dict = {"files": [], "skipped": [], "n_empty": 0, "n_docs": 0,
                   "min_hash": _HASH_SPACE, "min_ordinals": []}
    selector = _ValSelector(settings.val_tokens)
    with tqdm(desc=f"{name}: scan", unit=" docs", disable=not progress, leave=False) as bar:
        jobs = _candidate_batches(name, files, settings, state, bar)
        for (hashes, ordinals), _, lengths in encoder.map(jobs, lengths_only=True):
            for h, o, n in zip(hashes, ordinals, lengths.tolist()):
                selector.add(h, o, n)
    n_docs = state["n_docs"]
    val = selector.ordinals()
    if not val and n_docs >= 2:
        # No document fell under val_fraction (a small domain): hold out the lowest-hash one(s).
        val = state["min_ordinals"]
    if n_docs == 0:
        raise DataError(
            f"domain {name!r} yields no documents: its {len(files)} input file(s) are empty"
            + (f" or not UTF-8 ({len(state['skipped'])} skipped)" if state["skipped"] else "")
            + f"; check its paths and --text-field ({settings.text_field!r})"
        )
    if n_docs == 1:
        raise DataError(
            f"domain {name!r} has a single document, so a held-out val set would take all of it; give "
            f"it at least 2 documents (a text file is one document: split it into several files)"
        )
    if len(val) >= n_docs:
        raise DataError(
            f"domain {name!r}: the val split would take all {n_docs} documents (val_fraction="
            f"{settings.val_fraction}, val_tokens={settings.val_tokens}; identical documents go together); "
            f"lower --val-fraction or --val-tokens, or add distinct documents"
        )
    return DomainScan(state["files"], state["skipped"], n_docs, state["n_empty"],
                 np.array(sorted(val), dtype=np.int64))


def check_val_size(name: str, val_tokens: int, seq_len: int, settings: Settings) -> None:
    """Refuse a val split under MIN_VAL_WINDOWS windows of seq_len + 1 tokens; warn under USEFUL_VAL_WINDOWS.

    Evaluation reads whole windows only, so the val split of a small corpus (a document or two at the
    default val_fraction) would fail later on data.seq_len in another command, or give a loss of a few
    sequences. The advice names what to change, with the val_fraction that would give USEFUL_VAL_WINDOWS
    (the split grows about in proportion while it stays under the val_tokens cap).
    """
    width = seq_len + 1
    windows = val_tokens // width
    if windows >= USEFUL_VAL_WINDOWS:
        return
    useful = USEFUL_VAL_WINDOWS * width
    fraction = settings.val_fraction * useful / val_tokens if val_tokens else 1.0
    advice = f"raise --val-fraction (now {settings.val_fraction:g}"
    advice += f"; about {fraction:.2g} would give {USEFUL_VAL_WINDOWS})" if fraction < 0.5 else ")"
    if settings.val_tokens < useful:
        advice += f" and --val-tokens (now {settings.val_tokens:,}) to at least {useful:,}"
    advice += f", lower data.seq_len (now {seq_len}) or give the domain more data"
    if windows < MIN_VAL_WINDOWS:
        raise DataError(
            f"domain {name!r}: its validation split holds {val_tokens:,} tokens, {windows} whole window(s) of "
            f"data.seq_len + 1 = {width} tokens, fewer than the {MIN_VAL_WINDOWS} needed to measure a val loss; "
            f"{advice}"
        )
    log.warning("domain %r: its validation split holds only %d window(s) of data.seq_len + 1 = %d tokens "
                "(%s tokens), a noisy val loss; %d or more are advised: %s", name, windows, width,
                f"{val_tokens:,}", USEFUL_VAL_WINDOWS, advice)


# ----------------------------------------------------------------------------------------------
# pass 2: write the token streams


class SplitWriter:
    """One split's token stream, cut into shards of exactly `shard_tokens` tokens (the last may be short)."""

    def __init__(self, root: Path, domain: str, split: str, dtype: np.dtype, shard_tokens: int):
        self.root, self.domain, self.split = root, domain, split
        self.dtype, self.shard_tokens = dtype, shard_tokens
        self.shards: list[str] = []  # finished shards, relative to root
        self.n_tokens = 0
        self.n_docs = 0
        self._current: ShardWriter | None = None

    def write(self, tokens: np.ndarray, n_docs: int = 0) -> None:
        self.n_docs += n_docs
        while tokens.size:
            if self._current is None:
                rel = f"{self.domain}/{self.split}_{len(self.shards):05d}.bin"
                self._current = ShardWriter(self.root / rel, self.dtype)
            room = self.shard_tokens - self._current.n_tokens
            self._current.write(tokens[:room])
            self.n_tokens += min(room, tokens.size)
            tokens = tokens[room:]
            if self._current.n_tokens == self.shard_tokens:
                self._finish_shard()

    def _finish_shard(self) -> None:
        assert self._current is not None
        path = self._current.close()
        self.shards.append(path.relative_to(self.root).as_posix())
        self._current = None

    def close(self) -> dict:
        """The split's manifest entry: {"tokens", "documents", "shards"}."""
        if self._current is not None:
            self._finish_shard()
        return {"tokens": self.n_tokens, "documents": self.n_docs, "shards": list(self.shards)}

    def abort(self) -> None:
        if self._current is not None:
            self._current.abort()
            self._current = None


def clear_domain_dir(directory: Path) -> None:
    """Remove what an earlier (maybe interrupted) prepare left for a domain; leave anything else alone."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        n = p.name
        ours = (re.fullmatch(r"(train|val)_\d{5}\.bin", n) or n == DONE_MARKER
                or (n.startswith(".") and n.endswith(".tmp")))
        if ours and p.is_file():
            p.unlink()


def _slice_batches(name: str, scan: DomainScan, lo: int, hi: int,
                   text_field: str) -> Iterator[tuple[tuple[int, int], list[str]]]:
    """Documents with ordinals in [lo, hi) as batches ((first ordinal, count), texts), in order."""
    texts: list[str] = []
    chars = 0
    first = ordinal = 0
    for f, n_file in scan.files:
        if ordinal + n_file <= lo:
            ordinal += n_file  # the whole file lies before this slice: do not read it
            continue
        if ordinal >= hi:
            break
        file_first = ordinal
        for _, text in iter_documents(f, text_field, name):
            if not text:
                continue
            if lo <= ordinal < hi:
                if not texts:
                    first = ordinal
                texts.append(text)
                chars += len(text)
                if chars >= _BATCH_CHARS or len(texts) >= _BATCH_DOCS:
                    yield (first, len(texts)), texts
                    texts, chars = [], 0
            ordinal += 1
        if ordinal - file_first != n_file:
            raise DataError(
                f"domain {name!r}: {f.path} changed while it was being prepared ({n_file} documents, "
                f"then {ordinal - file_first}); re-run `velocitune prepare` once it is stable"
            )
    if texts:
        yield (first, len(texts)), texts


def write_domain(out: Path, name: str, scan: DomainScan, lo: int, hi: int, settings: Settings,
                  dtype: np.dtype, encoder: Encoder, progress: bool) -> tuple[dict, dict]:
    """Pass 2: tokenize documents [lo, hi) into the train and val streams; returns their entries."""
    train = SplitWriter(out, name, "train", dtype, settings.shard_tokens)
    val = SplitWriter(out, name, "val", dtype, settings.shard_tokens)
    try:
        with tqdm(desc=name, total=hi - lo, unit=" docs", disable=not progress) as bar:
            jobs = _slice_batches(name, scan, lo, hi, settings.text_field)
            for (first, n), tokens, lengths in encoder.map(jobs):
                assert tokens is not None
                a, b = np.searchsorted(scan.val_ordinals, [first, first + n])
                if a == b:
                    train.write(tokens, n)
                else:
                    is_val = np.zeros(n, dtype=bool)  # (n,) per document of the batch
                    is_val[scan.val_ordinals[a:b] - first] = True
                    token_is_val = np.repeat(is_val, lengths)  # (sum(lengths),)
                    val.write(tokens[token_is_val], int(b - a))
                    train.write(tokens[~token_is_val], n - int(b - a))
                bar.update(n)
                bar.set_postfix_str(f"{train.n_tokens + val.n_tokens:,} tokens", refresh=False)
        return train.close(), val.close()
    except BaseException:
        train.abort()
        val.abort()
        raise
