"""Typed run configuration: dataclasses with working defaults, YAML files and dotted CLI overrides.

A YAML file only overrides defaults; `--section.key=value` overrides the file. Unknown keys are errors
that name the closest valid key; wrong types and out-of-range values say which key and what is allowed.
The fully resolved config is printed before training and saved as `config.yaml` in the run directory.

One module per job: `schema` (the dataclasses and defaults), `loading` (YAML, overrides, coercion, dumping),
`validation` (choices and ranges, one check per section), `resume` (what a resumed run may change),
`helptext` (`--help-config`). Which mixing rules exist lives in the registry, velocitune/rules.py.
"""

from velocitune.config.helptext import HELP_NOTES, help_text
from velocitune.config.loading import (
    CONFIG_VERSION,
    dump_yaml,
    from_dict,
    load_config,
    parse_override,
    set_dotted,
    valid_keys,
)
from velocitune.config.resume import BEFORE_KEY, RESUMABLE_CHANGES, check_resume_config
from velocitune.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    DistConfig,
    EvalConfig,
    LogConfig,
    MixingConfig,
    ModelConfig,
    PlanConfig,
    PrepareConfig,
    RunConfig,
    TargetsConfig,
    TrainConfig,
    to_dict,
)
from velocitune.config.validation import CHOICES, choices, validate

__all__ = [
    "BEFORE_KEY", "CHOICES", "CONFIG_VERSION", "HELP_NOTES", "RESUMABLE_CHANGES",
    "CheckpointConfig", "Config", "DataConfig", "DistConfig", "EvalConfig", "LogConfig", "MixingConfig",
    "ModelConfig", "PlanConfig", "PrepareConfig", "RunConfig", "TargetsConfig", "TrainConfig",
    "check_resume_config", "choices", "dump_yaml", "from_dict", "help_text", "load_config",
    "parse_override", "set_dotted", "to_dict", "valid_keys", "validate",
]
