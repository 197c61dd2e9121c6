"""Token shards on disk: the headered flat binary format, its atomic writer, and memmapped readers.

A shard is a 32-byte little-endian header followed by the tokens as a flat uint16 or uint32 array
(uint16 whenever the vocabulary fits):

    offset  size  field
    0       8     magic b"VTUNETOK"
    8       4     format version (uint32, currently 1)
    12      4     dtype code (uint32: 1 = uint16, 2 = uint32)
    16      8     token count (uint64)
    24      8     reserved (zero)

`PreparedData` reads the directory `velocitune prepare` writes (docs/contracts.md; its manifest through
`velocitune.manifest`) and hands out one `DomainTokens` per domain and split; `DomainTokens.windows`
cuts training windows out of it.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

from velocitune.errors import DataError
from velocitune.fileio import fsync_dir
from velocitune.manifest import MANIFEST_NAME, REPREPARE_HINT, read_manifest

MAGIC = b"VTUNETOK"
FORMAT_VERSION = 1
HEADER_BYTES = 32
_HEADER = struct.Struct("<8sIIQ8x")
_DTYPE_CODES = {np.dtype(np.uint16): 1, np.dtype(np.uint32): 2}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def choose_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id (0 .. vocab_size-1) fits in 16 bits, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size {vocab_size} does not fit in uint32 token ids")
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _dtype_code(dtype: np.dtype | type | str) -> int:
    dtype = np.dtype(dtype)
    if dtype not in _DTYPE_CODES:
        raise ValueError(f"shard dtype must be uint16 or uint32, got {dtype}")
    return _DTYPE_CODES[dtype]


def _as_token_array(tokens: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`tokens` as a 1-D array of `dtype`, refusing ids the dtype cannot hold (no silent wrap-around)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.dtype == dtype or tokens.size == 0:
        return tokens.astype(dtype, copy=False)
    if not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got {tokens.dtype}")
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi > np.iinfo(dtype).max:
        raise ValueError(f"token ids {lo}..{hi} do not fit in {dtype}")
    return tokens.astype(dtype)


class ShardWriter:
    """Streams tokens into one shard: a hidden temp file in the target directory, renamed on `close()`.

    Readers therefore see either no file or a complete one. On an exception inside a `with` block
    the temp file is removed and no shard appears.
    """

    def __init__(self, path: str | os.PathLike, dtype: np.dtype | type | str):
        self.path = Path(path)
        self.dtype = np.dtype(dtype)
        self._code = _dtype_code(self.dtype)
        self.n_tokens = 0
        # Hidden, unique name in the same directory (so os.replace is atomic); "xb" never clobbers.
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        self._file: BinaryIO | None = open(self._tmp, "xb")
        # Placeholder header; the real one (with the final count) is written by close().
        self._file.write(bytes(HEADER_BYTES))

    def write(self, tokens: np.ndarray) -> None:
        """Append a 1-D array of token ids."""
        if self._file is None:
            raise ValueError(f"shard writer for {self.path} is already closed")
        arr = _as_token_array(tokens, self.dtype)
        self._file.write(arr.tobytes())
        self.n_tokens += arr.size

    def close(self) -> Path:
        """Write the header, flush and fsync, then atomically move the shard to its final name."""
        if self._file is None:
            raise ValueError(f"shard writer for {self.path} is already closed")
        f, self._file = self._file, None
        try:
            f.seek(0)
            f.write(_HEADER.pack(MAGIC, FORMAT_VERSION, self._code, self.n_tokens))
            f.flush()
            os.fsync(f.fileno())
        finally:
            f.close()
        os.replace(self._tmp, self.path)
        fsync_dir(self.path.parent)
        return self.path

    def abort(self) -> None:
        """Drop the temp file; the final path is left untouched."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._file is not None:
            self.close()


def write_shard(path: str | os.PathLike, tokens: np.ndarray, dtype: np.dtype | type | str) -> Path:
    """Write `tokens` (1-D ints) as one shard at `path`, atomically. Returns the path."""
    with ShardWriter(path, dtype) as writer:
        writer.write(tokens)
    return writer.path


