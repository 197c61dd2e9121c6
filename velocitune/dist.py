"""Process-group plumbing: single process by default, data-parallel (DDP or FSDP2) when a launcher asks.

torchrun (or `accelerate launch`) sets RANK/WORLD_SIZE/LOCAL_RANK; the same command then runs
data-parallel (docs/design.md §6 rule 3). Only rank 0 writes files. Per-domain loss sums cross ranks in one small
all_reduce per log/update point. The model and optimizer states of a checkpoint, gathered or sharded, are
`velocitune.dist_checkpoint`'s job.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from velocitune.errors import ConfigError


@dataclass
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    # A process group of one: torchrun --nproc_per_node=1 with dist.strategy=fsdp2 (FSDP2's CPU offload on a
    # single GPU, or its code path checked on one device); every collective is then a no-op of one rank.
    grouped: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.grouped


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto` → this process's GPU (cuda:LOCAL_RANK) when there is one, else the CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is '{name}' but no CUDA GPU is available; use train.device=cpu or auto")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def init(device_name: str = "auto", backend: str = "auto", strategy: str = "ddp") -> DistEnv:
    """Join the process group if the launcher asked for one; otherwise a one-process environment.

    One process under torchrun joins a group of one only for FSDP2 (`strategy`), which needs a group to
    shard over; DDP over one process would only add its hooks, so that stays a plain process.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    grouped = world == 1 and strategy == "fsdp2" and "TORCHELASTIC_RUN_ID" in os.environ  # set by torchrun
    if (world > 1 or grouped) and not tdist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise ConfigError("dist.backend=nccl needs GPUs, but train.device is the CPU; use dist.backend=gloo or auto")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend=backend)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, grouped=grouped)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a small tensor over ranks, in place (a no-op in one process)."""
    if env.distributed:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def control_group(env: DistEnv):
    """A process group for small host-side decisions (the preemption flag): the default group when it is
    gloo, else a gloo group beside NCCL, so that agreeing on a CPU value never waits for the GPU stream.
    Collective: every rank must call it, in the same order. None in one process."""
    if not env.distributed:
        return None
    if tdist.get_backend() == "gloo":
        return tdist.group.WORLD
    return tdist.new_group(backend="gloo")


def all_reduce_max(t: torch.Tensor, env: DistEnv, group=None) -> torch.Tensor:
    """The element-wise maximum of a small tensor over ranks, in place (a no-op in one process)."""
    if env.distributed:
        tdist.all_reduce(t, op=tdist.ReduceOp.MAX, group=group)
    return t


def broadcast_object(obj, env: DistEnv):
    """Rank 0's `obj` on every rank (pickled; for small host objects only)."""
    if not env.distributed:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        tdist.barrier()


def wrap_model(model: torch.nn.Module, strategy: str, env: DistEnv, bf16: bool,
               cpu_offload: bool = False) -> torch.nn.Module:
    """DDP, or FSDP2 with `fully_shard` on every transformer block and then the root.

    FSDP2's mixed precision under bf16: blocks compute with bf16 parameters (all-gathered in bf16, half the
    traffic) while the sharded master parameters, the gradients' reduce-scatter and the optimizer stay fp32.
    `cpu_offload` keeps the fp32 shards, their gradients and the optimizer state in host memory (FSDP2 moves
    each block's shard to the device for its all-gather), trading PCIe traffic and a CPU optimizer step for
    device memory.
    """
    if not env.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy, fully_shard

    mp = fsdp_mixed_precision(bf16)
    # Pinned host memory makes the copies to the GPU asynchronous; without an accelerator there is none to pin.
    offload = CPUOffloadPolicy(pin_memory=env.device.type == "cuda") if cpu_offload else OffloadPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=mp, offload_policy=offload)
    fully_shard(model, mp_policy=mp, offload_policy=offload)
    return model


def fsdp_mixed_precision(bf16: bool):
    """bf16 parameters for compute, fp32 gradient reduction; the identity policy without bf16."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()


def transformer_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated decoder layers of a Hugging Face causal LM (the unit FSDP2 shards)."""
    for mod in model.modules():
        if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0:
            return list(mod)
    return []


def grad_sync(model: torch.nn.Module, enabled: bool):
    """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
    if enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(False)
        return _restore_fsdp_sync(model)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _restore_fsdp_sync(model):
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def shutdown(env: DistEnv) -> None:
    if env.distributed and tdist.is_initialized():
        tdist.destroy_process_group()
