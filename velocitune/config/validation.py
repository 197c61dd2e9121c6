"""Validation of a config: choices, ranges and cross-key rules that do not need the data (those live in train.py).

One small check per section; the mixing section asks the rule registry (velocitune/rules.py) which rules,
presets and rule parameters exist, so a registered rule is accepted without an edit here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math

from velocitune import rules
from velocitune.config.schema import Config, MixingConfig, to_dict
from velocitune.errors import ConfigError

# Allowed values of the keys with a fixed set of choices; the rule and preset come from the registry (`choices`).
CHOICES = {
    "mixing.signal": ("auto", "eval", "train"),
    "mixing.replay_mode": ("average", "final"),
    "train.schedule": ("cosine", "wsd", "constant"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.nan_policy": ("stop", "skip"),
    "train.activation_checkpointing": ("off", "block"),
    "train.loss_kernel": ("chunked", "liger"),
    "model.attn_implementation": ("sdpa", "eager", "flash_attention_2"),
    "log.wandb_mode": ("auto", "online", "offline", "disabled"),
    "dist.strategy": ("ddp", "fsdp2"),
    "dist.backend": ("auto", "nccl", "gloo"),
    "targets.predictor": ("cpt_law", "chinchilla", "auto"),
    "targets.proxy_schedule": ("compressed", "constant"),
    "plan.law": ("auto", "mixing", "share"),
    "plan.stage1": ("offset", "extrapolate"),
}


def choices() -> dict[str, tuple[str, ...]]:
    """Every key with a fixed set of values: the registry's rules and presets (read now), then CHOICES."""
    return {"mixing.rule": rules.rule_names(), "mixing.preset": rules.preset_names(), **CHOICES}


def check(ok: bool, key: str, msg: str) -> None:
    """ConfigError "config key 'KEY' MSG" unless ok."""
    if not ok:
        raise ConfigError(f"config key '{key}' {msg}")


def _check_finite(d: dict) -> None:
    """inf and nan pass range checks such as `lr > 0` and then fail deep inside training: refuse them here."""
    for sec, body in d.items():
        for key, value in body.items():
            values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
            for v in values:
                if f"{sec}.{key}" == "mixing.max_rise" and v == math.inf:
                    continue  # max_rise = inf: trades allowed (no domain is protected)
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"config key '{sec}.{key}' must be a finite number, got {v}")


def _check_choices(d: dict) -> None:
    for key, allowed in choices().items():
        sec, name = key.split(".")
        v = d[sec][name]
        if v not in allowed:
            close = difflib.get_close_matches(str(v), allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"config key '{key}' is '{v}'; allowed: {', '.join(allowed)}.{hint}")