def read_header(path: str | os.PathLike) -> tuple[np.dtype, int]:
    """Validate a shard's header and size; return (dtype, token count). DataError on any mismatch."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise DataError(f"token shard {path} is missing; {REPREPARE_HINT}") from None
    if len(raw) < HEADER_BYTES:
        raise DataError(
            f"token shard {path} is {len(raw)} bytes, shorter than its {HEADER_BYTES}-byte header "
            f"(truncated?); {REPREPARE_HINT}"
        )
    magic, version, code, n_tokens = _HEADER.unpack(raw)
    if magic != MAGIC:
        raise DataError(
            f"{path} is not a velocitune token shard (magic {magic!r}, expected {MAGIC!r}); "
            f"{REPREPARE_HINT}"
        )
    if version != FORMAT_VERSION:
        raise DataError(
            f"token shard {path} has format version {version}, this velocitune reads version "
            f"{FORMAT_VERSION}; {REPREPARE_HINT}"
        )
    if code not in _CODE_DTYPES:
        raise DataError(f"token shard {path} has unknown dtype code {code}; {REPREPARE_HINT}")
    dtype = _CODE_DTYPES[code]
    expected = HEADER_BYTES + n_tokens * dtype.itemsize
    if size != expected:
        raise DataError(
            f"token shard {path} is {size} bytes but its header promises {n_tokens} {dtype} tokens "
            f"({expected} bytes): the file is truncated or corrupted; {REPREPARE_HINT}"
        )
    return dtype, n_tokens


def open_shard(path: str | os.PathLike) -> np.ndarray:
    """The shard's tokens as a read-only 1-D array: a np.memmap (a plain empty array when it holds none)."""
    dtype, n_tokens = read_header(path)
    if n_tokens == 0:
        # mmap cannot map zero bytes.
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n_tokens,))


class DomainTokens:
    """One split of one domain: its shards concatenated logically into one token stream.

    Training windows are non-overlapping cuts of `seq_len + 1` tokens of that stream (window j =
    tokens[j*(L+1) : (j+1)*(L+1)]); a window may straddle two or more shards.
    """

    def __init__(self, paths: list[str | os.PathLike]):
        self.paths = [Path(p) for p in paths]
        self._shards = [open_shard(p) for p in self.paths]
        dtypes = {s.dtype for s in self._shards}
        if len(dtypes) > 1:
            raise DataError(
                f"shards {[str(p) for p in self.paths]} mix dtypes {sorted(map(str, dtypes))}; "
                f"{REPREPARE_HINT}"
            )
        self.dtype = self._shards[0].dtype if self._shards else np.dtype(np.uint16)
        sizes = np.array([s.size for s in self._shards], dtype=np.int64)
        # offsets[s] = global position of shard s's first token; offsets[-1] = n_tokens. Shape (S+1,).
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        self.n_tokens = int(self._offsets[-1])
        # Per seq_len: for every shard, a strided (n_inside, L+1) view of the windows lying wholly in it.
        self._views: dict[int, list[tuple[int, np.ndarray]]] = {}

    def __repr__(self) -> str:
        return f"DomainTokens({len(self.paths)} shards, {self.n_tokens} tokens, {self.dtype})"

    def n_windows(self, seq_len: int) -> int:
        """Number of whole windows of `seq_len + 1` tokens (a trailing partial window is dropped)."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        return self.n_tokens // (seq_len + 1)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the concatenated stream, as a new array of the shard dtype."""
        if not 0 <= start <= stop <= self.n_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.n_tokens})")
        out = np.empty(stop - start, dtype=self.dtype)
        first = int(np.searchsorted(self._offsets, start, side="right")) - 1
        pos = start
        for s in range(first, len(self._shards)):
            if pos >= stop:
                break
            lo = pos - int(self._offsets[s])
            hi = min(stop, int(self._offsets[s + 1])) - int(self._offsets[s])
            out[pos - start : pos - start + hi - lo] = self._shards[s][lo:hi]
            pos += hi - lo
        return out

    def _inside_views(self, width: int) -> list[tuple[int, np.ndarray]]:
        """Per shard: (index of its first wholly-inside window, strided view of those windows)."""
        if width not in self._views:
            views = []
            for s, shard in enumerate(self._shards):
                lo, hi = int(self._offsets[s]), int(self._offsets[s + 1])
                j_first = -(-lo // width)  # ceil: first window starting at or after the shard start
                j_end = hi // width  # windows j < j_end end at or before the shard end
                n_inside = max(j_end - j_first, 0)
                local = j_first * width - lo
                if n_inside > 0:
                    base = shard[local : local + n_inside * width]
                    view = np.lib.stride_tricks.as_strided(
                        base, shape=(n_inside, width), strides=(width * base.itemsize, base.itemsize),
                        writeable=False,
                    )
                else:
                    view = np.zeros((0, width), dtype=self.dtype)
                views.append((j_first, view))
            self._views[width] = views
        return self._views[width]

    def windows(self, idx: np.ndarray, seq_len: int) -> np.ndarray:
        """Windows `idx` (1-D ints in [0, n_windows)) as an (len(idx), seq_len + 1) int64 array."""
        idx = np.asarray(idx)
        if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0):
            raise ValueError(f"idx must be a 1-D integer array, got {idx.dtype} shape {idx.shape}")
        idx = idx.astype(np.int64, copy=False)
        width = seq_len + 1
        n_win = self.n_windows(seq_len)
        out = np.empty((idx.size, width), dtype=np.int64)
        if idx.size == 0:
            return out
        if idx.min() < 0 or idx.max() >= n_win:
            raise IndexError(
                f"window indices {int(idx.min())}..{int(idx.max())} outside [0, {n_win}) "
                f"for seq_len {seq_len}"
            )
        starts = idx * width
        shard_of = np.searchsorted(self._offsets, starts, side="right") - 1  # (n,) shard holding each start
        done = np.zeros(idx.size, dtype=bool)
        for s in np.unique(shard_of):
            j_first, view = self._inside_views(width)[s]
            rows = np.flatnonzero(shard_of == s)
            k = idx[rows] - j_first
            inside = k < view.shape[0]  # the others run past the end of shard s
            rows, k = rows[inside], k[inside]
            out[rows] = view[k]  # one row gather + uint -> int64 cast for all of shard s
            done[rows] = True
        # Windows that straddle a shard boundary: at most one per boundary in the whole stream.
        for r in np.flatnonzero(~done):
            out[r] = self.read(int(starts[r]), int(starts[r]) + width)
        return out


