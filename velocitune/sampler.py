"""The mixture sampler: which domain and which training window fills every slot of every global batch.

`MixtureSampler.plan(t)` is a pure function of (seed, weight schedule, t) and the constructor arguments
(docs/design.md §6 rule 5), so a resumed or re-sharded run sees exactly the token stream of an uninterrupted one.
Numpy only, no torch, no file I/O.

How one global step `t` of B sequences is planned:

1. **Weights.** The schedule is an append-only list of `(start_step, w)`; `w` is the mixing rule's update
   state. The *sampling* distribution `ŵ(t) = cap_weights(w, caps, floor)` caps every domain at what is
   left of its allowance (`floor(max_repetition · W_d)` draws) beyond its expectation so far,
   (A_d − E_d(t−1))/B, redistributes the excess, and applies the optional floor. `w` and `ŵ` are kept
   apart: only `w` is stored, `ŵ` is recomputed.
2. **Quotas.** The per-step expectation `x_d = ŵ_d·B` is put on a grid of 2**-32 samples; from there on
   the arithmetic is exact integers, so rounding ties fall the same way on every machine. E_d(t) =
   Σ_{s<=t} x_d(s) is the cumulative expectation, C_d(t) the cumulative draws. Domain d is owed
   a_d = E_d(t) − C_d(t−1) and gets floor(a_d) (at least 0); the samples still missing go to the domains
   whose deficit would reach a whole sample soonest, (1 − frac(a_d)) / x_d steps away (ties: lower
   index). Plain largest-remainder is not enough: it hands spare samples to slow domains, which then
   stay ahead for many steps; with B=1 and w ∝ (1,1,1,1,.156,.156) a deficit passes one sample. When
   domains ahead of their expectation get no share (a_d < 0) the floors can add up to more than B; the
   surplus is taken back where it leaves the smallest deficit.
   Guarantees (tests/test_sampler.py checks each):
   - Σ quotas = B; no quota exceeds the domain's remaining allowance; E_d(t) never exceeds it either;
   - C_d(t) − E_d(t) < 1 always: no domain is ever a whole sample ahead of its expectation;
   - |C_d(t) − E_d(t)| < 1 at every step when every share is at least one sample per step (ŵ_d·B >= 1),
     across any number of weight changes (proof: no a_d < 0, so no surplus); the same holds for a
     constant mixture of any shares (not proven: property tests and an exhaustive search of small cases);
   - in general E_d(t) − C_d(t) < k − 1. Within one sample cannot be promised for arbitrary weight
     changes by any sampler that does not know future weights: with k=6, B=5, w=(.3,.3,.1,.1,.1,.1)
     then (0,0,0,⅓,⅓,⅓), step 0 must leave three domains half a sample ahead and three half behind;
     step 1 then owes the three behind 13/6 each, 2 samples each to stay within one, 6 for 5 slots.
3. **Order.** The B domain ids are shuffled by a seeded permutation of the positions, keyed by (seed, t).
4. **Windows.** The n-th draw (0-based, over the whole run) of domain d is window
   perm_{seed,d,epoch}(n mod W_d), epoch = n // W_d: no window repeats within an epoch of its domain.

Permutations are random-access seeded bijections, never materialised: a 4-round mixed-radix Feistel
network over range(a·b), a·b a near-square just above n, with cycle-walking back into range(n) (rarely
needed: a·b − n < sqrt(n) + 1). One vectorised code path serves 3 windows or 4·10^9, costs O(B) per step
whatever the corpus size, and rests only on this file's integer arithmetic, so the stream does not change
with the numpy version (a `Generator.permutation` stream is not promised stable across versions).

Cost: the quotas of step t depend on all earlier steps. The sampler keeps the state before the next
step (sequential use: O(k + B) per step) and a snapshot every 1,024 steps (random access replays at most
1,024 steps). A resume replays the quotas from step 0, recomputing ŵ only where a cap moves: ~25 µs per
step here, 100,000 steps in 2-3 s (benchmarks/sampler.py).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np

from velocitune.errors import CheckpointError, ConfigError, DataError, DataExhausted

__all__ = ["MixtureSampler", "Plan", "cap_weights", "rank_slice"]

_Q = 1 << 32  # grid of the per-step expectations: 2**32 units per sample
_MAX_BATCH = 1 << 20  # keeps B·_Q + slack inside float64's exact integers (2**53)
_MAX_WINDOWS = 1 << 32  # per domain; keeps the stratified-subset arithmetic inside uint64
_SNAPSHOT_EVERY = 1024
_ROUNDS = 4
_STATE_FORMAT = "velocitune-sampler"
_STATE_VERSION = 1

# Domain-separation tags, so the window, shuffle and subset streams never share keys.
_TAG_WINDOWS = 0x57494E444F575321
_TAG_SHUFFLE = 0x53485546464C4521
_SUBSET_SEED = 0x5355425345542121  # fixed: proxy runs with different seeds see the same subset
_GOLDEN = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


# --------------------------------------------------------------------------- seeded bijections


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on a uint64 array (wrap-around arithmetic, elementwise)."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    return z ^ (z >> 31)


def _mix64_int(z: int) -> int:
    """`_mix64` on one Python int, for per-domain keys."""
    z &= _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def _radices(size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feistel radices (a, b) per size: a = ceil(sqrt(size)), b = ceil(size / a), so a·b - size < a.

    int64 (n,) -> two uint64 (n,). A near-square a·b just above `size` makes cycle-walking rare.
    """
    a = np.array([max(1, math.isqrt(int(n) - 1) + 1) for n in np.ravel(size)], dtype=np.uint64)
    b = (np.asarray(size, dtype=np.uint64) + a - np.uint64(1)) // a
    return a, b


