"""Benchmark: peak memory and time of the per-domain loss through the output head, chunked vs naive.

Forward + backward through the head only: hidden (8·1024, H) requiring grad, head Linear(H, 50257),
per-token NLL, per-domain sums with index_add_. Variants:
  naive        full (N, V) logits, F.cross_entropy(reduction='none'), index_add_
  chunked      velocitune.losses (fused chunked linear + NLL, recomputes logits in backward)
  checkpointed velocitune.losses with a head that is not an nn.Linear (torch.utils.checkpoint path)
Each variant runs in a fresh subprocess so that one's allocator state cannot hide another's peak.
Peak memory = rise of the process's peak RSS (CPU) or of torch.cuda.max_memory_allocated (GPU)
during the first full-size run, after a small warm-up run has loaded kernels. Time = best of the
full-size runs. Prints a table and writes benchmarks/results/losses.json.

    python benchmarks/losses.py [--tokens 8192] [--hidden 256] [--vocab 50257] [--chunk 2048]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from results_file import save

VARIANTS = ("naive", "chunked", "checkpointed")
K_DOMAINS = 4


def run_variant(variant: str, n: int, h: int, v: int, chunk: int, repeats: int) -> dict:
    """Measure one variant in this process; returns its figures."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    from velocitune.losses import chunked_token_nll, domain_sums

    torch.set_num_threads(1)  # the machine is shared; one thread keeps timings comparable
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    linear = nn.Linear(h, v, bias=False).to(device)
    head = nn.Sequential(linear) if variant == "checkpointed" else linear

    def step(tokens: int) -> None:
        hidden = torch.randn(tokens, h, device=device, requires_grad=True)  # (N, H)
        labels = torch.randint(0, v, (tokens,), device=device)  # (N,)
        token_domain = torch.randint(0, K_DOMAINS, (tokens,), device=device)  # (N,)
        if variant == "naive":
            logits = head(hidden).float()  # (N, V)
            nll = F.cross_entropy(logits, labels, reduction="none")
        else:
            nll = chunked_token_nll(hidden, head, labels, chunk_tokens=chunk)
        domain_sums(nll, token_domain, K_DOMAINS)  # (k,) sums and counts, part of the measured work
        (nll.sum() / tokens).backward()
        linear.weight.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    step(min(n, 256))  # warm-up: kernels, thread pools, small allocations
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.max_memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times = []
    for _ in range(1 + repeats):
        start = time.perf_counter()
        step(n)
        times.append(time.perf_counter() - start)
        if len(times) == 1:  # the peak of the first full-size run
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated() - base
            else:
                peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024
    return {"variant": variant, "peak_mib": peak / 2**20, "time_s": min(times), "device": device.type}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=8 * 1024)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=1, help="timed runs after the first")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.tokens, args.hidden, args.vocab, args.chunk, args.repeats)))
        return

    root = Path(__file__).resolve().parents[1]
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={getattr(args, k)}" for k in ("tokens", "hidden", "vocab", "chunk", "repeats")
        ]
        env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
        results[variant] = json.loads(out.stdout.strip().splitlines()[-1])

    naive = results["naive"]
    logits_mib = args.tokens * args.vocab * 4 / 2**20
    print(f"N={args.tokens} tokens, H={args.hidden}, V={args.vocab}, chunk={args.chunk}, "
          f"device={naive['device']}; one fp32 (N, V) logits tensor = {logits_mib:.0f} MiB")
    print(f"{'variant':<13}{'peak MiB':>10}{'vs naive':>10}{'time s':>9}{'vs naive':>10}")
    for variant, r in results.items():
        r["peak_ratio"] = r["peak_mib"] / naive["peak_mib"]
        r["time_ratio"] = r["time_s"] / naive["time_s"]
        print(f"{variant:<13}{r['peak_mib']:>10.0f}{r['peak_ratio']:>10.3f}{r['time_s']:>9.2f}{r['time_ratio']:>10.2f}")
    record = {
        "benchmark": "losses",
        "what": "peak memory and time of forward+backward through the output head with per-domain sums",
        "tokens": args.tokens,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "chunk_tokens": args.chunk,
        "threads": 1,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "target": "chunked peak <= 1/4 of naive",
        "target_met": results["chunked"]["peak_ratio"] <= 0.25,
        "results": results,
    }
    out_path = save("losses", record)
    print(f"saved {out_path}")


if __name__ == "__main__":
    main()