class PreparedData:
    """A prepared data directory (manifest.json + per-domain shards), validated on construction.

    The manifest and the done markers are read and checked by `velocitune.manifest.read_manifest`.
    """

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        m = read_manifest(self.root)
        self.manifest = m.raw
        self.vocab_size = m.vocab_size
        self.tokenizer_hash = m.tokenizer_hash
        self.eos_token_id = m.eos_token_id
        self.dtype = m.dtype
        self._info = {e["name"]: e for e in m.entries}
        self.domains = [e["name"] for e in m.entries]
        self.w0 = np.array([m.w0[name] for name in self.domains], dtype=np.float64)
        if self.dtype != choose_dtype(self.vocab_size):
            raise DataError(
                f"manifest {self.root / MANIFEST_NAME} says dtype {self.dtype} for vocab size "
                f"{self.vocab_size}; {REPREPARE_HINT}"
            )
        self._tokens: dict[tuple[str, str], DomainTokens] = {}

    def _split(self, name: str, split: str) -> DomainTokens:
        if name not in self._info:
            raise DataError(
                f"unknown domain {name!r}; {self.root} holds domains {self.domains}"
            )
        key = (name, split)
        if key not in self._tokens:
            info = self._info[name][split]
            tokens = DomainTokens([self.root / rel for rel in info["shards"]])
            if tokens.n_tokens != int(info["tokens"]):
                raise DataError(
                    f"domain {name!r} {split} shards hold {tokens.n_tokens} tokens but the manifest "
                    f"says {info['tokens']}; {REPREPARE_HINT}"
                )
            if tokens.paths and tokens.dtype != self.dtype:
                raise DataError(
                    f"domain {name!r} {split} shards are {tokens.dtype} but the manifest says "
                    f"{self.dtype}; {REPREPARE_HINT}"
                )
            self._tokens[key] = tokens
        return self._tokens[key]

    def train(self, name: str) -> DomainTokens:
        """The training split of domain `name`."""
        return self._split(name, "train")

    def val(self, name: str) -> DomainTokens:
        """The held-out validation split of domain `name`."""
        return self._split(name, "val")

    def domain_info(self, name: str) -> dict:
        """A copy of the domain's manifest entry (sources, token and document counts, shards, ...)."""
        if name not in self._info:
            raise DataError(f"unknown domain {name!r}; {self.root} holds domains {self.domains}")
        return json.loads(json.dumps(self._info[name]))
