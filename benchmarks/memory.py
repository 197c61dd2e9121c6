"""Benchmark: velocitune.memory's estimate per device against the measured peak of real training steps.

For a few small Llama-style configs (micro-batch, activation checkpointing off/block, sdpa/eager), one fresh
subprocess each builds the model as `velocitune train` does (build_model, checkpoint_blocks, AdamW, the
chunked loss `forward_losses`) and runs two optimizer steps of one micro-batch (the second has the
optimizer state the first created). Measured peak:
  CPU  rise of the process's peak RSS (ru_maxrss) over its value after imports and a small warm-up run of
       the same code (kernels, thread pools and libraries loaded). Limits: RSS counts pages, not tensors:
       glibc may keep freed blocks (RSS over-counts), pages of a buffer never touched are not counted
       (under-counts), and the warm-up's own peak is part of the baseline. The estimate's fixed margin
       (for the CUDA allocator) is left out of the comparison on CPU: `estimate - margin` is compared.
  CUDA torch.cuda.max_memory_allocated (tensors only; the CUDA context and the caching allocator's reserve
       are not in it), under bf16 autocast as the trainer runs; compared with the estimate without margin too.
Prints a table and writes benchmarks/results/memory.json.

    python benchmarks/memory.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from pathlib import Path

from results_file import save

CONFIGS = [  # hidden, layers, heads, intermediate, vocab, seq_len, micro, checkpointing, attn
    dict(hidden=256, layers=4, heads=4, intermediate=688, vocab=8192, seq_len=256, micro=4, ckpt="off", attn="sdpa"),
    dict(hidden=256, layers=4, heads=4, intermediate=688, vocab=8192, seq_len=256, micro=8, ckpt="off", attn="sdpa"),
    dict(hidden=256, layers=4, heads=4, intermediate=688, vocab=8192, seq_len=256, micro=8, ckpt="block", attn="sdpa"),
    dict(hidden=256, layers=4, heads=4, intermediate=688, vocab=8192, seq_len=256, micro=8, ckpt="off", attn="eager"),
    dict(hidden=512, layers=8, heads=8, intermediate=1376, vocab=8192, seq_len=512, micro=4, ckpt="off", attn="sdpa"),
    dict(hidden=512, layers=8, heads=8, intermediate=1376, vocab=8192, seq_len=512, micro=4, ckpt="block", attn="sdpa"),
]
CHUNK = 2048  # train.loss_chunk_tokens' default


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def measure(c: dict) -> dict:
    """Build, train two steps, return the measured peak and the estimate (this process)."""
    import torch

    from velocitune.dist import transformer_blocks
    from velocitune.losses import forward_losses
    from velocitune.memory import ModelShape, estimate_memory
    from velocitune.model import build_model, checkpoint_blocks

    torch.set_num_threads(2)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda else (lambda: torch.autocast("cpu", enabled=False))

    def run(c: dict, steps: int) -> tuple:
        model = build_model(c["vocab"], c["hidden"], c["layers"], c["heads"], c["intermediate"],
                            max_seq_len=c["seq_len"], attn_implementation=c["attn"]).to(device)
        model.train()
        blocks = transformer_blocks(model)
        if c["ckpt"] == "block":
            checkpoint_blocks(blocks)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
        g = torch.Generator().manual_seed(0)
        for _ in range(steps):
            x = torch.randint(0, c["vocab"], (c["micro"], c["seq_len"] + 1), generator=g).to(device)
            d = torch.zeros(c["micro"], dtype=torch.long, device=device)
            with autocast():
                out = forward_losses(model, x[:, :-1], x[:, 1:], d, 1, CHUNK)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return model, blocks

    # warm-up at a toy size: loads kernels and thread pools before the baseline is taken
    run({**c, "hidden": 32, "layers": 1, "heads": 2, "intermediate": 64, "vocab": 256, "seq_len": 16, "micro": 1}, 2)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _peak_rss()
    model, blocks = run(c, 2)
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _peak_rss() - base
    est = estimate_memory(ModelShape.from_model(model, blocks), micro_batch=c["micro"], seq_len=c["seq_len"],
                          loss_chunk_tokens=CHUNK, act_bytes=2 if cuda else 4, checkpointing=c["ckpt"],
                          attn_implementation=c["attn"])
    return {**c, "device": "cuda" if cuda else "cpu", "measure": "max_memory_allocated" if cuda else "peak RSS rise",
            "measured_bytes": peak, "estimate_bytes": est.total, "estimate_without_margin_bytes": est.total - est.margin,
            "components": {k: v for k, v in est.__dict__.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the first three configs only")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a config as JSON: measure it in this process
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(json.loads(args.one))))
        return
    rows = []
    for c in CONFIGS[:3] if args.quick else CONFIGS:
        # a fresh process per config: one run's allocator state and peak RSS cannot hide another's
        r = subprocess.run([sys.executable, __file__, "--one", json.dumps(c)], capture_output=True, text=True, check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    mib = 1024**2
    print(f"{'H':>4} {'L':>2} {'T':>4} {'B':>2} {'ckpt':>5} {'attn':>5} | {'measured':>9} {'estimate':>9} "
          f"{'est-margin':>10} {'est-margin/measured':>19} | activations")
    for r in rows:
        ratio = r["estimate_without_margin_bytes"] / r["measured_bytes"]
        r["ratio_without_margin"] = ratio
        print(f"{r['hidden']:>4} {r['layers']:>2} {r['seq_len']:>4} {r['micro']:>2} {r['ckpt']:>5} {r['attn']:>5} | "
              f"{r['measured_bytes'] / mib:>7.1f}Mi {r['estimate_bytes'] / mib:>7.1f}Mi "
              f"{r['estimate_without_margin_bytes'] / mib:>8.1f}Mi {ratio:>19.2f} | "
              f"{r['components']['activations'] / mib:.1f}Mi")
    print(f"({rows[0]['device']}; measured = {rows[0]['measure']}; Mi = MiB)")
    path = save("memory", {"machine": platform.machine(), "python": platform.python_version(), "chunk_tokens": CHUNK,
                           "rows": rows})
    print(f"wrote {Path(path)}")


if __name__ == "__main__":
    main()
