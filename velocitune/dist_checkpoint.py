"""The model and optimizer part of a checkpoint under every strategy (1 process, DDP, FSDP2); collective.

Checkpoint states come in two forms:

- *full*: the unsharded model and optimizer state, gathered for rank 0 to write (`full_state`), keyed by
  parameter name (FQN) whatever the strategy, so a checkpoint of any world size and strategy loads into
  any other (`load_full_state`). Peak host memory on rank 0 ≈ parameters + 2 Adam moments in fp32.
- *sharded*: torch.distributed.checkpoint (DCP) files written by every rank in parallel
  (`save_sharded`); DCP reshards on load, so it too resumes at any world size (`load_sharded`). No rank
  ever holds the full state. `checkpoint_model_state`/`restore_model_state` pick the form per strategy.

`velocitune.checkpoint` writes and verifies the checkpoint directory itself (and this part inside it);
`velocitune.dist` holds the process group this module's collectives run on.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from velocitune.dist import DistEnv, barrier, broadcast_object
from velocitune.errors import CheckpointError
from velocitune.fileio import install_dir
from velocitune.model import unwrap_model

SHARDED_DIR = "sharded"  # under the checkpoint root: sharded/step_XXXXXXXX/ beside checkpoints' step_XXXXXXXX/
_DCP_METADATA = ".metadata"  # DCP's index file, written last by its coordinator
_TMP_PREFIX = ".tmp-"


# --------------------------------------------------------------------------- full (gathered) states


def _full_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # cpu_offload keeps the gathered copy in host memory (and, distributed, on rank 0 only: the other
    # ranks get empty dicts, which they never write).
    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Unsharded (model, optimizer) state dicts for a checkpoint; collective under FSDP2 (call on every rank).

    The optimizer state is keyed by parameter name for every strategy (not by position, as
    `optimizer.state_dict()` is), so one format serves 1 process, DDP and FSDP2 alike.
    """
    from torch.distributed.checkpoint.state_dict import get_state_dict

    return get_state_dict(model, optimizer, options=_full_options())


def full_model_state(model: torch.nn.Module, env: DistEnv, strategy: str) -> dict:
    """The unsharded model state dict (collective under FSDP2), e.g. for save_pretrained."""
    if env.distributed and strategy == "fsdp2":
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(model, options=_full_options())
    return unwrap_model(model).state_dict()


def load_full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, model_sd: dict, optim_sd: dict) -> None:
    """Load states written by `full_state` (any world size, any strategy) into a possibly sharded model.

    Every rank passes the full dicts (each reads the checkpoint); FSDP2 keeps only its shards.
    Checkpoints from before name-keyed optimizer states (positional ids) are converted first.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    optim_sd = optim_state_by_name(optim_sd, model, optimizer)
    set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                   options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def optim_state_by_name(optim_sd: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """An `optimizer.state_dict()` keyed by position (0, 1, …) re-keyed by parameter name; others as given.

    Positions follow the order of `optimizer.param_groups` (how torch numbers them), which the
    checkpointed run and this one share because both build the optimizer the same way.
    """
    groups = optim_sd.get("param_groups", [])
    ids = [i for g in groups for i in g["params"]]
    if not ids or not all(isinstance(i, int) for i in ids):
        return optim_sd
    names = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    if len(order) != len(ids):
        raise CheckpointError(
            f"the checkpoint's optimizer holds {len(ids)} parameters but this model has {len(order)}; "
            f"resume with the model configuration the checkpoint was written with"
        )
    fqn = dict(zip(ids, order))
    return {
        "state": {fqn[i]: s for i, s in optim_sd["state"].items()},
        "param_groups": [{**g, "params": [fqn[i] for i in g["params"]]} for g in groups],
    }


# --------------------------------------------------------------------------- sharded (DCP) states


def save_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 env: DistEnv) -> dict[str, Any]:
    """Write (model, optimizer) with DCP, every rank its own shards, atomically; collective.

    The files go to a temporary sibling that rank 0 renames to `path` once every rank has finished, so
    `path` is either complete or absent. Returns a small description for the main checkpoint (the
    commit point): every file's size and the sha256 of DCP's index, which `load_sharded` checks.
    Needs a filesystem that every rank sees (as resuming does).
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    final = Path(path)
    tmp = final.with_name(_TMP_PREFIX + final.name)  # one name for all ranks (pids differ across ranks)
    if env.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # an earlier crashed attempt at this step
        tmp.mkdir(parents=True)
    barrier(env)
    model_sd, optim_sd = get_state_dict(model, optimizer)  # DTensor shards under FSDP2, replicas otherwise
    with _one_process_ok(env):
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp, no_dist=not env.distributed)
    barrier(env)
    ref: dict[str, Any] = {}
    if env.is_main:
        ref = _describe_dcp(tmp)
        install_dir(tmp, final)
    barrier(env)
    return broadcast_object(ref, env)


