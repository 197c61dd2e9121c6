"""The mixture sampler: which domain and which training window fills every slot of every global batch.

`MixtureSampler.plan(t)` is a pure function of (seed, weight schedule, t) and the constructor arguments
(docs/design.md §6 rule 5), so a resumed or re-sharded run sees exactly the token stream of an uninterrupted one.
Numpy only, no torch, no file I/O.

The maths lives in two stateless modules; this one holds the schedule and the caches around them:

1. **Quotas** (`velocitune.quota`): the weight schedule is an append-only list of `(start_step, w)`; step
   t's quotas (how many sequences of each domain, exact integers summing to B, cumulative counts within
   one sample of Σ ŵ·B, caps from `max_repetition`) follow from `w` and the state before t by
   `quota.step_quotas`. Its guarantees are listed in that module's docstring.
2. **Order and windows** (`velocitune.permutation`): the B domain ids are shuffled by a seeded
   permutation keyed by (seed, t); the n-th draw of domain d is window perm_{seed,d,epoch}(n mod W_d).

Cost: the quotas of step t depend on all earlier steps. The sampler keeps the state before the next
step (a cursor: sequential use costs O(k + B) per step), a snapshot every 1,024 steps (random access
replays at most 1,024 steps), ŵ per (schedule entry, caps) (it repeats while no cap moves) and the last
two plans. A resume replays the quotas from step 0, recomputing ŵ only where a cap moves: ~25 µs per
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
from velocitune.permutation import batch_positions, domain_keys, draw_windows, radices, shuffle_key
from velocitune.quota import UNIT, cap_units, cap_weights, check_weights, quantize, quotas

__all__ = ["MixtureSampler", "Plan", "cap_weights", "rank_slice"]

_MAX_BATCH = 1 << 20  # keeps B·UNIT + slack inside float64's exact integers (2**53)
_MAX_WINDOWS = 1 << 32  # per domain; keeps the stratified-subset arithmetic inside uint64
_SNAPSHOT_EVERY = 1024
_STATE_FORMAT = "velocitune-sampler"
_STATE_VERSION = 1

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
    """State before step `step`: cumulative draws C (int64 (k,)) and excess C·UNIT − E (int64 (k,), units)."""

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
        self._subset_radices = radices(self.subset_sizes)  # two uint64 (k,): Feistel radices per domain
        self._batch_radices = tuple(r[0] for r in radices(np.array([self.global_batch])))
        self._schedule: list[tuple[int, np.ndarray]] = [(0, check_weights(initial_weights, k, "initial_weights"))]
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
        entry = (start_step, check_weights(w, self.k, "weights"))
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
        # quota.step_quotas, with ŵ and x from the cache: owed a = E(t) − C(t−1) = x − excess.
        w_hat, x = self._step_weights(step, cursor)
        q = quotas(x - cursor.excess, x, self.global_batch)  # (k,)
        k, B = self.k, self.global_batch
        # Slots in domain order: slot j of domain d is its draw number C_d + (j - first slot of d).
        base = np.repeat(np.arange(k, dtype=np.int64), q)  # (B,)
        first = np.cumsum(q) - q  # (k,)
        draw = cursor.counts[base] + (np.arange(B, dtype=np.int64) - first[base])  # (B,)
        windows = self._windows(base, draw)
        # Shuffle: slot j goes to batch position π(j), π a seeded bijection of range(B) keyed by (seed, t).
        pos = batch_positions(self._shuffle_key, step, B, self._batch_radices)  # (B,)
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
            schedule = [(int(s), check_weights(w, self.k, "checkpoint weights")) for s, w in sd["schedule"]]
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
        self._shuffle_key = shuffle_key(seed)
        self._domain_keys = domain_keys(seed, self.k)  # uint64 (k,); the epoch is mixed in per draw

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
                self._advance(cursor, quotas(x - cursor.excess, x, B), x)
                continue
            x, stop = free_run
            while cursor.step < stop:  # the hot loop of a resume: x fixed, no cap moves
                self._advance(cursor, quotas(x - cursor.excess, x, B), x)
        return cursor

    def _free_run_weights(self, cursor: _Cursor, step: int) -> tuple[np.ndarray, int] | None:
        """(x, stop) if every step from the cursor up to `stop` (<= step) has the cursor step's caps, so
        the same ŵ and x; None if that cannot be shown for even one step.

        Holds inside one schedule segment while every domain is either done (cap 0: its x is 0, so its
        E and cap stay put) or has R_d >= B + 2k draws left (cap clamped to L, see `quota.cap_units`). Over n
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
        per_step = x / float(UNIT)  # (k,) samples per step; 0 for the done domains
        live = per_step > 0
        room = np.floor(np.min(slack[live] / per_step[live])) - 1  # -1: float safety
        stop = int(min(step, seg_end, cursor.step + max(room, 0)))
        return (x, stop) if stop > cursor.step else None

    def _advance(self, cursor: _Cursor, q: np.ndarray, x: np.ndarray) -> None:
        """Apply one step's quotas to the cursor (in place) and snapshot on the grid."""
        cursor.counts += q
        cursor.excess += (q << 32) - x  # C·UNIT − E grows by q·UNIT − x
        cursor.step += 1
        if cursor.step % _SNAPSHOT_EVERY == 0:
            self._snapshots[cursor.step] = (cursor.counts.copy(), cursor.excess.copy())

    def _step_weights(self, step: int, cursor: _Cursor) -> tuple[np.ndarray, np.ndarray]:
        """(ŵ float64 (k,), per-step expectation x int64 (k,) units) at `step`, given the state before it.

        A pure function of (w, caps); cached on their exact value, which repeats step after step while
        no cap moves (every domain either far from its allowance or done).
        """
        caps = self._cap_units(step, cursor)  # (k,) units
        start, w = self._schedule_entry(step)
        key = (start, caps.tobytes())
        hit = self._weights_cache.get(key)
        if hit is None:
            w_hat = cap_weights(w, caps / float(self.global_batch * UNIT), self.floor)
            hit = (w_hat, quantize(w_hat, self.global_batch, caps))
            if len(self._weights_cache) >= 64:
                self._weights_cache.pop(next(iter(self._weights_cache)))
            self._weights_cache[key] = hit
        return hit

    def _cap_units(self, step: int, cursor: _Cursor) -> np.ndarray:
        """`quota.cap_units` at the cursor, int64 (k,) units; DataExhausted (naming every domain's draws)
        when the draws left cannot fill a batch."""
        if int((self.allowance - cursor.counts).sum()) < self.global_batch:
            raise self._exhausted(step, cursor.counts)
        return cap_units(self.allowance, cursor.counts, cursor.excess, self.global_batch)

    def _windows(self, domain: np.ndarray, draw: np.ndarray) -> np.ndarray:
        """Window index (in the full domain) of draw number `draw` of `domain`; int64 (n,) -> int64 (n,).

        Draws must come grouped by domain with increasing draw numbers, as `plan` lays them out
        (`permutation.draw_windows`).
        """
        full = np.asarray(self.windows_per_domain, dtype=np.int64) if self.subsample < 1.0 else None
        return draw_windows(domain, draw, self._domain_keys, self.subset_sizes, self._subset_radices, full)

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