def _round_keys(key: int | np.ndarray) -> list:
    """The Feistel round keys of one key (Python int -> uint64 scalars) or of many (uint64 (n,) arrays)."""
    if isinstance(key, np.ndarray):
        return [_mix64(key ^ np.uint64((r + 1) * _GOLDEN & _M64)) for r in range(_ROUNDS)]
    return [np.uint64(_mix64_int(key ^ ((r + 1) * _GOLDEN & _M64))) for r in range(_ROUNDS)]


def _feistel(x: np.ndarray, a, b, round_keys: list) -> np.ndarray:
    """One pass of a mixed-radix Feistel network, a bijection of range(a·b); elementwise uint64.

    x = left·b + right with left in Z_a, right in Z_b; each round maps (left, right) to
    (right, (left + F(right)) mod |Z_left|), which swaps the radices, so an even number of rounds ends
    in (Z_a, Z_b) again. F: xor the round key, two multiply-xorshift steps, scale the top 32 bits into
    [0, modulus) (multiply-shift: no division in the rounds, uint64 division is slow).
    """
    left, right = x // b, x % b
    m_left, m_right = a, b
    for rk in round_keys:
        z = (right ^ rk) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(31))) * np.uint64(0x94D049BB133111EB)
        f = ((z >> np.uint64(32)) * m_left) >> np.uint64(32)
        total = left + f  # < 2·m_left
        left, right = right, np.where(total >= m_left, total - m_left, total)
        m_left, m_right = m_right, m_left
    return left * b + right


def _permute(i: np.ndarray, size, a, b, round_keys: list) -> np.ndarray:
    """perm(i): a seeded bijection of range(size), elementwise; uint64 (n,) -> uint64 (n,).

    `size`, the radices `a`, `b` (from `_radices`) and each round key are per element (n,) or shared
    scalars. Cycle-walking (re-applying the bijection of range(a·b) while the value is >= size)
    restricts it to a bijection of range(size); a·b < size + sqrt(size) + 1, so few values walk.
    """
    def pick(v, rows: np.ndarray):
        return v[rows] if isinstance(v, np.ndarray) else v

    out = _feistel(i, a, b, round_keys)
    todo = np.flatnonzero(out >= size)  # elements still outside range(size)
    while todo.size:
        out[todo] = y = _feistel(out[todo], pick(a, todo), pick(b, todo), [pick(rk, todo) for rk in round_keys])
        todo = todo[y >= pick(size, todo)]
    return out


def _subset_window(i: np.ndarray, n_windows: np.ndarray, n_subset: np.ndarray, domain: np.ndarray) -> np.ndarray:
    """The i-th window of each domain's fixed stratified subset. All arrays uint64 (n,).

    range(W) is cut into `n_subset` contiguous strata of nearly equal size (the first W mod m hold one
    extra window); the subset holds one window per stratum at a seeded offset, so it spreads over the
    whole corpus (every shard, every source) and does not depend on the run seed.
    """
    q, r = n_windows // n_subset, n_windows % n_subset
    start = i * q + np.minimum(i, r)
    width = q + (i < r).astype(np.uint64)
    key = _mix64(_mix64(np.uint64(_SUBSET_SEED) ^ domain) ^ i)
    return start + key % width


# --------------------------------------------------------------------------- weights


