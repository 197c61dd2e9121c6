"""The registry of mixing rules: every rule declared once, with everything a run needs to know about it.

A `RuleSpec` says what a rule is to the rest of the package: its parameters (name, default, bounds, a
one-line doc) and presets, when it updates by default (signal, interval m, warm-up, docs/design.md §3),
whether its weights move at all, whether it needs targets or ℓ_init, whether `mixing.pace` defaults to on,
how its arm is labelled in reports, and how it is built from the config. Config validation, `--help-config`,
the schedule, the controller and the report read it here.

Layering (no cycle, no lazy import): errors <- mixing <- rules <- config <- runfiles <- controller.
- `mixing.py` is the maths: the rule classes, one constructor per rule, each parameter's default
  (`mixing.RULE_PARAMS`, `mixing.PRESETS`) and bounds (`mixing.PARAM_BOUNDS`), and `mixing.make_rule`, the
  pure builder of the maths API. It never imports this module. A parameter's default and bounds are written
  there once; its `Param` here reads them and adds the doc line.
- This module adds the run's policy and imports `mixing` only (the config only for type checking), because
  config validation imports it.
- Reading another run's files is not done here: `runfiles` imports `config`, which imports this module, so
  the one rule that reads a file (replay: the mixture.jsonl of `mixing.replay_from`) declares it
  (`RuleSpec.reads_run`, see `run_log_input`) and the caller hands `build_rule` the parsed records.

Adding a rule: its class and constructor in `mixing.py`, one `RuleSpec` in `_BUILTIN` below (or `register`);
nothing else. A parameter of a new rule is set as `mixing.params.<name>` (validated against its `Param`s);
the parameters older rules had before the registry keep their typed keys (`mixing.eta`, ...).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from velocitune import mixing
from velocitune.errors import ConfigError
from velocitune.fileio import require_dir
from velocitune.peers import ado, aioli

if TYPE_CHECKING:  # the config imports this module: the type only, never at run time
    from velocitune.config import MixingConfig

# mixing.preset when the config leaves it unset (the label omits it; docs/design.md §3).
DEFAULT_PRESET = "robust"
# mixing.max_rise (nats) when the config leaves it unset and the targets are online: the issue-27 tolerance, about
# 2-10 seed sd of a domain's final loss in the studies (docs/study.md), small against the 0.16-0.31 nats the
# largest domain lost to static before it (docs/design.md §3).
DEFAULT_MAX_RISE = 0.03
# Typed MixingConfig keys (None: unset) that every adaptive rule receives when set: it refuses one it does not
# take; a fixed rule ignores them all, so that a sweep may cross `static` with mixing.eta (docs/usage.md).
SHARED_KEYS = ("eta", "smoothing", "floor", "relative_floor", "min_weight", "ema", "alpha")
# The run log a rule may read from a previous run directory (runfiles.MIXTURE_FILE; checked in tests).
MIXTURE_FILE = "mixture.jsonl"


@dataclass(frozen=True)
class Param:
    """One parameter of a rule: its default (mixing.RULE_PARAMS unless given), bounds (mixing.PARAM_BOUNDS),
    and a one-line doc for `--help-config`."""

    rule: str
    name: str
    doc: str
    default: Any = None

    @property
    def bounds(self) -> tuple[float, float | str, bool, bool] | None:
        return mixing.PARAM_BOUNDS.get(self.name)

    def check(self, value: Any) -> Any:
        """The value when it lies in the bounds (bounds that depend on the domain count wait for the build)."""
        return value if self.bounds is None else mixing.check_param(self.rule, self.name, value)

    def describe(self) -> str:
        if self.bounds is None:
            return f"{self.name} = {self.default!r}: {self.doc}"
        lo, hi, lo_open, hi_open = self.bounds
        top = hi if isinstance(hi, str) else f"{hi:g}"
        right = ")" if hi_open or hi == math.inf else "]"
        return f"{self.name} = {self.default!r} in {'(' if lo_open else '['}{lo:g}, {top}{right}: {self.doc}"


# What `build_rule` hands a spec's `inputs`: the config, the domains, the corpus's token counts (k,) and the
# parsed records of the run log the spec reads (`reads_run`), or None.
Inputs = Callable[["MixingConfig", Sequence[str], np.ndarray, "list[dict] | None"], dict[str, Any]]


@dataclass(frozen=True)
class RuleSpec:
    """Everything the package knows about one rule.

    adaptive: its weights move during a run (it needs an interval; the eval signal costs time). signal,
    interval, warmup: its default timing (interval None: max(1, steps // 100); warmup < 1: a fraction of the
    run, None: train.warmup_steps). presets: the mixing.PRESETS it takes. pace_presets: presets under which
    mixing.pace defaults to on. requires: config keys it cannot run without -> what they hold. reads_run: a
    config key naming a run directory whose mixture.jsonl it is built from. inputs: the maths parameters it
    takes from the run rather than from its `params` (token counts, replayed weights). own_schedule: None
    when it updates every m steps; else what sets its update steps (the rule's `schedule`, which the
    controller follows): it then reads only its own `signal`, and mixing.interval is refused. build: the
    builder, (name, w0, names, **params) -> mixing.Rule.
    """

    name: str
    summary: str
    params: tuple[Param, ...] = ()
    adaptive: bool = False
    needs_targets: bool = False
    needs_init: bool = False
    signal: str = "eval"
    interval: int | None = None
    warmup: float | None = None
    presets: tuple[str, ...] = ()
    pace_presets: tuple[str, ...] = ()
    requires: Mapping[str, str] = field(default_factory=dict)
    reads_run: str | None = None
    inputs: Inputs | None = None
    own_schedule: str | None = None
    build: Callable[..., mixing.Rule] = mixing.make_rule

    def param(self, name: str) -> Param:
        """The parameter `name`; ConfigError naming the closest one."""
        for p in self.params:
            if p.name == name:
                return p
        valid = [p.name for p in self.params]
        close = difflib.get_close_matches(name, valid, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"rule {self.name!r} has no parameter {name!r}{hint} (its parameters: {valid or 'none'})")


def _params(rule: str, **docs: str) -> tuple[Param, ...]:
    """The rule's parameters in mixing.RULE_PARAMS order, each with its doc line."""
    return tuple(Param(rule, name, doc, mixing.RULE_PARAMS[rule][name]) for name, doc in docs.items())


_VELOCITY_DOCS = {
    "eta": "η, the step size of the exponentiated update",
    "smoothing": "c: mix with uniform after each update (preset)",
    "floor": "δ_min (nats) on the velocity denominator (preset)",
    "relative_floor": "δ floor relative to the median gap ℓ_init - ℓ_target",
    "min_weight": "lower bound on every w_i after an update (<= 1/k)",
    "ema": "EMA of V across updates",
}


def _temperature_inputs(mc, names, token_counts, records) -> dict[str, Any]:
    return {"temperature": mc.temperature, "token_counts": np.asarray(token_counts, dtype=np.float64)}


def _replay_inputs(mc, names, token_counts, records) -> dict[str, Any]:
    return {"replay_weights": mixing.replay_weights_from_records(records, names, mode=mc.replay_mode)}


def _velocity_spec(name: str, summary: str, needs_targets: bool) -> RuleSpec:
    # signal "train" (issue 27): on every domain set measured it matched the eval signal at no cost, where the
    # eval signal took 22-56 % of the wall time (docs/results.md); `--mixing.signal=eval` is the paper's.
    return RuleSpec(name, summary, _params(name, **_VELOCITY_DOCS), adaptive=True, needs_targets=needs_targets,
                    needs_init=True, signal="train", presets=tuple(mixing.PRESETS), pace_presets=("robust",))


_BUILTIN = (
    RuleSpec("static", "w0 (the corpus's token shares, or mixing.weights), fixed"),
    RuleSpec("uniform", "1/k for every domain, fixed"),
    RuleSpec("temperature", "w ∝ n_i^(1/τ) over the token counts n_i, fixed",
             _params("temperature", temperature="τ (mixing.temperature)"), inputs=_temperature_inputs),
    _velocity_spec("velocitune", "Velocitune: w <- w·exp(η·V), V the learning velocity to the targets", True),
    _velocity_spec("velocitune-no-target", "the ablation with ℓ_target = 0 (needs only ℓ_init)", False),
    RuleSpec("dbl", "Sheared-LLaMA's dynamic batch loading (η·(ℓ - ℓ_ref), as its authors ran it)",
             _params("dbl", eta="η of the update", smoothing="c: mix with uniform after each update"),
             adaptive=True, needs_targets=True, warmup=0.0),  # at every evaluation, from the start
    RuleSpec("odm", "Online Data Mixing (EXP3 on exp(ℓ), as its authors ran it)",
             _params("odm", alpha="α, EMA of the reward (the authors' default 0.9)"),
             adaptive=True, signal="train", interval=1, warmup=0.02),  # every step after 2 % (2000 of 100k)
    RuleSpec("replay", "a previous run's mixture (mixing.replay_from; mixing.replay_mode: average | final), fixed",
             requires={"replay_from": "a run directory"}, reads_run="replay_from", inputs=_replay_inputs),
)


_AIOLI_DOCS = {
    "eta": "η of w = exp(η·Σ_i A[i]) (their 3-domain run: 0.1)",
    "ema": "γ, EMA of A across rounds (their 3-domain run: 0.5); see cumulative",
    "cumulative": "1: their path without --ema: w <- w·exp(η·Σ_i A[i]) from the last round's weights",
    "one_hot_factor": "f: a LearnParams block trains at f on its domain, (1 - f)/(k - 1) elsewhere; f = 1 skips the solve",
    "lp_rounds": "sweeps over the k domains per LearnParams (lowered to fit a scaled round)",
    "lp_steps": "steps per LearnParams block (< 1: fraction of the run, theirs 6 of 5000; at least 1)",
    "update_steps": "steps per round, LearnParams included (< 1: fraction of the run, theirs 250 of 5000)",
    "normalize": "1 (0 off): shift A to non-negative and divide by its sum (their runs: on)",
    "diagonal": "1: keep only A_ii = G_ii / f",
    "seed": "seed of the LearnParams order (a generator per round)",
}
_AIOLI = RuleSpec(
    "aioli", "Aioli (Chen et al. 2024): LearnParams blocks estimate the mixing law's A, w = exp(η·Σ_i A[i]) (as its "
    "authors ran it)",
    tuple(Param("aioli", name, doc, aioli.DEFAULTS[name]) for name, doc in _AIOLI_DOCS.items()),
    adaptive=True, warmup=0.0, build=aioli.make_aioli,
    own_schedule="learns from evaluations of the val sets after each LearnParams block (rounds of "
                 "mixing.params.update_steps, each starting with blocks of lp_steps)")  # rounds from step 0, no prior


# Every step on the train signal, from step 1 (its `schedule`); mixing.warmup (1/60 of the run: their 1000 of
# 60000 steps) is their start_step = ignore_steps, and the refit interval by default (docs/design.md §3).
_ADO = RuleSpec(
    "ado", "Adaptive Data Optimization (per-domain scaling laws fitted online, as its authors ran it)",
    tuple(Param("ado", name, doc, ado.DEFAULTS[name]) for name, doc in (
        ("refit", "steps between refits of the laws, >= 0 (0: mixing.warmup's step, their 1000 of 60k)"),
        ("min_prob", "clip_min_probability's floor on dist, in [0, 1/k]"),
        ("samples_per_step", "sequences per step on the laws' x-axis, > 0 (theirs: the global batch)"),
        ("starts", "L-BFGS starts per fit, the grid points of least objective of their 8x8x8 grid, in [1, 512] (theirs: 512)"))),
    adaptive=True, signal="train", interval=1, warmup=1 / 60, build=ado.make_ado,
    own_schedule="fits its laws to the training loss of every step and refits every mixing.params.refit steps")

_REGISTRY: dict[str, RuleSpec] = {s.name: s for s in (*_BUILTIN, _AIOLI, _ADO)}


# ------------------------------------------------------------------------------------------------ queries


def register(new: RuleSpec) -> RuleSpec:
    """Add a rule (ConfigError when its name is taken); `unregister` removes it again."""
    if new.name in _REGISTRY:
        raise ConfigError(f"a mixing rule named {new.name!r} is already registered")
    _REGISTRY[new.name] = new
    return new


def unregister(name: str) -> None:
    spec(name)
    del _REGISTRY[name]


def rule_names() -> tuple[str, ...]:
    """Every registered rule, in registration order."""
    return tuple(_REGISTRY)


def spec(name: str) -> RuleSpec:
    """The rule `name`; ConfigError with the closest name otherwise."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(f"unknown mixing rule '{name}'; allowed: {', '.join(_REGISTRY)}.{hint}")


def preset_names() -> tuple[str, ...]:
    """The presets of the velocity rules (mixing.PRESETS)."""
    return tuple(mixing.PRESETS)


def is_adaptive(name: str) -> bool:
    """Do the rule's weights move during a run?"""
    return spec(name).adaptive


def timing(name: str) -> dict[str, Any]:
    """The rule's default signal, interval and warmup (docs/design.md §3)."""
    s = spec(name)
    return {"signal": s.signal, "interval": s.interval, "warmup": s.warmup}


def online_default(name: str) -> bool:
    """mixing.online when the config leaves it unset: on for `velocitune` (the default rule; docs/design.md §3),
    off for its no-target ablation and every baseline, which run as their authors ran them."""
    return name == "velocitune"


def pace_default(name: str, preset: str) -> bool:
    """mixing.pace when the config leaves it unset: on for the velocity rules under the `robust` preset (it
    won on all three domain sets of issue 17's measurements, docs/results.md), off for `faithful` (the paper)
    and for every baseline, which run as their authors ran them (docs/design.md §3)."""
    return preset in spec(name).pace_presets


def arm_label(mc: MixingConfig) -> str:
    """The report label of a run's arm when run.arm is unset: the rule (+ preset when not the default, + the
    signal when not the rule's own, + "-pace" / "-nopace" when pacing is not the rule's default, + "-fixed" when
    a rule whose targets learn from the run by default keeps them fixed)."""
    s = spec(mc.rule)
    arm = mc.rule
    if s.presets and mc.preset != DEFAULT_PRESET:
        arm += f"-{mc.preset}"
    if s.adaptive and mc.signal != s.signal:
        arm += f"-{mc.signal}"  # velocitune-train, odm-eval
    if mc.pace != pace_default(mc.rule, mc.preset):
        arm += "-pace" if mc.pace else "-nopace"
    if online_default(mc.rule) and not mc.online:
        arm += "-fixed"  # velocitune-fixed: Stage B's targets, as before issue 27
    return arm


# ------------------------------------------------------------------------------------------ configuration


def check_params(rule: str, params: Mapping[str, Any], typed: Sequence[str]) -> None:
    """mixing.params against the rule's parameters: each must be one of them, not one with a typed key of its
    own (`typed`: MixingConfig's fields), and in its bounds. ConfigError naming the key otherwise."""
    s = spec(rule)
    for name, value in params.items():
        try:
            p = s.param(name)
        except ConfigError as e:
            raise ConfigError(f"config key 'mixing.params.{name}': {e}") from None
        if name in typed:
            raise ConfigError(f"config key 'mixing.params.{name}': set it as mixing.{name} (its own key)")
        try:
            p.check(value)
        except ConfigError as e:
            raise ConfigError(f"config key 'mixing.params.{name}': {e}") from None


def config_params(mc: MixingConfig) -> dict[str, Any]:
    """The parameters the config gives rule mc.rule (unset ones left to the rule's defaults): the set shared
    keys for an adaptive rule, the preset for a rule with presets, and mixing.params."""
    s = spec(mc.rule)
    given = {key: getattr(mc, key) for key in SHARED_KEYS if s.adaptive and getattr(mc, key) is not None}
    if s.presets:
        given["preset"] = mc.preset
    given.update(getattr(mc, "params", None) or {})
    return given


def run_log_input(mc: MixingConfig) -> Path | None:
    """The mixture.jsonl the rule is built from (a previous run's, `RuleSpec.reads_run`), checked to exist, or None.

    The caller reads it (runfiles.read_log(path, runfiles.MIXTURE, names)) and hands the records to `build_rule`.
    """
    key = spec(mc.rule).reads_run
    if key is None:
        return None
    run_dir = getattr(mc, key)
    require_dir(run_dir, f"mixing.{key}", "point it at a finished run directory")
    src = Path(run_dir) / MIXTURE_FILE
    if not src.is_file():
        raise ConfigError(f"mixing.{key}: '{src}' does not exist; point it at a finished run directory")
    return src


def check_own_schedule(s: RuleSpec, mc: MixingConfig) -> None:
    """A rule that sets its own update steps reads only its own signal and takes no mixing.interval."""
    if s.own_schedule is None:
        return
    if mc.signal != s.signal:
        raise ConfigError(f"rule {s.name!r} {s.own_schedule}; set mixing.signal={s.signal} (or leave it unset)")
    if mc.interval is not None:
        raise ConfigError(f"rule {s.name!r} sets its own update steps: it {s.own_schedule}; drop mixing.interval")


def build_rule(mc: MixingConfig, w0: np.ndarray, names: Sequence[str], token_counts: np.ndarray,
               records: list[dict] | None = None) -> mixing.Rule:
    """The config's mixing rule over `names`, starting from `w0`; token_counts (k,) feed the temperature rule;
    `records`: the parsed records of `run_log_input(mc)` for a rule that reads one (replay)."""
    s = spec(mc.rule)
    if s.reads_run is not None and records is None:
        raise ConfigError(f"rule {s.name!r} is built from the mixture.jsonl of mixing.{s.reads_run}; read it first "
                          "(rules.run_log_input)")
    check_own_schedule(s, mc)
    params = config_params(mc)
    if s.inputs is not None:
        params.update(s.inputs(mc, names, token_counts, records))
    return s.build(s.name, w0, names, **params)


def help_lines() -> list[str]:
    """The rules and their parameters for `--help-config`."""
    lines = []
    for s in _REGISTRY.values():
        t = timing(s.name)
        every = "its own steps" if s.own_schedule else f"interval {t['interval'] or 'steps // 100'}"
        when = (f"signal {t['signal']}, {every}, warmup "
                f"{'train.warmup_steps' if t['warmup'] is None else t['warmup']}") if s.adaptive else "fixed weights"
        needs = [w for w, on in (("targets", s.needs_targets), ("ℓ_init", s.needs_init)) if on]
        lines.append(f"  {s.name}: {s.summary} [{when}{'; needs ' + ', '.join(needs) if needs else ''}]")
        if s.presets:
            lines.append(f"      presets: {', '.join(f'{k} {v}' for k, v in mixing.PRESETS.items())}")
        lines += [f"      {p.describe()}" for p in s.params]
    return lines


__all__ = ["DEFAULT_MAX_RISE", "DEFAULT_PRESET", "online_default", "Param", "RuleSpec", "arm_label", "build_rule", "check_params", "config_params",
           "help_lines", "is_adaptive", "pace_default", "preset_names", "register", "rule_names", "run_log_input", "spec",
           "timing", "unregister"]

