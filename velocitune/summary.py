"""What a finished run leaves besides its logs: summary.json's document, final/ and the run's arm label.

`velocitune train` writes final/ first and summary.json last: a summary marked complete is the commit
point of a finished run (runfiles.run_is_complete), so `--resume` of it, a sweep or a pipeline stage
skips it, and a run killed before it resumes and writes both again.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from velocitune import __version__, rules, runfiles
from velocitune.config import Config
from velocitune.controller import MixingController
from velocitune.metrics import Timers


def default_arm(cfg: Config) -> str:
    """The label that groups seeds in reports: run.arm, else the registry's label of the rule (rules.arm_label:
    + preset, + the signal when not the rule's own, + "-pace" / "-nopace" when pacing is not the rule's default)."""
    return cfg.run.arm or rules.arm_label(cfg.mixing)


def save_final(model: torch.nn.Module, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    """final/: a save_pretrained directory (plus tokenizer), written beside and renamed into place."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def run_summary(cfg: Config, mix: MixingController, steps: int, final: np.ndarray, timers: Timers,
                **measured: Any) -> dict[str, Any]:
    """summary.json's document: what the run was, ℓ_init, targets and final validation losses (k,), tokens and
    epochs per domain, where the time went; `measured` adds wall_time_s, skipped_steps, world_size and the
    overhead estimates and measurement."""
    names = mix.names
    return {
        "velocitune_version": __version__, "arm": default_arm(cfg), "rule": cfg.mixing.rule,
        "preset": cfg.mixing.preset, "signal": cfg.mixing.signal, "seed": cfg.train.seed, "domains": names,
        "steps": steps, "tokens": steps * mix.seq_len * mix.sampler.global_batch,
        "init_loss": dict(zip(names, map(float, mix.init))),
        "targets": runfiles.per_domain(names, mix.targets), "final_val_loss": dict(zip(names, final.tolist())),
        "tokens_per_domain": dict(zip(names, mix.tokens_per_domain(steps).tolist())),
        "epochs_per_domain": dict(zip(names, mix.sampler.epochs(steps).tolist())),
        "time_eval_s": timers.total("eval"), "time_update_s": timers.total("reweight"),
        "time_data_s": timers.total("data"), "time_checkpoint_s": timers.total("checkpoint"),
        **measured, "complete": True,
    }

