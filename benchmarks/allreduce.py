"""Benchmark: the cost of the per-update all-reduce next to a training step, 2 processes on CPU with gloo.

At every mixture update each rank all-reduces one float64 vector of 2k entries (per-domain NLL sums and
token counts; 16k bytes). Both figures are measured side by side in the same two-process group, one
thread per rank (the machine is shared and noisy; only the ratio is meant to travel):

  all_reduce   median time of one SUM all-reduce of a 2k float64 vector, k = 4 and k = 100
  train step   median time of one DDP training step of the tiny demo model (LlamaForCausalLM, vocab 8192,
               hidden 128, 4 layers, 4 heads, intermediate 352): global batch 16 x 128 tokens (8 per
               rank), velocitune's chunked per-domain loss, backward (with DDP's gradient all-reduce),
               grad clipping and an AdamW step

The reweighting communication per step is then ratio / m for an update every m steps. Prints a table
and writes benchmarks/results/allreduce.json.

    python benchmarks/allreduce.py [--calls 400] [--steps 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from pathlib import Path

from results_file import results_dir, save

MODEL = {"vocab_size": 8192, "hidden_size": 128, "n_layers": 4, "n_heads": 4, "intermediate_size": 352}
GLOBAL_BATCH, SEQ_LEN, WORLD = 16, 128, 2
KS = (4, 100)


def _time_allreduce(k: int, calls: int) -> list[float]:
    """Seconds per SUM all-reduce of a (2k,) float64 tensor, one entry per call (each call is blocking)."""
    import torch
    import torch.distributed as tdist

    v = torch.ones(2 * k, dtype=torch.float64)
    for _ in range(20):  # warm-up: connection setup and allocator
        tdist.all_reduce(v)
    out = []
    for _ in range(calls):
        tdist.barrier()  # both ranks start together: the time is the collective's, not a rank's lag
        t0 = time.perf_counter()
        tdist.all_reduce(v)
        out.append(time.perf_counter() - t0)
    return out


def _time_train_steps(rank: int, steps: int) -> tuple[list[float], int]:
    """Seconds per DDP step of the demo model on this rank's 8 x 128 slice; and the parameter count."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from velocitune.losses import forward_losses
    from velocitune.model import build_model

    model = build_model(max_seq_len=SEQ_LEN, **MODEL)
    net = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(rank)
    per_rank = GLOBAL_BATCH // WORLD
    times = []
    for i in range(steps + 2):  # two warm-up steps
        x = torch.randint(0, MODEL["vocab_size"], (per_rank, SEQ_LEN + 1), generator=gen)
        dom = torch.randint(0, 4, (per_rank,), generator=gen)
        t0 = time.perf_counter()
        out = forward_losses(net, x[:, :-1], x[:, 1:], dom, 4)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return times, sum(p.numel() for p in model.parameters())


def _worker(rank: int, port: int, calls: int, steps: int, out_path: str) -> None:
    import torch
    import torch.distributed as tdist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo")
    try:
        # Interleave the two measurements so that machine load hits both alike.
        ar: dict[int, list[float]] = {k: [] for k in KS}
        step_times: list[float] = []
        n_params = 0
        for _ in range(2):
            for k in KS:
                ar[k] += _time_allreduce(k, calls // 2)
            t, n_params = _time_train_steps(rank, steps // 2)
            step_times += t
        # The slower rank sets the pace of a data-parallel step: take the max over ranks per sample.
        gathered: list = [None] * WORLD
        tdist.all_gather_object(gathered, {"ar": ar, "step": step_times})
        if rank == 0:
            ar_all = {k: [max(g["ar"][k][i] for g in gathered) for i in range(len(ar[k]))] for k in KS}
            step_all = [max(g["step"][i] for g in gathered) for i in range(len(step_times))]
            Path(out_path).write_text(json.dumps({"ar": ar_all, "step": step_all, "n_params": n_params}))
    finally:
        tdist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=400, help="timed all-reduce calls per k")
    ap.add_argument("--steps", type=int, default=10, help="timed training steps")
    args = ap.parse_args()

    import torch.multiprocessing as mp

    scratch = results_dir() / ".allreduce_raw.json"
    scratch.parent.mkdir(parents=True, exist_ok=True)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, args.calls, args.steps, str(scratch)), nprocs=WORLD)
    raw = json.loads(scratch.read_text())
    scratch.unlink()

    step_med = statistics.median(raw["step"])
    grad_bytes = 4 * raw["n_params"]
    allreduce = {}
    for k in KS:
        xs = sorted(raw["ar"][str(k)])
        med = statistics.median(xs)
        allreduce[f"k{k}"] = {
            "k": k, "elements": 2 * k, "bytes": 16 * k, "calls": len(xs), "median_us": med * 1e6,
            "p90_us": xs[int(0.9 * (len(xs) - 1))] * 1e6, "ratio_to_step": med / step_med,
            "per_step_overhead_at_m": {str(m): med / step_med / m for m in (1, 10, 30, 100)},
        }
    record = {
        "benchmark": "allreduce", "backend": "gloo", "device": "cpu", "world_size": WORLD, "threads_per_rank": 1,
        "machine": platform.machine(), "cpus": os.cpu_count(),
        "train_step": {"model": MODEL, "params": raw["n_params"], "global_batch": GLOBAL_BATCH, "seq_len": SEQ_LEN,
                       "tokens": GLOBAL_BATCH * SEQ_LEN, "steps": len(raw["step"]), "median_s": step_med,
                       "grad_allreduce_bytes": grad_bytes},
        "allreduce": allreduce,
    }
    print(f"gloo, {WORLD} processes x 1 thread, CPU ({os.cpu_count()} cores, shared)")
    print(f"train step (demo model, {raw['n_params'] / 1e6:.2f}M params, {GLOBAL_BATCH}x{SEQ_LEN} tokens, DDP "
          f"gradient all-reduce of {grad_bytes / 1e6:.1f} MB): median {step_med * 1e3:.1f} ms")
    print(f"{'k':>4} {'bytes':>6} {'median':>10} {'p90':>10} {'/ step':>9} {'/ step at m=30':>15}")
    for r in allreduce.values():
        print(f"{r['k']:>4} {r['bytes']:>6} {r['median_us']:>8.0f}us {r['p90_us']:>8.0f}us "
              f"{100 * r['ratio_to_step']:>8.3f}% {100 * r['per_step_overhead_at_m']['30']:>14.4f}%")
    out = save("allreduce", record)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
