"""Seeded permutations: the order of a batch's slots and of every domain's windows, random access.

Permutations are seeded bijections of range(n), evaluated elementwise and never materialised: a 4-round
mixed-radix Feistel network over range(a·b), a·b a near-square just above n, with cycle-walking back into
range(n) (rarely needed: a·b − n < sqrt(n) + 1). One vectorised code path serves 3 windows or 4·10^9,
costs O(B) per step whatever the corpus size, and rests only on this file's integer arithmetic, so the
stream does not change with the numpy version (a `Generator.permutation` stream is not promised stable
across versions). Pure numpy, no state; `velocitune.sampler.MixtureSampler` uses it for
(docs/design.md §6 rule 5):

- **Order** (`batch_positions`): the B slots of step t go to batch positions by a permutation keyed by
  (seed, t).
- **Windows** (`draw_windows`): the n-th draw (0-based, over the whole run) of domain d is window
  perm_{seed,d,epoch}(n mod W_d), epoch = n // W_d: no window repeats within an epoch of its domain.
  With a subsample, that index picks one window of a fixed stratified subset (`subset_window`).
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["batch_positions", "domain_keys", "draw_windows", "mix64", "mix64_int", "permute", "radices",
           "round_keys", "shuffle_key", "subset_window"]

_ROUNDS = 4
# Domain-separation tags, so the window, shuffle and subset streams never share keys.
_TAG_WINDOWS = 0x57494E444F575321
_TAG_SHUFFLE = 0x53485546464C4521
_SUBSET_SEED = 0x5355425345542121  # fixed: proxy runs with different seeds see the same subset
_GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


# --------------------------------------------------------------------------- seeded bijections


def mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrap-around arithmetic, elementwise)."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


def mix64_int(z: int) -> int:
    """`mix64` on one Python int, for per-domain keys."""
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def radices(size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feistel radices (a, b) per size: a = ceil(sqrt(size)), b = ceil(size / a), so a·b - size < a.

    int64 (n,) -> two uint64 (n,). A near-square a·b just above `size` makes cycle-walking rare.
    """
    a = np.array([max(1, math.isqrt(int(n) - 1) + 1) for n in np.ravel(size)], dtype=np.uint64)
    b = (np.asarray(size, dtype=np.uint64) + a - np.uint64(1)) // a
    return a, b


def round_keys(key: int | np.ndarray) -> list:
    """The Feistel round keys of one key (Python int -> uint64 scalars) or of many (uint64 (n,) arrays)."""
    if isinstance(key, np.ndarray):
        return [mix64(key ^ np.uint64((r + 1) * _GOLDEN & _M64)) for r in range(_ROUNDS)]
    return [np.uint64(mix64_int(key ^ ((r + 1) * _GOLDEN & _M64))) for r in range(_ROUNDS)]


def _feistel(x: np.ndarray, a, b, keys: list) -> np.ndarray:
    """One pass of a mixed-radix Feistel network, a bijection of range(a·b); elementwise uint64.

    x = left·b + right with left in Z_a, right in Z_b; each round maps (left, right) to
    (right, (left + F(right)) mod |Z_left|), which swaps the radices, so an even number of rounds ends
    in (Z_a, Z_b) again. F: xor the round key, two multiply-xorshift steps, scale the top 32 bits into
    [0, modulus) (multiply-shift: no division in the rounds, uint64 division is slow).
    """
    left, right = x // b, x % b
    m_left, m_right = a, b
    for rk in keys:
        z = (right ^ rk) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
        f = ((z >> np.uint64(32)) * m_left) >> np.uint64(32)
        total = left + f  # < 2·m_left
        left, right = right, np.where(total >= m_left, total - m_left, total)
        m_left, m_right = m_right, m_left
    return left * b + right