def load_sharded(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 env: DistEnv, expect: dict[str, Any] | None = None) -> None:
    """Load a `save_sharded` directory at this run's world size and strategy (DCP reshards); collective.

    `expect` is what `save_sharded` returned; a missing or resized file raises CheckpointError.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    path = Path(path)
    _verify_dcp(path, expect)
    # The current state is the template: its shapes and shardings say what each rank reads.
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    with _one_process_ok(env):
        dcp.load(state, checkpoint_id=path, no_dist=not env.distributed)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


@contextlib.contextmanager
def _one_process_ok(env: DistEnv):
    """Silence DCP's warning that it 'assumes' one process: without a process group that is the intent."""
    with warnings.catch_warnings():
        if not env.distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def checkpoint_model_state(root: str | os.PathLike, step: int, model: torch.nn.Module,
                           optimizer: torch.optim.Optimizer, env: DistEnv, strategy: str) -> dict[str, Any]:
    """The model/optimizer part of a checkpoint at `step`; collective (call on every rank).

    FSDP2 under torchrun: DCP shards written now under `root/sharded/step_XXXXXXXX/`, and a reference
    to them (`{"sharded": …}`). Otherwise the full states (`{"model": …, "optimizer": …}`).
    """
    if env.distributed and strategy == "fsdp2":
        rel = f"{SHARDED_DIR}/step_{step:08d}"
        return {"sharded": {"path": rel, **save_sharded(Path(root) / rel, model, optimizer, env)}}
    model_sd, optim_sd = full_state(model, optimizer)
    return {"model": model_sd, "optimizer": optim_sd}


def restore_model_state(root: str | os.PathLike, state: dict[str, Any], model: torch.nn.Module,
                        optimizer: torch.optim.Optimizer, env: DistEnv) -> None:
    """Load the part `checkpoint_model_state` wrote (either form) at any world size and strategy."""
    ref = state.get("sharded")
    if ref:
        load_sharded(Path(root) / ref["path"], model, optimizer, env, ref)
    else:
        load_full_state(model, optimizer, state["model"], state["optimizer"])


def prune_sharded(root: str | os.PathLike) -> list[Path]:
    """Delete sharded states with no checkpoint directory of their step (pruned, abandoned or never
    committed) and leftover temporaries; call on rank 0 after the main checkpoint is saved. Returns
    what was deleted."""
    root = Path(root)
    shard_root = root / SHARDED_DIR
    if not shard_root.is_dir():
        return []
    gone = []
    for p in shard_root.iterdir():
        if p.name.startswith(_TMP_PREFIX) or not (root / p.name).is_dir():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def _describe_dcp(path: Path) -> dict[str, Any]:
    files = {p.name: p.stat().st_size for p in sorted(path.iterdir()) if p.is_file()}
    if _DCP_METADATA not in files:
        raise CheckpointError(f"DCP wrote no {_DCP_METADATA} under {path}; the sharded save did not complete")
    digest = hashlib.sha256((path / _DCP_METADATA).read_bytes()).hexdigest()
    return {"files": files, "metadata_sha256": digest}


def _verify_dcp(path: Path, expect: dict[str, Any] | None) -> None:
    hint = "delete that checkpoint's step directory to resume from the one before it"
    if not (path / _DCP_METADATA).is_file():
        raise CheckpointError(f"sharded checkpoint {path} is missing or incomplete (no {_DCP_METADATA}); {hint}")
    if not expect:
        return
    for name, size in expect["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"sharded checkpoint {path} lacks {name}; {hint}")
        if f.stat().st_size != size:
            raise CheckpointError(f"{f} is {f.stat().st_size} bytes, expected {size} (truncated or overwritten); {hint}")
    if hashlib.sha256((path / _DCP_METADATA).read_bytes()).hexdigest() != expect["metadata_sha256"]:
        raise CheckpointError(f"{path / _DCP_METADATA} does not match its checksum (corrupted); {hint}")
