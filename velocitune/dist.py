"""Process-group plumbing: single process by default, distributed when launched by torchrun.

torchrun (or accelerate launch) sets RANK/WORLD_SIZE/LOCAL_RANK; the same command then runs data-parallel
(DESIGN §6 rule 3). Only rank 0 writes files. Per-domain loss sums cross ranks in one small all_reduce.
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

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is '{name}' but no CUDA GPU is available; use train.device=cpu or auto")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    return dev


def init(device_name: str = "auto", backend: str = "auto") -> DistEnv:
    """Join the process group if the launcher asked for one; otherwise a one-process environment."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_name, local_rank)
    if world > 1 and not tdist.is_initialized():
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        tdist.init_process_group(backend=backend)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def all_reduce_sum(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum a small tensor over ranks, in place (a no-op in one process)."""
    if env.distributed:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def broadcast_object(obj, env: DistEnv):
    if not env.distributed:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        tdist.barrier()


def wrap_model(model: torch.nn.Module, strategy: str, env: DistEnv, bf16: bool) -> torch.nn.Module:
    """DDP, or FSDP2 with `fully_shard` on every transformer block and then the root."""
    if not env.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [env.device.index] if env.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    return model


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


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The underlying Hugging Face model (through DDP and torch.compile wrappers)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv, strategy: str) -> tuple[dict, dict]:
    """Unsharded (model, optimizer) state dicts, identical whatever the world size, for checkpoints."""
    if env.distributed and strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full_model_state(model, env, strategy), optimizer.state_dict()


def full_model_state(model: torch.nn.Module, env: DistEnv, strategy: str) -> dict:
    """The unsharded model state dict (collective under FSDP2), e.g. for save_pretrained."""
    if env.distributed and strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return unwrap(model).state_dict()


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict,
                    env: DistEnv, strategy: str) -> None:
    """Load states written by `full_state` (at any world size) into a possibly sharded model."""
    if env.distributed and strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                       options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
        return
    unwrap(model).load_state_dict(model_sd)
    optimizer.load_state_dict(optim_sd)


def shutdown(env: DistEnv) -> None:
    if env.distributed and tdist.is_initialized():
        tdist.destroy_process_group()