def permute(i: np.ndarray, size, a, b, keys: list) -> np.ndarray:
    """perm(i): a seeded bijection of range(size), elementwise; uint64 (n,) -> uint64 (n,).

    `size`, the radices `a`, `b` (from `radices`) and each round key are per element (n,) or shared
    scalars. Cycle-walking (re-applying the bijection of range(a·b) while the value is >= size)
    restricts it to a bijection of range(size); a·b < size + sqrt(size) + 1, so few values walk.
    """
    def pick(v, rows: np.ndarray):
        return v[rows] if isinstance(v, np.ndarray) else v

    out = _feistel(i, a, b, keys)
    todo = np.flatnonzero(out >= size)  # elements still outside range(size)
    while todo.size:
        out[todo] = y = _feistel(out[todo], pick(a, todo), pick(b, todo), [pick(rk, todo) for rk in keys])
        todo = todo[y >= pick(size, todo)]
    return out


def subset_window(i: np.ndarray, n_windows: np.ndarray, n_subset: np.ndarray, domain: np.ndarray) -> np.ndarray:
    """The i-th window of each domain's fixed stratified subset. All arrays uint64 (n,).

    range(W) is cut into `n_subset` contiguous strata of nearly equal size (the first W mod m hold one
    extra window); the subset holds one window per stratum at a seeded offset, so it spreads over the
    whole corpus (every shard, every source) and does not depend on the run seed.
    """
    q, r = n_windows // n_subset, n_windows % n_subset
    start = i * q + np.minimum(i, r)
    width = q + (i < r).astype(np.uint64)
    key = mix64(mix64(np.uint64(_SUBSET_SEED) ^ domain) ^ i)
    return start + key % width


# --------------------------------------------------------------------------- the sampler's streams


def shuffle_key(seed: int) -> int:
    """The key of the batch-order stream of run seed `seed` (mixed with the step in `batch_positions`)."""
    return mix64_int(seed ^ _TAG_SHUFFLE)


def domain_keys(seed: int, k: int) -> np.ndarray:
    """One window-stream key per domain, uint64 (k,); the epoch is mixed in per draw."""
    base = mix64_int(seed ^ _TAG_WINDOWS)
    return np.array([mix64_int(base + d * _GOLDEN) for d in range(k)], dtype=np.uint64)


def batch_positions(key: int, step: int, batch: int, batch_radices: tuple) -> np.ndarray:
    """π(j) for j in range(B): slot j of step `step` goes to batch position π(j). int64 (B,).

    key: `shuffle_key(seed)`; batch_radices: `radices` of B as two uint64 scalars.
    """
    keys = round_keys(mix64_int(key ^ step))
    return permute(np.arange(batch, dtype=np.uint64), np.uint64(batch), *batch_radices, keys).astype(np.int64)


def draw_windows(domain: np.ndarray, draw: np.ndarray, keys: np.ndarray, subset_sizes: np.ndarray,
                 subset_radices: tuple[np.ndarray, np.ndarray], full_sizes: np.ndarray | None) -> np.ndarray:
    """Window index (in the full domain) of draw number `draw` of `domain`; int64 (n,) -> int64 (n,).

    keys: `domain_keys`, uint64 (k,); subset_sizes: windows m_d each domain draws from, int64 (k,), and
    their `radices`; full_sizes: W_d, int64 (k,), when drawing from a subsample (None otherwise). Draws
    must come grouped by domain with increasing draw numbers (as the sampler lays them out), so the
    (domain, epoch) pairs form a few contiguous runs and the keys are derived once per run.
    """
    m = subset_sizes[domain].astype(np.uint64)  # (n,)
    n = draw.astype(np.uint64)
    epoch = n // m
    cut = np.flatnonzero((np.diff(domain) != 0) | (np.diff(epoch) != 0)) + 1
    first = np.concatenate(([0], cut))  # (runs,) first element of each (domain, epoch) run
    run_keys = mix64(keys[domain[first]] ^ (epoch[first] * np.uint64(_GOLDEN)))
    lengths = np.diff(np.append(first, domain.size))
    per_draw = [np.repeat(rk, lengths) for rk in round_keys(run_keys)]
    radix_a, radix_b = subset_radices
    local = permute(n % m, m, radix_a[domain], radix_b[domain], per_draw)
    if full_sizes is not None:
        W = np.asarray(full_sizes, dtype=np.uint64)[domain]
        local = subset_window(local, W, m, domain.astype(np.uint64))
    return local.astype(np.int64)
