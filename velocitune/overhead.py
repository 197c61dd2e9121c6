"""The eval signal's cost, estimated before training: by FLOPs and by timing one evaluation and a step.

`velocitune train` prints the estimate before step 0 and records it in summary.json beside the measured
overhead (docs/design.md §6, house rule 7: measure honestly and always).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from velocitune import dist
from velocitune.config import Config
from velocitune.evaluate import ValSet, evaluate
from velocitune.losses import forward_losses
from velocitune.model import unwrap_model


def flops_overhead(val_tokens: int, interval: int, tokens_per_step: int) -> float:
    """The eval signal's cost per training step by FLOPs: one evaluation (a forward, a third of a step's
    FLOPs per token) of `val_tokens` every `interval` steps of `tokens_per_step` tokens."""
    return val_tokens / (3 * interval * tokens_per_step)


@dataclass
class OverheadProbe:
    eval_s: float  # one evaluation of the val sets (what the eval signal runs per update), this rank
    step_s: float  # one training step's forward and backward passes (n_micro micro-batches), this rank


def probe_overhead(net, val: ValSet, env: dist.DistEnv, cfg: Config, autocast: Callable, micro: int, n_micro: int,
                   repeats: int = 5) -> OverheadProbe:
    """Time the eval signal's evaluation and a training step before training, leaving no trace.

    The FLOPs estimate k·val/(3·m·τ) takes a forward pass for a third of a step; at small scale fixed costs
    (per-layer kernels, the chunked head, Python) make it more, and the estimate runs ~20 % low. So time the
    real thing: one warm-up micro-batch (it also compiles under train.compile), then `repeats` training
    micro-batches (forward + backward through the same chunked loss as the loop; median) on val windows, and
    one whole `evaluate` after a forward-only warm-up. Gradients are dropped and the RNG forked, so the run
    is the same as without the probe. Collective under torchrun (every rank runs it). Leaves out the
    optimizer step, clipping and data loading (a few % of a step). Cost: about one update's evaluation
    plus seven micro-batches. On the CPU benchmark it lands within 10 % of the measured overhead.
    """
    device = env.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flat = np.concatenate(val.windows)  # (all val windows, L+1)
    dom = np.repeat(np.arange(len(val.windows)), [w.shape[0] for w in val.windows])  # (all val windows,)
    rows = np.arange(micro) % flat.shape[0]  # a training-shaped micro-batch, repeating windows if few
    x = torch.from_numpy(flat[rows]).to(device)  # (micro, L+1)
    d = torch.from_numpy(dom[rows]).to(device)  # (micro,)
    model = unwrap_model(net)

    def micro_step(backward: bool = True) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.set_grad_enabled(backward), autocast():
            out = forward_losses(net, x[:, :-1], x[:, 1:], d, len(val.windows), cfg.train.loss_chunk_tokens)
        if backward:
            out.loss.backward()
        sync()
        return time.perf_counter() - t0

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws stay private
        micro_step()  # warm-up of the training pass
        step_s = n_micro * float(np.median([micro_step() for _ in range(repeats)]))
        model.zero_grad(set_to_none=True)
        net.eval()
        micro_step(backward=False)  # warm-up of the forward-only pass (the ℓ_init evaluation may not have run)
        net.train()
        sync()
        t0 = time.perf_counter()
        evaluate(net, val, env, cfg.eval.batch_size, cfg.train.loss_chunk_tokens, autocast())
        eval_s = time.perf_counter() - t0
    return OverheadProbe(eval_s=eval_s, step_s=step_s)


def overhead_line(signal: str, adaptive: bool, probe: OverheadProbe | None, by_flops: float, interval: int,
                  timed: bool, distributed: bool, k: int) -> str | None:
    """The printed estimate of the reweighting overhead (None for a rule that never updates). probe: the timed
    one (eval signal, timed); by_flops: the FLOPs estimate; timed=False: the dry run, which times nothing."""
    if not adaptive:
        return None
    if signal == "eval" and not timed:
        return (f"estimated reweighting overhead: {100 * by_flops:.1f}% (signal=eval; by FLOPs "
                f"k*val_tokens/(3*m*tokens_per_step); training times it before step 0)")
    if probe is not None:
        return (f"estimated reweighting overhead: {100 * probe.eval_s / (interval * probe.step_s):.1f}% (signal=eval; "
                f"timed before training: one evaluation {probe.eval_s:.3g}s per {interval} steps of "
                f"{probe.step_s:.3g}s; by FLOPs k*val_tokens/(3*m*tokens_per_step) = {100 * by_flops:.1f}%)")
    return (f"estimated reweighting overhead: 0.0% (signal={signal}: the training losses already computed"
            + (f"; one all-reduce of {2 * k} numbers per update)" if distributed else ")"))

