"""Stage A of docs/design.md §3: `velocitune init-loss`, the base model's per-domain loss on the fixed val sets
(ℓ_init, init_loss.json), and where that file goes."""

from __future__ import annotations

import time
from pathlib import Path

from velocitune import dist, runfiles
from velocitune.config import Config
from velocitune.fileio import output_file
from velocitune.shards import PreparedData


def init_loss_path(cfg: Config, beside: Path | None = None) -> Path:
    """Where ℓ_init goes: mixing.init_loss (where `train` reads it), else beside `beside` or in the run dir."""
    if cfg.mixing.init_loss:
        return Path(cfg.mixing.init_loss)
    return (beside.parent if beside is not None else Path(cfg.run.out_dir)) / runfiles.INIT_LOSS_FILE


def init_loss_main(cfg: Config, out: str | None = None) -> int:
    """`velocitune init-loss`: write init_loss.json with the base model's per-domain val loss."""
    import torch

    from velocitune.evaluate import evaluate, load_val_set
    from velocitune.model import make_model

    path = output_file(Path(out) if out else init_loss_path(cfg), "the initial-loss file (--out)")
    env = dist.init(cfg.train.device, cfg.dist.backend)
    try:
        data = PreparedData(cfg.data.path)
        model = make_model(cfg, data).to(env.device)
        val = load_val_set(data, cfg.data.seq_len, cfg.eval.max_tokens)
        bf16 = env.device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else None
        t0 = time.perf_counter()
        losses = evaluate(model, val, env, cfg.eval.batch_size, cfg.train.loss_chunk_tokens, ctx)
        if env.is_main:
            runfiles.write_init_loss(path, cfg.model.path or "fresh", val.names, losses, val.tokens,
                                     seconds=time.perf_counter() - t0)
            for n, l in zip(val.names, losses):
                print(f"{n:>20s}  {l:.4f} nats")
            print(f"wrote {path}")
    finally:
        dist.shutdown(env)
    return 0
