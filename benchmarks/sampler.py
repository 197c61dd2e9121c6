"""Benchmark: what the mixture sampler costs per step, next to the training step it feeds.

(a) plan: sequential `MixtureSampler.plan` of global batches of 1,024 sequences over 20 domains of 10^8
    windows each, with a weight update every 100 steps (target <= 1 ms per step); and a resume: a fresh
    sampler replaying 100,000 steps of that schedule from scratch (`consumed(100_000)`).
(b) assemble: plan + gather the (32, 1025) int64 batch from memmapped uint16 token shards with
    `velocitune.shards.DomainTokens.windows` (as train.py does), next to one training step (forward +
    backward + AdamW, fp32, CPU, torch threads = 1) of the demo-size LlamaForCausalLM on that batch.
    Target: assembly < 5 % of the step. The shards were just written, so the page cache is warm.
Everything runs in one process, side by side, because the machine is shared and noisy. Prints a table
and writes benchmarks/results/sampler.json.

    python benchmarks/sampler.py [--plan-steps 2000] [--replay-steps 100000] [--train-steps 2]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from results_file import save  # noqa: E402

from velocitune.sampler import MixtureSampler  # noqa: E402

# Demo model and batch (the lead may change the demo size: keep these in step with it).
VOCAB = 8192
HIDDEN = 128
LAYERS = 4
HEADS = 4
INTERMEDIATE = 512
SEQ_LEN = 1024
BATCH = 32
# Planning workload.
PLAN_BATCH = 1024
PLAN_DOMAINS = 20
PLAN_WINDOWS = 10**8
UPDATE_EVERY = 100
# Token files for (b).
DATA_DOMAINS = 4
SHARDS_PER_DOMAIN = 2
TOKENS_PER_SHARD = 1_500_000


def schedule(steps: int, k: int, seed: int = 0) -> list[list]:
    """A weight schedule with a new Dirichlet draw every UPDATE_EVERY steps: [[start, w], ...]."""
    rng = np.random.default_rng(seed)
    return [[s, rng.dirichlet(np.ones(k)).tolist()] for s in range(0, steps, UPDATE_EVERY)]


def bench_plan(steps: int, replay_steps: int) -> dict:
    k = PLAN_DOMAINS
    sched = schedule(max(steps, replay_steps), k)

    def fresh() -> MixtureSampler:
        s = MixtureSampler(0, PLAN_BATCH, [PLAN_WINDOWS] * k, sched[0][1])
        sd = s.state_dict()
        sd["schedule"] = sched
        s.load_state_dict(sd)
        return s

    sampler = fresh()
    times = []
    for t in range(steps):
        t0 = time.perf_counter()
        sampler.plan(t)
        times.append(time.perf_counter() - t0)
    replay = fresh()
    t0 = time.perf_counter()
    replay.consumed(replay_steps)
    replay_s = time.perf_counter() - t0
    # Random access: one plan at a random step, from the nearest snapshot (<= 1,023 steps replayed).
    rng = np.random.default_rng(1)
    t0 = time.perf_counter()
    for t in rng.integers(0, replay_steps, 20):
        replay.plan(int(t))
    random_s = (time.perf_counter() - t0) / 20
    return {
        "global_batch": PLAN_BATCH, "domains": k, "windows_per_domain": PLAN_WINDOWS, "update_every": UPDATE_EVERY,
        "plan_ms_mean": 1e3 * statistics.fmean(times), "plan_ms_median": 1e3 * statistics.median(times),
        "replay_steps": replay_steps, "replay_s": replay_s, "replay_us_per_step": 1e6 * replay_s / replay_steps,
        "random_access_ms": 1e3 * random_s,
    }


def write_shards(root: Path) -> dict:
    from velocitune.shards import DomainTokens, write_shard

    rng = np.random.default_rng(0)
    domains = {}
    for d in range(DATA_DOMAINS):
        paths = [write_shard(root / f"d{d}_{i}.bin", rng.integers(0, VOCAB, TOKENS_PER_SHARD, dtype=np.uint16),
                             np.uint16) for i in range(SHARDS_PER_DOMAIN)]
        domains[d] = DomainTokens(paths)
    return domains


def assemble(domains: dict, plan) -> np.ndarray:
    """The planned windows as one int64 (B, L+1) batch, one gather per domain."""
    batch = np.empty((len(plan.domains), SEQ_LEN + 1), dtype=np.int64)
    for d in np.unique(plan.domains):
        rows = np.flatnonzero(plan.domains == d)
        batch[rows] = domains[int(d)].windows(plan.windows[rows], SEQ_LEN)
    return batch


def bench_assembly(root: Path, steps: int) -> tuple[dict, np.ndarray]:
    domains = write_shards(root)
    windows = [domains[d].n_windows(SEQ_LEN) for d in range(DATA_DOMAINS)]
    sampler = MixtureSampler(0, BATCH, windows, [0.4, 0.3, 0.2, 0.1])
    import torch

    times = []
    for t in range(steps):
        t0 = time.perf_counter()
        batch = torch.from_numpy(assemble(domains, sampler.plan(t)))
        times.append(time.perf_counter() - t0)
    return {"assembly_ms_mean": 1e3 * statistics.fmean(times), "assembly_ms_median": 1e3 * statistics.median(times),
            "assembly_steps": steps, "windows_per_domain": windows}, batch.numpy()


def bench_train_step(batch: np.ndarray, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                         num_key_value_heads=HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=SEQ_LEN)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.from_numpy(batch)  # (B, L+1)

    def step() -> None:
        logits = model(input_ids=x[:, :-1]).logits  # (B, L, V)
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, AdamW state
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"train_step_s_mean": statistics.fmean(times), "train_step_s_min": min(times), "train_steps": steps,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plan-steps", type=int, default=2000)
    ap.add_argument("--replay-steps", type=int, default=100_000)
    ap.add_argument("--assembly-steps", type=int, default=200)
    ap.add_argument("--train-steps", type=int, default=2)
    args = ap.parse_args()

    plan = bench_plan(args.plan_steps, args.replay_steps)
    with tempfile.TemporaryDirectory() as tmp:
        asm, batch = bench_assembly(Path(tmp), args.assembly_steps)
    train = bench_train_step(batch, args.train_steps)
    share = asm["assembly_ms_mean"] / (1e3 * train["train_step_s_mean"])
    result = {
        "benchmark": "sampler",
        "what": "MixtureSampler.plan per step; batch assembly from memmapped shards vs one CPU training step",
        "machine": platform.machine(), "python": platform.python_version(), "threads": 1,
        "model": {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "intermediate": INTERMEDIATE},
        "batch": [BATCH, SEQ_LEN + 1],
        "plan": plan, "assembly": asm, "train": train, "assembly_share_of_step": share,
        "targets": {"plan_ms_per_step <= 1": plan["plan_ms_mean"] <= 1.0, "assembly < 5% of step": share < 0.05},
    }
    print(f"(a) plan {PLAN_BATCH} seq x {PLAN_DOMAINS} domains: {plan['plan_ms_mean']:.3f} ms/step mean, "
          f"{plan['plan_ms_median']:.3f} median (target <= 1 ms)")
    print(f"    resume replay of {plan['replay_steps']:,} steps: {plan['replay_s']:.2f} s "
          f"({plan['replay_us_per_step']:.1f} us/step); random-access plan: {plan['random_access_ms']:.1f} ms")
    print(f"(b) assemble ({BATCH}, {SEQ_LEN + 1}) from memmapped uint16 shards: {asm['assembly_ms_mean']:.2f} ms mean, "
          f"{asm['assembly_ms_median']:.2f} median")
    print(f"    training step (fwd+bwd+AdamW, fp32, 1 thread, {train['params']:,} params): "
          f"{train['train_step_s_mean']:.2f} s mean")
    print(f"    assembly = {100 * share:.3f} % of the step (target < 5 %)")
    out = save("sampler", result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
