"""Where a run's scalars go besides metrics.jsonl: TensorBoard and Weights & Biases, one naming for both.

Both are optional (a missing package is a ConfigError saying how to install it or turn the logger off)
and no-ops when disabled; `flat_scalars` gives both the same tag for every number of a metrics record.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from velocitune.errors import ConfigError


class TensorBoardLogger:
    """Optional TensorBoard scalars (loss, per-domain losses, weights, velocity); a no-op when disabled."""

    def __init__(self, log_dir: str | os.PathLike, enabled: bool):
        self.enabled = enabled
        self._writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ConfigError(
                "TensorBoard logging is enabled but the `tensorboard` package is not installed: run "
                "pip install 'velocitune[tensorboard]', or turn TensorBoard off in the config"
            ) from exc
        self._writer = SummaryWriter(log_dir=str(log_dir))

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._writer is not None:
            self._writer.add_scalar(tag, float(value), global_step=step)

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        """Write every number in `values` under "prefix/key" (just "key" when `prefix` is ""); a nested
        mapping nests the tag ("weights/math"). Strings, lists and None are skipped, so a whole
        metrics record can be passed as it is."""
        if self._writer is None:
            return
        for tag, value in flat_scalars(prefix, values).items():
            self.scalar(tag, value, step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> TensorBoardLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def flat_scalars(prefix: str, values: Mapping[str, Any]) -> dict[str, float]:
    """{"prefix/key": float} of every number in `values`, nested mappings nesting the tag ("weight/math"); strings,
    lists and None are skipped. TensorBoard and W&B both name their scalars this way, so they match."""
    out: dict[str, float] = {}
    for key, value in values.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flat_scalars(tag, value))
        elif _is_number(value):
            out[tag] = float(value)
    return out


def new_wandb_run_id() -> str:
    """A fresh W&B run id (lower-case hex: valid in W&B ids and URLs), chosen by us so it can be saved before
    wandb.init and a crash in between still resumes the same run."""
    return secrets.token_hex(6)


def import_wandb():
    """The `wandb` module, or a ConfigError saying how to install it."""
    try:
        import wandb
    except ImportError as exc:
        raise ConfigError(
            "Weights & Biases logging is enabled (log.wandb: true) but the `wandb` package is not installed: run "
            "pip install 'velocitune[wandb]', or set log.wandb=false"
        ) from exc
    return wandb


class WandbLogger:
    """Optional Weights & Biases run: the same scalars as TensorBoard, under the same names and steps, plus the
    config, summary values and images; a no-op when disabled. Create it on rank 0 only.

    Every `scalars` call is logged with `step=` the optimizer steps done, so W&B's step axis is TensorBoard's.
    W&B merges calls at one step into one history row and drops a call at a step lower than the last it saw
    (it warns): the trainer logs in step order, and on `--resume` the steps re-done after the checkpoint go
    to W&B again (see docs/usage.md, "Weights & Biases").
    """

    def __init__(self, enabled: bool, *, run_id: str | None = None, project: str = "velocitune",
                 entity: str | None = None, name: str | None = None, group: str | None = None,
                 tags: Sequence[str] = (), mode: str = "auto", config: Mapping[str, Any] | None = None,
                 local_dir: str | os.PathLike | None = None):
        self.enabled = enabled
        self._run = None
        self._wandb = None
        if not enabled:
            return
        wandb = self._wandb = import_wandb()
        if local_dir is not None:
            Path(local_dir).mkdir(parents=True, exist_ok=True)  # W&B refuses a `dir` that does not exist
        # resume="allow": the id is ours (new_wandb_run_id), so the first start creates the run and `--resume`
        # continues it; "must" would refuse to resume online a run whose first process logged offline.
        try:
            self._run = wandb.init(id=run_id, resume="allow", project=project, entity=entity, name=name, group=group,
                                   tags=list(tags), mode=None if mode == "auto" else mode,
                                   dir=None if local_dir is None else str(local_dir))
        except wandb.errors.Error as exc:  # not logged in, no network, a project or entity W&B refuses, ...
            raise ConfigError(
                f"Weights & Biases could not start the run ({exc}); run `wandb login`, check log.wandb_project and "
                "log.wandb_entity, or log without network with log.wandb_mode=offline (upload later: `wandb sync`)"
            ) from exc
        if config is not None:
            # Not through init(config=...): a resumed run may have changed log.* keys, and W&B refuses a changed
            # config value on a resumed run unless told the change is wanted.
            self._run.config.update(dict(config), allow_val_change=True)

    @property
    def run_id(self) -> str | None:
        return None if self._run is None else self._run.id

    def scalar(self, tag: str, value: float, step: int) -> None:
        if self._run is not None:
            self._run.log({tag: float(value)}, step=step)

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        """Log every number in `values` as "prefix/key" at `step` (the TensorBoard logger's rules, same names)."""
        if self._run is not None:
            flat = flat_scalars(prefix, values)
            if flat:
                self._run.log(flat, step=step)

    def summary(self, prefix: str, values: Mapping[str, Any]) -> None:
        """Set the run summary's "prefix/key" values (W&B shows them in its runs table)."""
        if self._run is not None:
            self._run.summary.update(flat_scalars(prefix, values))

    def images(self, images: Mapping[str, tuple[str | os.PathLike, str]], step: int) -> None:
        """Log {tag: (PNG path, caption)} as W&B images at `step`; W&B copies the files when they are logged."""
        if self._run is not None and images:
            self._run.log({tag: self._wandb.Image(str(path), caption=caption) for tag, (path, caption) in images.items()},
                          step=step)

    def close(self, exit_code: int = 0) -> None:
        """Finish the run (exit_code != 0 marks it failed in W&B; `--resume` continues it all the same)."""
        if self._run is not None:
            run, self._run = self._run, None
            run.finish(exit_code=exit_code)
            if self._wandb.run is None:
                # W&B's service process closes the run's files on its own schedule, after finish() returns (seen:
                # an offline transaction log still empty when read right after). With no other W&B run in this
                # process, shut the service down (it waits for them), so the files are complete when training
                # returns; the next wandb.init starts a new service.
                self._wandb.teardown()


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float, np.number)):
        return True
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(value, torch.Tensor) and value.numel() == 1
