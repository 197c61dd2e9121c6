"""The per-device memory estimate of a launch config at several world sizes, without the model's weights.

`velocitune train CONFIG --dry-run` prints the same estimate on the machine that will run the job (it loads
the model and checks data and targets too). This script answers the question before there is such a
machine: it builds the model of a Hugging Face `config.json` on the meta device (no memory) and applies
velocitune.memory to the config's micro-batch, sequence length, strategy, checkpointing, attention and
offload, assuming bf16 compute on GPUs (train.precision auto).

    python examples/estimate_memory.py examples/llama3-8b-fsdp2-8gpu.yaml --model-config examples/model_configs/llama3-8b.json --world-size 8 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from velocitune.config import load_config  # noqa: E402
from velocitune.memory import GIB, estimate_memory, shape_from_config  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="a velocitune config (YAML)")
    p.add_argument("--model-config", required=True, help="the model's Hugging Face config.json")
    p.add_argument("--world-size", type=int, nargs="+", default=[1], help="processes (GPUs) to estimate for")
    p.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU (default 80 GiB: H100/A100)")
    args = p.parse_args()
    cfg = load_config(args.config)
    shape = shape_from_config(args.model_config)
    t = cfg.train
    print(f"{args.config}: {shape.n_params / 1e9:.2f}B parameters, seq_len {cfg.data.seq_len}, global batch "
          f"{t.batch_size}, strategy {cfg.dist.strategy}, activation_checkpointing {t.activation_checkpointing}, "
          f"attn {cfg.model.attn_implementation}, cpu offload {cfg.dist.fsdp_cpu_offload}")
    for world in args.world_size:
        micro = t.micro_batch_size or max(1, t.batch_size // world)
        strategy = "single" if world == 1 else cfg.dist.strategy
        est = estimate_memory(shape, micro_batch=micro, seq_len=cfg.data.seq_len, loss_chunk_tokens=t.loss_chunk_tokens,
                              strategy=strategy, world_size=world, param_bytes=4, act_bytes=2,
                              gather_bytes=2 if strategy == "fsdp2" else None,
                              checkpointing=t.activation_checkpointing,
                              attn_implementation=cfg.model.attn_implementation,
                              cpu_offload=strategy == "fsdp2" and cfg.dist.fsdp_cpu_offload)
        accum = t.batch_size // (world * micro) if t.batch_size % (world * micro) == 0 else None
        fits = "fits" if est.total <= args.gpu_gib * GIB else "DOES NOT FIT"
        print(f"  {world:>3} GPUs, micro-batch {micro}"
              + (f" x {accum} accumulation steps" if accum else " (batch not divisible: adjust micro_batch_size)")
              + f": {est.line(int(args.gpu_gib * GIB), ' per GPU')} -> {fits}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