def _check_train(cfg: Config) -> None:
    t, dc = cfg.train, cfg.data
    check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    check(0 < t.decay_fraction <= 1, "train.decay_fraction", f"must be in (0, 1], got {t.decay_fraction}")
    check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    check(t.micro_batch_size is None or t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    check(t.steps is None or t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    check(t.tokens is None or t.tokens >= 1, "train.tokens", f"must be >= 1, got {t.tokens}")
    check(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 disables), got {t.grad_clip}")
    check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    check(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
    check(t.loss_chunk_tokens >= 1, "train.loss_chunk_tokens", "must be >= 1")
    check(0 <= t.seed < 2**63, "train.seed", f"must be an integer in [0, 2**63), got {t.seed}")
    check(dc.seq_len >= 1, "data.seq_len", f"must be >= 1, got {dc.seq_len}")
    check(dc.max_repetition > 0, "data.max_repetition", f"must be > 0, got {dc.max_repetition}")
    check(0 < dc.subsample <= 1, "data.subsample", f"must be in (0, 1], got {dc.subsample}")


def _check_mixing(m: MixingConfig) -> None:
    check(m.interval is None or m.interval >= 1, "mixing.interval", f"must be >= 1, got {m.interval}")
    check(m.warmup is None or m.warmup >= 0, "mixing.warmup", f"must be >= 0, got {m.warmup}")
    check(m.eta is None or m.eta > 0, "mixing.eta", f"must be > 0, got {m.eta}")
    check(m.smoothing is None or 0 <= m.smoothing <= 1, "mixing.smoothing", "must be in [0, 1]")
    check(m.floor is None or m.floor > 0, "mixing.floor", "must be > 0 (it guards a division by the gap)")
    check(m.ema is None or 0 <= m.ema < 1, "mixing.ema", "must be in [0, 1)")
    check(m.temperature > 0, "mixing.temperature", "must be > 0")
    check(0 <= m.sampling_floor < 1, "mixing.sampling_floor", "must be in [0, 1)")
    if m.weights is not None:
        w = list(m.weights.values())
        check(all(x >= 0 for x in w) and sum(w) > 0, "mixing.weights", "must be non-negative with a positive sum")
        check(abs(sum(w) - 1) < 1e-6, "mixing.weights", f"must sum to 1, they sum to {sum(w):.6g}")
    check(m.max_rise is None or m.max_rise >= 0, "mixing.max_rise", f"must be >= 0 nats (inf: allow trades), got {m.max_rise}")
    # mixing.online and mixing.max_rise act on the velocitune rule only (max_rise through its online laws); like the
    # shared keys, any other rule ignores them, so that a sweep may cross `static` with a velocitune config.
    if m.objective is not None:
        o = list(m.objective.values())
        check(all(x >= 0 and math.isfinite(x) for x in o) and sum(o) > 0, "mixing.objective",
              "must be non-negative weights with a positive sum, e.g. {code: 2, math: 1}")
    spec = rules.spec(m.rule)
    for key, what in spec.requires.items():
        check(getattr(m, key) is not None, f"mixing.{key}", f"is required by rule '{m.rule}' ({what})")
    rules.check_params(m.rule, m.params, [f.name for f in dataclasses.fields(MixingConfig)])


def _check_runtime(cfg: Config) -> None:
    """eval, log, checkpoint and dist (prepare.* is checked by `velocitune.prepare` itself)."""
    check(cfg.eval.max_tokens >= 1, "eval.max_tokens", "must be >= 1")
    check(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    check(cfg.log.interval >= 1, "log.interval", "must be >= 1")
    check(bool(cfg.log.wandb_project.strip()), "log.wandb_project", "must name a W&B project, got an empty string")
    check(cfg.checkpoint.interval is None or cfg.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0")
    check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    check(cfg.checkpoint.preempt_check_interval >= 1, "checkpoint.preempt_check_interval", "must be >= 1")
    check(not cfg.dist.fsdp_cpu_offload or cfg.dist.strategy == "fsdp2", "dist.fsdp_cpu_offload",
          "needs dist.strategy=fsdp2 (DDP keeps a full replica on every device)")


def _check_targets_plan(cfg: Config) -> None:
    tc, pl = cfg.targets, cfg.plan
    check(0 < tc.fraction <= 1, "targets.fraction", f"must be in (0, 1], got {tc.fraction}")
    check(tc.points >= 4, "targets.points", f"must be >= 4 to fit a law, got {tc.points}")
    check(0 < pl.budget <= 4, "plan.budget", f"must be in (0, 4] (a share of the main run's steps), got {pl.budget}")
    check(0 < pl.tilt < 1, "plan.tilt", f"must be in (0, 1), got {pl.tilt}")
    check(pl.points >= 4, "plan.points", f"must be >= 4 to fit a law, got {pl.points}")
    for key, d in (("plan.objective", pl.objective), ("plan.max_rise", pl.max_rise)):
        check(d is None or all(v >= 0 for v in d.values()), key, "must map domain names to numbers >= 0")
    check(pl.objective is None or sum(pl.objective.values()) > 0, "plan.objective", "needs a positive weight")


def validate(cfg: Config) -> None:
    """Range and choice checks that do not need the data (those that do live in train.py)."""
    d = to_dict(cfg)
    _check_finite(d)
    _check_choices(d)
    _check_train(cfg)
    _check_mixing(cfg.mixing)
    _check_runtime(cfg)
    _check_targets_plan(cfg)