def _water_fill(weights: np.ndarray, room: np.ndarray, budget: float) -> np.ndarray:
    """min(room, λ·weights) with λ chosen so the sum is `budget`, or every weighted domain at its room.

    Domains that would pass their room are pinned there and the rest is re-spread in proportion to the
    remaining weights, until none passes. Shapes (k,).
    """
    pinned = np.zeros(weights.shape, dtype=bool)
    while True:
        free = ~pinned & (weights > 0)
        mass = math.fsum(weights[free])
        left = budget - math.fsum(room[pinned])
        if mass <= 0 or left <= 0:
            return np.where(pinned, room, 0.0)
        trial = np.zeros_like(weights)
        trial[free] = weights[free] / mass * left  # w/mass <= 1 on the free domains: no overflow for tiny masses
        over = free & (trial > room)
        if not over.any():
            return np.where(pinned, room, trial)
        pinned |= over


def _apply_floor(p: np.ndarray, caps: np.ndarray, floor: float) -> np.ndarray:
    """max(f, μ·p) with μ <= 1 chosen so the sum is 1; f = min(floor, cap) for non-exhausted domains.

    Shrinking the others (μ <= 1) can only move them further below their caps, so caps still hold.
    """
    f = np.where(caps > 0, np.minimum(floor, caps), 0.0)
    raised = p < f
    while True:
        mass = math.fsum(p[~raised])
        mu = (1.0 - math.fsum(f[raised])) / mass if mass > 0 else 0.0
        more = ~raised & (mu * p < f)
        if not more.any():
            return np.where(raised, f, mu * p)
        raised |= more


