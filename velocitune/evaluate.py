"""Per-domain validation loss on the fixed held-out sets: forward-only and token-weighted.

The same val windows are used everywhere (ℓ_init, proxy checkpoints, the eval signal, final losses), so
their sampling bias cancels inside the velocity (docs/design.md §3). Under torchrun each rank evaluates a strided
slice of every domain's windows and the (sum, count) pairs are all-reduced once.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch

from velocitune import dist
from velocitune.errors import DataError
from velocitune.losses import forward_losses
from velocitune.shards import PreparedData


@dataclass
class ValSet:
    """Fixed validation windows per domain: windows[i] is an int64 array (n_i, seq_len + 1)."""

    names: list[str]
    windows: list[np.ndarray]

    @property
    def tokens(self) -> np.ndarray:
        """Target tokens evaluated per domain (seq_len per window)."""
        return np.array([w.shape[0] * (w.shape[1] - 1) for w in self.windows], dtype=np.int64)


def load_val_set(data: PreparedData, seq_len: int, max_tokens: int) -> ValSet:
    """The first ⌊max_tokens / seq_len⌋ whole val windows of each domain (at least one)."""
    windows = []
    for name in data.domains:
        split = data.val(name)
        n = split.n_windows(seq_len)
        if n == 0:
            raise DataError(
                f"domain '{name}' has {split.n_tokens} validation tokens, fewer than one window of "
                f"data.seq_len + 1 = {seq_len + 1}; lower data.seq_len or re-run `velocitune prepare` "
                f"with a larger --val-fraction/--val-tokens"
            )
        take = max(1, min(n, max_tokens // seq_len))
        windows.append(split.windows(np.arange(take, dtype=np.int64), seq_len))
    return ValSet(names=list(data.domains), windows=windows)


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    val: ValSet,
    env: dist.DistEnv,
    batch_size: int = 16,
    chunk_tokens: int = 2048,
    autocast: contextlib.AbstractContextManager | None = None,
) -> np.ndarray:
    """Token-weighted mean NLL per domain (nats), float64 (k,). Syncs once, at the end."""
    k = len(val.names)
    device = env.device
    sums = torch.zeros(k, dtype=torch.float64, device=device)
    counts = torch.zeros(k, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for d, win in enumerate(val.windows):
            mine = win[env.rank :: env.world_size]  # (n_rank, L+1): strided slice for this rank
            # Every rank runs the same number of forwards: under FSDP2 each one is collective (it
            # all-gathers parameters), so a rank with fewer windows runs a stand-in batch and drops it.
            per_rank = -(-win.shape[0] // env.world_size)
            for start in range(0, per_rank, batch_size):
                rows = mine[start : start + batch_size]
                real = rows.shape[0] > 0
                batch = torch.from_numpy(rows if real else win[:1]).to(device, non_blocking=True)
                seq_domain = torch.full((batch.shape[0],), d, dtype=torch.long, device=device)
                with autocast or contextlib.nullcontext():
                    out = forward_losses(model, batch[:, :-1], batch[:, 1:], seq_domain, k, chunk_tokens)
                if real:
                    sums += out.nll_sum
                    counts += out.count
    finally:
        model.train(was_training)
    packed = dist.all_reduce_sum(torch.cat([sums, counts]), env)
    packed = packed.cpu().numpy()
    return packed[:k] / np.maximum(packed[k:], 1.0)
