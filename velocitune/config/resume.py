"""Resume compatibility: which config keys a resumed run may change, and the check that refuses the others."""

from __future__ import annotations

from typing import Any

from velocitune.config.schema import Config, to_dict
from velocitune.errors import ConfigError

# Config keys a resumed run may change; any other difference is refused with the difference shown.
RESUMABLE_CHANGES = (
    "log.",
    "checkpoint.",
    "train.device",
    "train.threads",
    "train.micro_batch_size",
    "train.compile",
    "train.activation_checkpointing",  # the same gradients, recomputed: a resumed run may switch it
    "train.loss_kernel",  # the same loss by another kernel (to rounding): a resumed run may switch it
    "train.memory_check",
    "eval.batch_size",
    "dist.",
    "run.out_dir",
    "prepare.",  # the stages before training do not shape a run that is already going
    "targets.",
    "plan.",
)


# What a run did before a key existed, where that differs from the key's default today: a run started by an
# older version never paced, and before 0.3 never refitted its targets or held domains to max_rise, so resuming
# it may not start doing so.
BEFORE_KEY: dict[str, Any] = {"mixing.pace": False, "mixing.online": False, "mixing.max_rise": None}


def check_resume_config(saved: dict, now: dict) -> None:
    """ConfigError listing every key that differs between a checkpoint's config and this one and shapes the run."""
    diffs = []
    defaults = to_dict(Config())  # a key newer than the checkpoint's config had its default then,
    for sec in now:  # or, for a key added with a behaviour of its own, the behaviour before it (BEFORE_KEY)
        for key, val in now[sec].items():
            dotted = f"{sec}.{key}"
            old = saved.get(sec, {}).get(key, BEFORE_KEY.get(dotted, defaults.get(sec, {}).get(key)))
            if old != val and not any(dotted.startswith(p) for p in RESUMABLE_CHANGES):
                diffs.append(f"  {dotted}: {old!r} -> {val!r}")
    if diffs:
        allowed = ", ".join(p + ("*" if p.endswith(".") else "") for p in RESUMABLE_CHANGES)
        raise ConfigError(
            "cannot resume: the config differs from the checkpoint's in keys that shape the run:\n"
            + "\n".join(diffs)
            + f"\nRevert them, or start a new run.out_dir. Keys that may change on resume: {allowed}"
        )