def _checked_weights(weights: Sequence[float] | np.ndarray, k: int | None, what: str) -> np.ndarray:
    """Weights as a new float64 (k,) array, finite, >= 0, positive sum (ConfigError otherwise); not normalised.

    The sampler stores weights exactly as given and normalises them only inside `cap_weights`:
    normalising twice can move the last bit, and a restored schedule must reproduce every bit.
    """
    w = np.array(weights, dtype=np.float64)
    if w.ndim != 1 or (k is not None and w.size != k):
        raise ValueError(f"{what} must be a 1-D vector of {k if k is not None else 'k'} weights, got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ConfigError(f"{what} must be finite and >= 0, got {w.tolist()}")
    if math.fsum(w) <= 0:
        raise ConfigError(f"{what} must have a positive sum, got {w.tolist()}")
    return w


def cap_weights(
    weights: Sequence[float] | np.ndarray, caps: Sequence[float] | np.ndarray, floor: float = 0.0
) -> np.ndarray:
    """The sampling distribution ŵ: `weights` capped at `caps`, then floored. float64 (k,), sums to 1.

    weights: the update state w (normalised here). caps: the largest share of a batch each domain may
    take (its remaining allowance / B; 0 = exhausted); they must sum to >= 1. Capped domains' excess is
    redistributed to the others in proportion to their weights (water-filling until no cap is
    violated); if the weighted domains cannot absorb it all, the rest is spread evenly over the domains
    with room left. Then every non-exhausted domain gets at least min(floor, cap), the others shrinking
    proportionally. Exhausted domains get 0.
    """
    w = _checked_weights(weights, None, "weights")
    w = w / math.fsum(w)
    c = np.asarray(caps, dtype=np.float64)
    if c.shape != w.shape or not np.all(np.isfinite(c)) or np.any(c < 0):
        raise ValueError(f"caps must be finite, >= 0 and of shape {w.shape}, got {c.tolist()}")
    if math.fsum(c) < 1.0 - 1e-12:
        raise DataExhausted(f"the domains' caps sum to {math.fsum(c):.6g} < 1: not enough data left for one batch")
    if not 0.0 <= floor <= 1.0 / w.size:
        raise ConfigError(f"the sampling floor must be in [0, 1/k] = [0, {1.0 / w.size:.4g}], got {floor}")
    out = _water_fill(w, c, 1.0)
    short = 1.0 - math.fsum(out)
    if short > 1e-12:
        room = c - out
        out = out + _water_fill((room > 0).astype(np.float64), room, short)
    if floor > 0:
        out = _apply_floor(out, c, floor)
    return out / math.fsum(out)


def _quantize(w_hat: np.ndarray, batch: int, cap_units: np.ndarray) -> np.ndarray:
    """ŵ·B on the 2**-32 grid: int64 (k,) units summing to exactly B·_Q, none above `cap_units`.

    Floors first, then one unit each to the largest fractional parts (ties: lower index) among the
    domains below their cap; the caps sum to >= B·_Q, so there is always room.
    """
    target = w_hat * float(batch * _Q)
    x = np.minimum(np.floor(target).astype(np.int64), cap_units)
    short = batch * _Q - int(x.sum())
    frac = target - np.floor(target)
    idx = np.arange(x.size)
    if short > 0:
        order = np.lexsort((idx, -frac))
        order = order[x[order] < cap_units[order]]
        x[order[:short]] += 1
    elif short < 0:  # only from float rounding of a sum just above 1: take from the smallest fractions
        order = np.lexsort((idx, frac))
        order = order[x[order] > 0]
        x[order[:-short]] -= 1
    return x


def _quotas(owed: np.ndarray, x: np.ndarray, batch: int) -> np.ndarray:
    """Samples per domain for one step: int64 (k,) summing to `batch`.

    owed: a_d = E_d(t) − C_d(t−1); x: this step's expectation x_d; both int64 (k,) in units of 1/_Q.
    floor(a_d) clipped at 0, then the missing samples by earliest deadline (see the module docstring);
    if the floors overshoot, take back where the deficit stays smallest.
    """
    q = np.maximum(owed >> 32, 0)  # floor(a_d) (arithmetic shift = floor division by _Q), at least 0
    residual = owed - (q << 32)  # (k,) what stays owed, in units; in [0, _Q) unless a_d < 0
    short = batch - int(q.sum())
    if short > 0:
        # At least `short` residuals are positive (they sum to >= short·_Q); only those are eligible,
        # so nobody gets more than ceil(a_d). Deadline: steps until the deficit reaches one sample;
        # a deficit with no share never grows (1e300), the ineligible come last (inf).
        positive = residual > 0
        deadline = np.where(positive & (x > 0), (_Q - residual) / np.maximum(x, 1),
                            np.where(positive, 1e300, np.inf))
        q[np.argsort(deadline, kind="stable")[:short]] += 1  # stable: ties go to the lower index
    for _ in range(-short):
        d = int(np.argmin(np.where(q > 0, residual, np.iinfo(np.int64).max)))
        q[d] -= 1
        residual[d] += _Q
    return q


# --------------------------------------------------------------------------- public API


def rank_slice(global_batch: int, rank: int, world_size: int, micro_index: int = 0, n_micro: int = 1) -> slice:
    """The rows of a global batch that rank `rank` feeds in micro-batch `micro_index`.

    Rank r owns the contiguous block r of B / world_size rows, and micro-batch j its contiguous
    sub-block j, so the token stream of a step does not depend on world size or accumulation count.
    """
    if world_size < 1 or n_micro < 1:
        raise ConfigError(f"world size and micro-batch count must be >= 1, got {world_size} and {n_micro}")
    if global_batch < 1 or global_batch % (world_size * n_micro):
        raise ConfigError(
            f"train.batch_size {global_batch} must be a positive multiple of world size x micro-batches = "
            f"{world_size} x {n_micro} = {world_size * n_micro}; change the batch size, the number of "
            f"processes or the micro-batch size"
        )
    if not (0 <= rank < world_size and 0 <= micro_index < n_micro):
        raise ValueError(
            f"rank {rank} / micro-batch {micro_index} outside world size {world_size} / {n_micro} micro-batches"
        )
    micro = global_batch // (world_size * n_micro)
    start = (rank * n_micro + micro_index) * micro
    return slice(start, start + micro)


@dataclass(frozen=True)
class Plan:
    """The global batch of one step. Arrays are read-only (plans are cached and shared)."""

    step: int
    domains: np.ndarray  # int64 (B,): domain of each sequence, in batch order
    windows: np.ndarray  # int64 (B,): window index inside that domain's train windows
    counts: np.ndarray  # int64 (k,): sequences of each domain in this step
    sampling_weights: np.ndarray  # float64 (k,): ŵ at this step
    consumed_after: np.ndarray  # int64 (k,): cumulative draws per domain through this step


@dataclass
class _Cursor:
    """State before step `step`: cumulative draws C (int64 (k,)) and excess C·_Q − E (int64 (k,), units)."""

    step: int
    counts: np.ndarray
    excess: np.ndarray


class MixtureSampler:
    """Plans every global batch from (seed, weight schedule, step); see the module docstring.

    windows_per_domain: training windows W_d of each domain (the whole corpus, before subsampling).
    max_repetition: epochs of its (subsampled) windows a domain may be drawn; floor: minimum ŵ of a
    non-exhausted domain (<= 1/k); subsample: keep a fixed stratified fraction p of each domain's windows
    (ceil(p·W_d) of them), chosen independently of `seed`; epochs and allowances then count subset
    windows, while `Plan.windows` always indexes the full domain. tokens_per_window, if given, lets
    error messages speak in tokens.
    """

    def __init__(
        self,
        seed: int,
        global_batch: int,
        windows_per_domain: Sequence[int],
        initial_weights: Sequence[float],
        max_repetition: float = 1.0,
        floor: float = 0.0,
        subsample: float = 1.0,
        names: Sequence[str] | None = None,
        tokens_per_window: int | None = None,
    ):
        windows = [int(w) for w in windows_per_domain]
        k = len(windows)
        if k == 0:
            raise ConfigError("the mixture needs at least one domain")
        self.names = [f"domain{d}" for d in range(k)] if names is None else [str(n) for n in names]
        if len(self.names) != k:
            raise ValueError(f"{len(self.names)} names for {k} domains")
        for name, w in zip(self.names, windows):
            if w < 1:
                raise DataError(
                    f"domain '{name}' has {w} training windows: it holds fewer tokens than one sequence "
                    f"(data.seq_len + 1); add data to it, lower data.seq_len, or remove the domain"
                )
            if w > _MAX_WINDOWS:
                raise DataError(
                    f"domain '{name}' has {w} windows; the sampler supports at most {_MAX_WINDOWS} per domain"
                )
        if not 1 <= global_batch <= _MAX_BATCH:
            raise ConfigError(f"train.batch_size must be in [1, {_MAX_BATCH}], got {global_batch}")
        if not (math.isfinite(max_repetition) and max_repetition > 0):
            raise ConfigError(f"data.max_repetition must be a finite number > 0, got {max_repetition}")
        if not 0.0 <= floor <= 1.0 / k:
            raise ConfigError(
                f"mixing.sampling_floor {floor} is above 1/k = {1.0 / k:.4g} for {k} domains: the floors alone "
                f"would exceed the batch; lower it"
            )
        if not 0.0 < subsample <= 1.0:
            raise ConfigError(f"data.subsample must be in (0, 1], got {subsample}")
        if not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < 2**63:
            raise ConfigError(f"train.seed must be an integer in [0, 2**63), got {seed!r}")
        self.global_batch = int(global_batch)
        self.windows_per_domain = windows
        self.max_repetition = float(max_repetition)
        self.floor = float(floor)
        self.subsample = float(subsample)
        self.tokens_per_window = tokens_per_window
        # Windows each domain draws from (its subset) and how many draws it may make; exact decimal
        # arithmetic so that 0.29 x 100 is 29, not 28.
        frac = Fraction(repr(self.subsample))
        self.subset_sizes = np.array([max(1, math.ceil(frac * w)) for w in windows], dtype=np.int64)
        rep = Fraction(repr(self.max_repetition))
        self.allowance = np.array([math.floor(rep * m) for m in self.subset_sizes], dtype=np.int64)
        self._radix_a, self._radix_b = _radices(self.subset_sizes)  # (k,) Feistel radices per domain
        self._batch_radices = tuple(r[0] for r in _radices(np.array([self.global_batch])))
        self._schedule: list[tuple[int, np.ndarray]] = [(0, _checked_weights(initial_weights, k, "initial_weights"))]
        self._starts = [0]  # start steps of the schedule, for bisect
        self._set_seed(int(seed))
        self._reset_caches()

    # ----------------------------------------------------------------- schedule

    @property
    def k(self) -> int:
        return len(self.windows_per_domain)

    @property
    def seed(self) -> int:
        return self._seed

    @property
    def schedule(self) -> list[tuple[int, np.ndarray]]:
        """The weight schedule: (start_step, w) pairs, ascending start steps, w normalised (copies)."""
        return [(s, w / math.fsum(w)) for s, w in self._schedule]

    def weights_at(self, step: int) -> np.ndarray:
        """The update state w in effect at `step`, normalised (a copy)."""
        w = self._schedule_entry(step)[1]
        return w / math.fsum(w)

    def set_weights(self, start_step: int, w: Sequence[float] | np.ndarray) -> np.ndarray:
        """Make `w` the update state from `start_step` on; return ŵ at `start_step`.

        start_step must be >= the last start step and above every step already planned (`plan` was
        called for it), since the batches handed out must not change. An entry with the same start step
        as the last one replaces it. Raises DataExhausted if the data runs out before `start_step`.
        """
        start_step = int(start_step)
        last = self._schedule[-1][0]
        if start_step < last:
            raise ValueError(f"weights can only be appended: start step {start_step} is before the last one, {last}")
        if start_step <= self._planned_through:
            raise ValueError(
                f"step {start_step} was already planned (planned through step {self._planned_through}); "
                f"new weights must start at step {self._planned_through + 1} or later"
            )
        entry = (start_step, _checked_weights(w, self.k, "weights"))
        if start_step == last:
            self._schedule[-1] = entry
        else:
            self._schedule.append(entry)
            self._starts.append(start_step)
        # States before steps <= start_step only depend on earlier weights; drop everything later.
        self._weights_cache = {key: v for key, v in self._weights_cache.items() if key[0] != start_step}
        self._snapshots = {t: s for t, s in self._snapshots.items() if t <= start_step}
        if self._cursor.step > start_step:
            t0 = max(self._snapshots)
            self._cursor = _Cursor(t0, *(a.copy() for a in self._snapshots[t0]))
        cursor = self._state_before(start_step)
        return self._step_weights(start_step, cursor)[0].copy()

    # ----------------------------------------------------------------- planning

    def plan(self, step: int) -> Plan:
        """The global batch of step `step` (pure: same arguments, schedule and step, same plan)."""
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if step in self._plans:
            return self._plans[step]
        cursor = self._state_before(step)
        w_hat, x = self._step_weights(step, cursor)
        q = _quotas(x - cursor.excess, x, self.global_batch)
        k, B = self.k, self.global_batch
        # Slots in domain order: slot j of domain d is its draw number C_d + (j - first slot of d).
        base = np.repeat(np.arange(k, dtype=np.int64), q)  # (B,)
        first = np.cumsum(q) - q  # (k,)
        draw = cursor.counts[base] + (np.arange(B, dtype=np.int64) - first[base])  # (B,)
        windows = self._windows(base, draw)
        # Shuffle: slot j goes to batch position π(j), π a seeded bijection of range(B) keyed by (seed, t).
        keys = _round_keys(_mix64_int(self._shuffle_key ^ step))
        pos = _permute(np.arange(B, dtype=np.uint64), np.uint64(B), *self._batch_radices, keys).astype(np.int64)
        domains = np.empty(B, dtype=np.int64)
        domains[pos] = base
        out_windows = np.empty(B, dtype=np.int64)
        out_windows[pos] = windows
        after = cursor.counts + q
        self._advance(cursor, q, x)
        w_hat = w_hat.copy()  # may be the cached segment weights
        plan = Plan(step, domains, out_windows, q, w_hat, after)
        for a in (domains, out_windows, q, w_hat, after):
            a.setflags(write=False)
        self._planned_through = max(self._planned_through, step)
        self._plans = {s: p for s, p in self._plans.items() if s >= step - 1}  # keep the last two
        self._plans[step] = plan
        return plan

    def consumed(self, step: int) -> np.ndarray:
        """Draws per domain before `step` (steps 0 .. step-1), int64 (k,)."""
        return self._state_before(int(step)).counts.copy()

    def epochs(self, step: int) -> np.ndarray:
        """Epochs of its (subsampled) windows each domain has drawn before `step`, float64 (k,)."""
        return self.consumed(step) / self.subset_sizes

    # ----------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        """Seed and schedule (all the stream depends on), plus the constructor arguments to validate them."""
        return {
            "format": _STATE_FORMAT,
            "version": _STATE_VERSION,
            "seed": self._seed,
            "schedule": [[s, [float(v) for v in w]] for s, w in self._schedule],
            "global_batch": self.global_batch,
            "windows_per_domain": list(self.windows_per_domain),
            "max_repetition": self.max_repetition,
            "floor": self.floor,
            "subsample": self.subsample,
            "names": list(self.names),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Restore seed and schedule; CheckpointError if the state is malformed or from another setup."""
        if not isinstance(sd, dict) or sd.get("format") != _STATE_FORMAT or sd.get("version") != _STATE_VERSION:
            raise CheckpointError(
                f"the sampler state is not a {_STATE_FORMAT} v{_STATE_VERSION} state; "
                f"the checkpoint is corrupted or from another program version: start a new run"
            )
        mine = self.state_dict()
        for key in ("global_batch", "windows_per_domain", "max_repetition", "floor", "subsample", "names"):
            if sd.get(key) != mine[key]:
                raise CheckpointError(
                    f"the checkpoint's sampler was built with {key}={sd.get(key)!r}, this run has {mine[key]!r}; "
                    f"the token stream would differ. Resume with the checkpoint's data and config "
                    f"(the same prepared data, seq_len, batch size, max_repetition, sampling floor and subsample), "
                    f"or start a new run"
                )
        try:
            seed = int(sd["seed"])
            schedule = [(int(s), _checked_weights(w, self.k, "checkpoint weights")) for s, w in sd["schedule"]]
        except (KeyError, TypeError, ValueError, ConfigError) as e:
            raise CheckpointError(
                f"the sampler state's seed or schedule is malformed ({e}); the checkpoint is corrupted"
            ) from e
        starts = [s for s, _ in schedule]
        if not schedule or starts[0] != 0 or any(b <= a for a, b in zip(starts, starts[1:])):
            raise CheckpointError(
                f"the sampler schedule's start steps {starts} must begin at 0 and increase; the checkpoint is corrupted"
            )
        self._schedule = schedule
        self._starts = starts
        self._set_seed(seed)
        self._reset_caches()

    # ----------------------------------------------------------------- internals

    def _set_seed(self, seed: int) -> None:
        self._seed = seed
        self._shuffle_key = _mix64_int(seed ^ _TAG_SHUFFLE)
        # One key per domain; the epoch is mixed in per draw. uint64 (k,).
        self._domain_keys = np.array(
            [_mix64_int(_mix64_int(seed ^ _TAG_WINDOWS) + d * _GOLDEN) for d in range(self.k)], dtype=np.uint64)

    def _reset_caches(self) -> None:
        zeros = np.zeros(self.k, dtype=np.int64)
        self._cursor = _Cursor(0, zeros.copy(), zeros.copy())
        self._snapshots: dict[int, tuple[np.ndarray, np.ndarray]] = {0: (zeros.copy(), zeros.copy())}
        self._weights_cache: dict[tuple[int, bytes], tuple[np.ndarray, np.ndarray]] = {}
        self._plans: dict[int, Plan] = {}
        self._planned_through = -1

    def _schedule_entry(self, step: int) -> tuple[int, np.ndarray]:
        return self._schedule[bisect.bisect_right(self._starts, step) - 1]

    def _state_before(self, step: int) -> _Cursor:
        """The cursor moved to the state before `step`, from itself or the nearest snapshot, whichever is
        closer without passing `step`."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        # Nearest snapshot at or before `step`. Snapshots cover every multiple of _SNAPSHOT_EVERY up to
        # the furthest step computed so far (cursors only start at snapshots and never skip one).
        t0 = step - step % _SNAPSHOT_EVERY
        if t0 not in self._snapshots:
            t0 = max(self._snapshots)
        if self._cursor.step > step or self._cursor.step < t0:
            self._cursor = _Cursor(t0, *(a.copy() for a in self._snapshots[t0]))
        cursor = self._cursor
        B = self.global_batch
        while cursor.step < step:
            free_run = self._free_run_weights(cursor, step)
            if free_run is None:  # near a cap or exhaustion: the general path, one step
                x = self._step_weights(cursor.step, cursor)[1]
                self._advance(cursor, _quotas(x - cursor.excess, x, B), x)
                continue
            x, stop = free_run
            while cursor.step < stop:  # the hot loop of a resume: x fixed, no cap moves
                self._advance(cursor, _quotas(x - cursor.excess, x, B), x)
        return cursor

    def _free_run_weights(self, cursor: _Cursor, step: int) -> tuple[np.ndarray, int] | None:
        """(x, stop) if every step from the cursor up to `stop` (<= step) has the cursor step's caps, so
        the same ŵ and x; None if that cannot be shown for even one step.

        Holds inside one schedule segment while every domain is either done (cap 0: its x is 0, so its
        E and cap stay put) or has R_d >= B + 2k draws left (cap clamped to L, see `_cap_units`). Over n
        steps C_d grows by < n·x_d + k (C < E + 1, and E − C < k − 1 before), so R_d stays that large
        while n·x_d <= R_d − B − 3k.
        """
        i = bisect.bisect_right(self._starts, cursor.step) - 1
        seg_end = self._starts[i + 1] if i + 1 < len(self._starts) else step
        B, k = self.global_batch, self.k
        done = self._cap_units(cursor.step, cursor) == 0
        slack = (self.allowance - cursor.counts - (B + 3 * k)).astype(np.float64)  # (k,)
        if not np.all(done | (slack >= 0)):
            return None
        x = self._step_weights(cursor.step, cursor)[1]
        per_step = x / float(_Q)  # (k,) samples per step; 0 for the done domains
        live = per_step > 0
        room = np.floor(np.min(slack[live] / per_step[live])) - 1  # -1: float safety
        stop = int(min(step, seg_end, cursor.step + max(room, 0)))
        return (x, stop) if stop > cursor.step else None

    def _advance(self, cursor: _Cursor, q: np.ndarray, x: np.ndarray) -> None:
        """Apply one step's quotas to the cursor (in place) and snapshot on the grid."""
        cursor.counts += q
        cursor.excess += (q << 32) - x
        cursor.step += 1
        if cursor.step % _SNAPSHOT_EVERY == 0:
            self._snapshots[cursor.step] = (cursor.counts.copy(), cursor.excess.copy())

    def _step_weights(self, step: int, cursor: _Cursor) -> tuple[np.ndarray, np.ndarray]:
        """(ŵ float64 (k,), per-step expectation x int64 (k,) units) at `step`, given the state before it.

        A pure function of (w, caps); cached on their exact value, which repeats step after step while
        no cap moves (every domain either far from its allowance or done).
        """
        cap_units = self._cap_units(step, cursor)
        start, w = self._schedule_entry(step)
        key = (start, cap_units.tobytes())
        hit = self._weights_cache.get(key)
        if hit is None:
            w_hat = cap_weights(w, cap_units / float(self.global_batch * _Q), self.floor)
            hit = (w_hat, _quantize(w_hat, self.global_batch, cap_units))
            if len(self._weights_cache) >= 64:
                self._weights_cache.pop(next(iter(self._weights_cache)))
            self._weights_cache[key] = hit
        return hit

    def _cap_units(self, step: int, cursor: _Cursor) -> np.ndarray:
        """min(A − E(t−1), L) in units, int64 (k,): allowance left over the expectation so far.

        L = B + k + 1 samples, far above any share: the clamp keeps int64 safe for huge allowances and
        makes the caps of domains far from their allowance exactly constant (cacheable). With
        R = A − C >= B + 2k the unclamped value is > L (C − E > −(k − 1)), so it is computed exactly only
        below that. DataExhausted when the draws left cannot fill a batch.
        """
        B, k = self.global_batch, self.k
        remaining = self.allowance - cursor.counts  # (k,) draws left
        if int(remaining.sum()) < B:
            raise self._exhausted(step, cursor.counts)
        return np.minimum(np.minimum(remaining, B + 2 * k) * _Q + cursor.excess, (B + k + 1) * _Q)

    def _windows(self, domain: np.ndarray, draw: np.ndarray) -> np.ndarray:
        """Window index (in the full domain) of draw number `draw` of `domain`; int64 (n,) -> int64 (n,).

        Draws must come grouped by domain with increasing draw numbers (as `plan` lays them out), so the
        (domain, epoch) pairs form a few contiguous runs and the keys are derived once per run.
        """
        m = self.subset_sizes[domain].astype(np.uint64)  # (n,)
        n = draw.astype(np.uint64)
        epoch = n // m
        cut = np.flatnonzero((np.diff(domain) != 0) | (np.diff(epoch) != 0)) + 1
        first = np.concatenate(([0], cut))  # (runs,) first element of each (domain, epoch) run
        run_keys = _mix64(self._domain_keys[domain[first]] ^ (epoch[first] * np.uint64(_GOLDEN)))
        lengths = np.diff(np.append(first, domain.size))
        keys = [np.repeat(rk, lengths) for rk in _round_keys(run_keys)]
        local = _permute(n % m, m, self._radix_a[domain], self._radix_b[domain], keys)
        if self.subsample < 1.0:
            W = np.asarray(self.windows_per_domain, dtype=np.uint64)[domain]
            local = _subset_window(local, W, m, domain.astype(np.uint64))
        return local.astype(np.int64)

    def _exhausted(self, step: int, counts: np.ndarray) -> DataExhausted:
        parts = []
        for name, c, a, m in zip(self.names, counts, self.allowance, self.subset_sizes):
            size = f"{c:,} windows" if self.tokens_per_window is None else f"{c * self.tokens_per_window:,} tokens"
            parts.append(f"{name}: {size} = {c / m:.2f} epochs (allowance {a:,} windows)")
        left = int((self.allowance - counts).sum())
        return DataExhausted(
            f"data exhausted at step {step}: a batch needs {self.global_batch} sequences but only {left} remain within "
            f"max_repetition={self.max_repetition:g} epochs per domain. Drawn so far: {'; '.join(parts)}. "
            f"Lower --train.steps to at most {step}, or raise --data.max_repetition to repeat the data"
        )
