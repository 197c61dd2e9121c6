"""Tests for velocitune.permutation: seeded bijections, the batch order and the window streams, alone."""

from __future__ import annotations

import math

import numpy as np
import pytest

from velocitune.permutation import (
    batch_positions,
    domain_keys,
    draw_windows,
    mix64,
    mix64_int,
    permute,
    radices,
    round_keys,
    shuffle_key,
    subset_window,
)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 1000, 4097])
def test_feistel_permutation_is_a_bijection(n):
    a, b = (r[0] for r in radices(np.array([n])))
    for key in (0, 1, 2**63 + 5):
        p = permute(np.arange(n, dtype=np.uint64), np.uint64(n), a, b, round_keys(key))
        assert sorted(p.tolist()) == list(range(n))
    if n >= 17:
        assert p.tolist() != list(range(n))


def test_radices_are_a_near_square_just_above_the_size():
    sizes = np.array([1, 2, 10, 99, 100, 101, 4097, 10**9 + 7])
    a, b = radices(sizes)
    for n, ai, bi in zip(sizes.tolist(), a.tolist(), b.tolist()):
        assert ai == max(1, math.isqrt(n - 1) + 1) and 0 <= ai * bi - n < ai


def test_mix64_matches_its_scalar_twin():
    z = np.array([0, 1, 2**63, 2**64 - 1, 0x9E3779B97F4A7C15], dtype=np.uint64)
    assert mix64(z).tolist() == [mix64_int(int(v)) for v in z.tolist()]
    assert mix64_int(0) == 0 and mix64_int(1) != 1


def test_per_element_keys_and_sizes_permute_each_element_in_its_own_range():
    # Two interleaved domains of sizes 7 and 11, each with its own keys: per-element arguments.
    sizes = np.array([7, 11], dtype=np.uint64)
    a, b = radices(sizes.astype(np.int64))
    dom = np.array([0] * 7 + [1] * 11)
    i = np.concatenate([np.arange(7), np.arange(11)]).astype(np.uint64)
    keys = round_keys(np.array([5, 9], dtype=np.uint64)[dom])
    out = permute(i, sizes[dom], a[dom], b[dom], keys)
    assert sorted(out[:7].tolist()) == list(range(7)) and sorted(out[7:].tolist()) == list(range(11))
    alone_keys = round_keys(np.full(11, 9, dtype=np.uint64))
    alone = permute(np.arange(11, dtype=np.uint64), np.uint64(11), a[1], b[1], alone_keys)
    assert out[7:].tolist() == alone.tolist()  # the same bijection whether batched with another domain or not


def test_batch_positions_are_a_permutation_that_changes_with_step_and_seed():
    B = 64
    rad = tuple(r[0] for r in radices(np.array([B])))
    p0 = batch_positions(shuffle_key(0), 0, B, rad)
    assert p0.dtype == np.int64 and sorted(p0.tolist()) == list(range(B))
    assert p0.tolist() != batch_positions(shuffle_key(0), 1, B, rad).tolist()
    assert p0.tolist() != batch_positions(shuffle_key(1), 0, B, rad).tolist()
    assert p0.tolist() == batch_positions(shuffle_key(0), 0, B, rad).tolist()  # pure


def test_draw_windows_cover_every_window_once_per_epoch():
    sizes = np.array([7, 13, 50], dtype=np.int64)
    keys = domain_keys(3, 3)
    assert len(set(keys.tolist())) == 3  # independent streams per domain
    rad = radices(sizes)
    # Draws grouped by domain with increasing draw numbers, as the sampler lays them out: 3 epochs each.
    dom = np.repeat(np.arange(3), 3 * sizes)
    draw = np.concatenate([np.arange(3 * m) for m in sizes.tolist()])
    win = draw_windows(dom, draw, keys, sizes, rad, None)
    for d, m in enumerate(sizes.tolist()):
        epochs = win[dom == d].reshape(3, m)
        assert all(sorted(e.tolist()) == list(range(m)) for e in epochs)
        if m >= 13:
            assert len({tuple(e) for e in epochs}) == 3  # reshuffled every epoch
    # Random access: a later slice of draws gives the same windows as the full sequence.
    again = draw_windows(np.full(5, 2), np.arange(60, 65), keys, sizes, rad, None)
    assert again.tolist() == win[dom == 2][60:65].tolist()


def test_subset_window_picks_one_window_per_stratum_whatever_the_seed():
    W, m = np.uint64(1003), np.uint64(100)  # strata of 11 (the first 3) and 10 windows
    i = np.arange(100, dtype=np.uint64)
    got = subset_window(i, np.full(100, W), np.full(100, m), np.zeros(100, dtype=np.uint64)).tolist()
    starts = [j * 10 + min(j, 3) for j in range(101)]
    assert all(starts[j] <= w < starts[j + 1] for j, w in enumerate(got))
    # Through draw_windows: the subset does not depend on the run seed (proxy runs share it).
    sizes = np.array([100], dtype=np.int64)
    one = [sorted(draw_windows(np.zeros(100, dtype=np.int64), np.arange(100), domain_keys(seed, 1), sizes,
                               radices(sizes), np.array([1003])).tolist()) for seed in (0, 1)]
    assert one[0] == one[1] == sorted(got)
