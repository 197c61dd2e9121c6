"""`--help-config`: every config key with its default, and every mixing rule with its parameters (the registry)."""

from __future__ import annotations

import dataclasses

from velocitune import rules
from velocitune.config.schema import Config
from velocitune.config.validation import choices

# One-line notes `--help-config` adds after a key's default, where the name and the default do not say enough.
HELP_NOTES = {
    "log.wandb": "   # Weights & Biases logging (pip install 'velocitune[wandb]'); rank 0 only; --resume continues the run",
    "log.wandb_entity": "   # null: W&B's default entity",
    "log.wandb_name": "   # null: the run directory's name",
    "train.activation_checkpointing": " (block: recompute each decoder block in backward; less memory, ~1/3 more compute)",
    "train.memory_check": "   # false: start even when the memory estimate exceeds the device's memory",
    "model.attn_implementation": " (flash_attention_2 needs the flash_attn package and CUDA)",
    "log.wandb_mode": " (auto: $WANDB_MODE, else online; offline writes RUN/wandb/ for `wandb sync`)",
    "mixing.signal": " (auto: the rule's: train for velocitune, velocitune-no-target, odm and ado; eval for the others)",
    "mixing.online": "   # null: true for velocitune (targets refitted from the run, the targets file as prior), false otherwise",
    "mixing.objective": "   # {domain: weight}: the loss to lower (null: every domain 1, the mean)",
    "mixing.max_rise": "   # nats over a domain's predicted loss under static (null: 0.03 with online targets; .inf: allow trades)",
    "mixing.pace": "   # null: true for velocitune's robust preset, false for faithful and the baselines",
    "mixing.params": "   # {name: value}: a rule's parameters that have no key of their own (see the rules below)",
}


def help_text() -> str:
    """Every key with its default, then the rules of the registry, for `velocitune train --help-config`."""
    lines = []
    allowed_values = choices()
    for section in dataclasses.fields(Config):
        lines.append(f"{section.name}:")
        # The declared defaults (a constructed MixingConfig has already resolved signal 'auto').
        for f in dataclasses.fields(section.default_factory):
            key = f"{section.name}.{f.name}"
            v = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            allowed = allowed_values.get(key)
            extra = f"   # one of: {', '.join(allowed)}" if allowed else ""
            lines.append(f"  {f.name}: {v!r}{extra}{HELP_NOTES.get(key, '')}")
    lines.append("")
    lines.append("mixing.rule: the rules, their default timing and parameters (defaults before a preset applies):")
    lines += rules.help_lines()
    return "\n".join(lines)
