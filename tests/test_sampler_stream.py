"""The sampler's token stream is frozen: every plan of tests/data/sampler_plans.json, recorded with the
sampler of commit 82a2070 (before its pure recurrence moved to velocitune/quota.py and
velocitune/permutation.py, issue 26), must come out again bit for bit.

The scenarios cover what the stream depends on: a constant mixture, weight changes mid-run and on
consecutive steps, zero weights, caps binding until the data is exhausted (with a floor), a subsample,
and a run crossing the 1,024-step snapshot. The fixture also keeps each scenario's final `state_dict` as
the old code wrote it: a checkpoint of that version must load and replay the same plans.

Re-record (only when the stream changes on purpose, which breaks every resume of older checkpoints):
    PYTHONPATH=. python tests/test_sampler_stream.py
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from velocitune.errors import DataExhausted
from velocitune.sampler import MixtureSampler

FIXTURE = Path(__file__).parent / "data" / "sampler_plans.json"


def _scenarios() -> dict[str, dict]:
    """name -> {args: MixtureSampler kwargs, steps, changes: {start_step: w}} (all JSON-safe)."""
    rng = np.random.default_rng(2024)
    zeros_ok = [[int(v) for v in rng.integers(0, 4, 6)] for _ in range(40)]
    zeros_ok = [w if sum(w) else [1] * 6 for w in zeros_ok]
    return {
        "constant": dict(args=dict(seed=0, global_batch=8, windows_per_domain=[5000, 5000, 5000],
                                   initial_weights=[0.5, 0.3, 0.2]), steps=200, changes={}),
        "changes_and_zeros": dict(
            args=dict(seed=11, global_batch=5, windows_per_domain=[2000] * 6, initial_weights=[3, 3, 1, 1, 1, 1]),
            steps=200, changes={str(t): zeros_ok[i] for i, t in enumerate(range(20, 200, 5))}),
        "caps_to_exhaustion": dict(
            args=dict(seed=3, global_batch=16, windows_per_domain=[400, 90, 2500, 60],
                      initial_weights=[0.1, 0.5, 0.2, 0.2], max_repetition=1.5, floor=0.03),
            steps=10**6, changes={str(t): rng.dirichlet(np.ones(4) * 0.7).tolist() for t in (30, 31, 90, 150, 240)}),
        "subsample": dict(
            args=dict(seed=2**40 + 5, global_batch=6, windows_per_domain=[1000, 37, 5, 300],
                      initial_weights=[0.4, 0.3, 0.2, 0.1], max_repetition=3.0, subsample=0.3, floor=0.02),
            steps=10**6, changes={str(t): rng.dirichlet(np.ones(4)).tolist() for t in (10, 25, 60)}),
        "past_a_snapshot": dict(
            args=dict(seed=7, global_batch=2, windows_per_domain=[3000, 700, 9000],
                      initial_weights=[0.2, 0.5, 0.3], max_repetition=1.0),
            steps=1100, changes={str(t): rng.dirichlet(np.ones(3)).tolist() for t in (400, 1023, 1025)}),
    }


def _play(scenario: dict) -> tuple[MixtureSampler, list, int | None]:
    """Plan steps in order as train.py does (weights set just before their step); stop at DataExhausted."""
    s = MixtureSampler(**scenario["args"])
    changes = {int(t): w for t, w in scenario["changes"].items()}
    plans, exhausted_at = [], None
    for t in range(scenario["steps"]):
        if t in changes:
            s.set_weights(t, changes[t])
        try:
            plans.append(s.plan(t))
        except DataExhausted:
            exhausted_at = t
            break
    return s, plans, exhausted_at


def _record(plan) -> list:
    """One plan as JSON: [domains, windows, counts, digest of ŵ's float64 bytes (exact), consumed_after]."""
    w_hat = hashlib.blake2b(np.ascontiguousarray(plan.sampling_weights, dtype="<f8").tobytes(), digest_size=8)
    return [plan.domains.tolist(), plan.windows.tolist(), plan.counts.tolist(), w_hat.hexdigest(),
            plan.consumed_after.tolist()]


def _recorded() -> dict:
    return json.loads(FIXTURE.read_text())


@pytest.mark.parametrize("name", sorted(_scenarios()))
def test_every_plan_equals_the_recorded_stream(name):
    want = _recorded()[name]
    sampler, plans, exhausted_at = _play(_scenarios()[name])
    assert exhausted_at == want["exhausted_at"]
    assert len(plans) == len(want["plans"])
    for t, (plan, rec) in enumerate(zip(plans, want["plans"])):
        assert _record(plan) == rec, f"{name}: step {t} differs from the recorded stream"
    assert sampler.state_dict() == want["state_dict"]


@pytest.mark.parametrize("name", sorted(_scenarios()))
def test_an_old_checkpoint_loads_and_replays_the_recorded_stream(name):
    want = _recorded()[name]
    args = _scenarios()[name]["args"]
    resumed = MixtureSampler(**{**args, "seed": 99, "initial_weights": [1.0] * len(args["windows_per_domain"])})
    resumed.load_state_dict(want["state_dict"])  # written by the old code
    n = len(want["plans"])
    rng = np.random.default_rng(0)
    for t in sorted(set(rng.integers(0, n, 12).tolist()) | {0, n - 1}, reverse=True):  # random access, backwards
        assert _record(resumed.plan(t)) == want["plans"][t], f"{name}: step {t} after load_state_dict"
    if want["exhausted_at"] is not None:
        with pytest.raises(DataExhausted):
            resumed.plan(want["exhausted_at"])


def _write() -> None:
    out = {}
    for name, scenario in _scenarios().items():
        sampler, plans, exhausted_at = _play(scenario)
        out[name] = {"exhausted_at": exhausted_at, "state_dict": sampler.state_dict(),
                     "plans": [_record(p) for p in plans]}
        print(f"{name}: {len(plans)} plans, exhausted at {exhausted_at}")
    FIXTURE.write_text(json.dumps(out, separators=(",", ":")) + "\n")
    print(f"wrote {FIXTURE} ({FIXTURE.stat().st_size:,} bytes)")


if __name__ == "__main__":
    sys.exit(_write())
