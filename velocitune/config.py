"""Typed run configuration: dataclasses with working defaults, YAML files and dotted CLI overrides.

A YAML file only overrides defaults; `--section.key=value` overrides the file. Unknown keys are errors
that name the closest valid key; wrong types and out-of-range values say which key and what is allowed.
The fully resolved config is printed before training and saved as `config.yaml` in the run directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from velocitune.errors import ConfigError

RULES = (
    "static",
    "uniform",
    "temperature",
    "velocitune",
    "velocitune-no-target",
    "dbl",
    "odm",
    "replay",
)


@dataclass
class RunConfig:
    out_dir: str = "runs/run"  # the run directory (config.yaml, metrics.jsonl, checkpoints/, final/ ...)
    arm: str | None = None  # label grouping seeds in reports; default: rule (+ "-train" for the train signal)


@dataclass
class DataConfig:
    path: str = ""  # a directory written by `velocitune prepare` (required)
    seq_len: int = 256  # tokens per training sequence (windows hold seq_len + 1)
    max_repetition: float = 1.0  # epochs a domain may be drawn before its weight is capped
    subsample: float = 1.0  # stratified fraction of every domain's windows (proxy runs use 0.1)


@dataclass
class ModelConfig:
    path: str | None = None  # local Hugging Face causal LM directory; None builds a fresh Llama
    tokenizer: str | None = None  # saved into final/; default: the model directory's tokenizer
    # Sizes of a fresh Llama-style model (used when `path` is None, e.g. the demo's base model).
    hidden_size: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    intermediate_size: int | None = None
    tie_embeddings: bool = True
    # Attention kernel, passed to transformers: sdpa (torch's fused attention) | eager (the explicit softmax; keeps a
    # (batch, heads, T, T) matrix per layer) | flash_attention_2 (needs the flash_attn package and a CUDA GPU).
    attn_implementation: str = "sdpa"


@dataclass
class TrainConfig:
    steps: int | None = None  # optimizer steps; default from `tokens`, else one epoch of the corpus
    tokens: int | None = None  # token budget (alternative to steps)
    batch_size: int = 16  # global batch, in sequences, per optimizer step
    micro_batch_size: int | None = None  # per rank per forward; default: the whole rank share
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final LR = min_lr_ratio * lr (cosine and WSD)
    warmup_steps: float = 0.05  # < 1: fraction of the run; >= 1: steps
    schedule: str = "cosine"  # cosine | wsd | constant
    decay_fraction: float = 0.2  # WSD: share of the run spent decaying
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 autocast on GPU, fp32 on CPU) | bf16 | fp32
    compile: bool = False  # torch.compile the model
    nan_policy: str = "stop"  # stop | skip: what a NaN/inf loss does
    loss_chunk_tokens: int = 2048  # tokens per chunk of the memory-light cross-entropy
    threads: int | None = None  # torch CPU threads; None leaves torch's default
    # off | block: recompute each decoder block in backward, keeping only its input (less memory, ~1/3 more compute).
    activation_checkpointing: str = "off"
    loss_kernel: str = "chunked"  # chunked (any device) | liger (CUDA + liger-kernel: fused linear cross-entropy)
    memory_check: bool = True  # refuse to start when the memory estimate exceeds the device's memory


@dataclass
class MixingConfig:
    rule: str = "velocitune"  # one of RULES
    preset: str = "robust"  # velocitune: faithful (paper: c=0) | robust
    signal: str = "auto"  # eval (val sets; the paper) | train (per-domain training loss, no extra cost) | auto: the rule's (RULE_TIMING)
    interval: int | None = None  # m, optimizer steps between updates; default: the rule's (RULE_TIMING), else max(1, steps // 100)
    warmup: float | None = None  # steps before the first update (< 1: fraction of the run); default: the rule's, else train.warmup_steps
    eta: float | None = None  # step size; None: the rule's/preset's default
    smoothing: float | None = None  # c: mix with uniform after each update
    floor: float | None = None  # δ_min on the velocity denominator (nats)
    relative_floor: float | None = None  # δ floor relative to the median gap l_init - l_target
    min_weight: float | None = None  # lower bound on every w_i after an update
    ema: float | None = None  # EMA of V across updates
    temperature: float = 2.0  # temperature rule: w ∝ n_i^(1/τ)
    alpha: float | None = None  # odm: EMA of the importance-weighted reward
    sampling_floor: float = 0.0  # minimum sampling weight of any non-exhausted domain
    pace: bool | None = None  # spread each domain's repetition allowance over the rest of the run; default: pace_default()
    weights: dict[str, float] | None = None  # initial weights; default w0 (token shares)
    targets: str | None = None  # targets.json from `velocitune targets`
    target_values: dict[str, float] | None = None  # explicit targets per domain (override the file)
    init_loss: str | None = None  # init_loss.json; default: measured at step 0 and cached
    plan: str | None = None  # plan.json of `velocitune plan`: weights, targets, ℓ_init (over the files; weights/target_values win)
    replay_from: str | None = None  # replay rule: a previous run directory (its mixture.jsonl)
    replay_mode: str = "average"  # replay: average | final

    def __post_init__(self) -> None:
        if self.signal == "auto":  # resolved on construction, so config.yaml records the signal the run used
            self.signal = rule_timing(self.rule)["signal"]
        if self.pace is None:  # likewise: config.yaml records whether the run paced
            self.pace = pace_default(self.rule, self.preset)


def pace_default(rule: str, preset: str) -> bool:
    """mixing.pace when the config leaves it unset: on for the velocity rules under the `robust` preset (it
    won on all three domain sets of issue 17's measurements, docs/results.md), off for `faithful` (the paper)
    and for every baseline, which run as their authors ran them (docs/design.md §3)."""
    return rule in ("velocitune", "velocitune-no-target") and preset == "robust"


@dataclass
class EvalConfig:
    max_tokens: int = 32768  # validation tokens per domain per evaluation (whole windows)
    batch_size: int = 16  # sequences per forward in evaluation
    interval: int | None = None  # steps between validation evals for curves; default: mixing interval (eval signal) or steps // 10
    points: list[int] | None = None  # explicit eval steps (proxy runs), replaces interval


@dataclass
class LogConfig:
    interval: int = 10  # optimizer steps between metrics.jsonl records
    tensorboard: bool = False  # TensorBoard scalars in RUN/tb/ (extra velocitune[tensorboard])
    progress: bool = True
    # Weights & Biases (extra velocitune[wandb]; rank 0 only): the TensorBoard scalars, the config, the final
    # losses and the report's plots; `--resume` continues the same W&B run (its id is kept in RUN/wandb.json).
    wandb: bool = False
    wandb_project: str = "velocitune"
    wandb_entity: str | None = None  # team or user; None: W&B's default entity
    wandb_name: str | None = None  # the run's display name; None: the run directory's name
    wandb_tags: list[str] = field(default_factory=list)
    wandb_mode: str = "auto"  # auto (W&B's: $WANDB_MODE, else online) | online | offline (no network; `wandb sync` later) | disabled


@dataclass
class CheckpointConfig:
    interval: int | None = None  # steps between checkpoints; default steps // 5; 0 disables
    keep: int = 2  # keep the newest K valid checkpoints
    save_final: bool = True  # write final/ (save_pretrained model + tokenizer)
    # Under torchrun, the ranks agree every N steps on whether a SIGTERM/SIGUSR1 arrived (one all-reduce of one
    # number on a CPU group, no GPU sync); a signal is acted on within N steps. One process checks every step.
    preempt_check_interval: int = 1


@dataclass
class DistConfig:
    strategy: str = "ddp"  # ddp | fsdp2 (used only under torchrun)
    fsdp_cpu_offload: bool = False  # fsdp2: keep sharded parameters, gradients and optimizer state in CPU memory
    backend: str = "auto"  # auto (nccl on GPU, gloo on CPU) | nccl | gloo
    check_weights: bool = False  # debug: assert identical mixture weights on every rank


@dataclass
class PrepareConfig:
    """`velocitune prepare`: corpora -> token shards in data.path (flags such as --domain set these keys)."""

    tokenizer: str | None = None  # local HF tokenizer directory; default: model.tokenizer, else model.path
    # Each domain's inputs: files, directories (read recursively), glob patterns or local datasets
    # (hf:PATH[:SPLIT][:FIELD], read through `datasets`); one path or a list.
    domains: dict[str, list[str] | str] = field(default_factory=dict)
    val_fraction: float = 0.01  # share of documents eligible for the validation split
    val_tokens: int = 1_000_000  # cap on validation tokens per domain
    workers: int | None = None  # tokenizer processes; default: number of CPUs; 1 = in this process
    text_field: str = "text"  # JSON field / Parquet or dataset column holding the text
    extensions: list[str] = field(default_factory=list)  # extra extensions read as plain text, e.g. [.c, .h]
    strict: bool = False  # fail on a file that is not UTF-8 instead of skipping it with a warning
    shard_tokens: int = 100_000_000  # tokens per output shard file
    num_shards: int = 1  # split the work over N machines: this run writes part shard_index
    shard_index: int = 0
    merge: list[str] | None = None  # part directories of a sharded prepare to merge into data.path


@dataclass
class TargetsConfig:
    """`velocitune targets`: the proxy run and the law that predict each domain's target loss."""

    fraction: float = 0.2  # proxy subsample p (docs/study.md chose 0.2 over the paper's 0.1)
    points: int = 20  # evaluation points over [0.1, 1] of the proxy
    predictor: str = "cpt_law"  # cpt_law (LR-aware CPT law) | chinchilla (the paper) | auto
    proxy_schedule: str = "compressed"  # compressed: the main schedule squeezed | constant: peak LR, no anneal


@dataclass
class PlanConfig:
    """`velocitune plan`: proxy runs at a few mixtures, a mixture law per domain, a recommended mixture."""

    budget: float = 0.5  # the proxies' training steps together, as a share of the main run's
    tilt: float = 0.5  # the design: w0, uniform, and (1 - tilt)·w0 + tilt·e_i for every domain i
    points: int = 6  # evaluation points of each proxy over [0.1, 1] of it (its step-0 loss is shared)
    law: str = "auto"  # auto (lowest leave-one-mixture-out error per domain) | mixing (Ye et al.) | share (D-CPT term)
    stage1: str = "offset"  # offset: w0's main-budget loss + each proxy's end-loss offset from w0's | extrapolate: each proxy's own fit
    objective: dict[str, float] | None = None  # weight of each domain's loss in the objective; default equal (the mean)
    max_rise: dict[str, float] | None = None  # domain -> largest tolerated rise (nats) over its predicted loss under w0


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    prepare: PrepareConfig = field(default_factory=PrepareConfig)
    targets: TargetsConfig = field(default_factory=TargetsConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


# When the adaptive rules update unless the config says otherwise: the baselines as their authors ran
# them (docs/design.md §3). signal; interval m (None: max(1, steps // 100)); warmup, the steps before the
# first update (< 1: a fraction of the run; None: train.warmup_steps).
RULE_TIMING: dict[str, dict[str, Any]] = {
    # ODM: every step, on the training loss of that step, after 2000 of 100k steps (their train_1B scripts).
    "odm": {"signal": "train", "interval": 1, "warmup": 0.02},
    # Sheared-LLaMA: at every evaluation (400 of 48k steps in continual pre-training), from the start.
    "dbl": {"signal": "eval", "interval": None, "warmup": 0.0},
}
DEFAULT_TIMING: dict[str, Any] = {"signal": "eval", "interval": None, "warmup": None}


def rule_timing(rule: str) -> dict[str, Any]:
    """signal, interval and warmup defaults of `rule` (RULE_TIMING, else DEFAULT_TIMING)."""
    return RULE_TIMING.get(rule, DEFAULT_TIMING)


# A config file may say which format it is written in; files without the key are version 1.
CONFIG_VERSION = 1


CHOICES = {
    "mixing.rule": RULES,
    "mixing.preset": ("faithful", "robust"),
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


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts, e.g. 'train.lr'."""
    keys = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(cls, f.name)
        if sub is not None:
            keys += valid_keys(sub, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_type(cls: type, name: str) -> type | None:
    t = _hints(cls)[name]
    return t if dataclasses.is_dataclass(t) else None


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    if not close:  # try the last component alone: `--lr` -> train.lr
        tail = key.split(".")[-1]
        close = [k for k in valid_keys() if k.split(".")[-1] == tail][:1] or difflib.get_close_matches(
            tail, [k.split(".")[-1] for k in valid_keys()], n=1, cutoff=0.6
        )
        close = [k for k in valid_keys() if close and k.split(".")[-1] == close[0].split(".")[-1]][:1]
    hint = f" Did you mean '{close[0]}'?" if close else " Run `velocitune train --help-config` for all keys."
    return ConfigError(f"unknown config key '{key}'.{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type `tp`, converting int->float where lossless."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping like {{name: value}}, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (vt,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, vt) for i, v in enumerate(value)]
    raise TypeError(f"unsupported config type {tp} for {key}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            if isinstance(value, dict) and len(value) == 1:  # `trian: {lr: ..}` -> report 'trian.lr'
                dotted += "." + str(next(iter(value)))
            raise _unknown_key(dotted)
        sub = _dataclass_type(cls, key)
        if sub is not None:
            kwargs[key] = _build(sub, value or {}, dotted + ".")
        else:
            kwargs[key] = _coerce(dotted, value, hints[key])
    return cls(**kwargs)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> Config:
    """A validated Config from a nested mapping (a YAML file's content); `version` may say its format."""
    data = dict(data or {})
    version = data.pop("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(
            f"config 'version' is {version!r}, but this velocitune reads config version {CONFIG_VERSION}; "
            "drop the key or write the config for this version"
        )
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """'--train.lr=3e-4' or 'train.lr=3e-4' -> ('train.lr', 0.0003) (the value is parsed as YAML)."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override '{text}' must look like --section.key=value (e.g. --train.steps=200)")
    key, raw = body.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-3 as a string (no dot): accept plain float syntax too.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key.strip(), value


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in {f.name for f in dataclasses.fields(Config)}:
        raise _unknown_key(key)
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{key}': '{p}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, type-checked and validated."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file '{p}' is a directory, not a YAML file")
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            data = _load_yaml_unique(p) or {}
        except _DuplicateKey as e:
            raise ConfigError(
                f"config file '{p}', line {e.line}: the key {e.key!r} is given twice (YAML would silently keep "
                f"the last one); give each key once (a domain's inputs as a list: `{e.key}: [path1, path2]`)"
            ) from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file '{p}' is not UTF-8 text ({e}); save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"config file '{p}' cannot be read ({e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections (train:, data:, ...)")
    for ov in overrides:
        key, value = parse_override(ov)
        set_dotted(data, key, value)
    return from_dict(data)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


def _load_yaml_unique(path: Path) -> Any:
    """Parse YAML, refusing a mapping key given twice (PyYAML would silently keep the last)."""

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=Loader)


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML, loadable with `load_config` (it starts with its format version)."""
    return yaml.safe_dump({"version": CONFIG_VERSION, **to_dict(cfg)}, sort_keys=False, default_flow_style=None)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}' {msg}")


def _check_finite(d: dict) -> None:
    """inf and nan pass range checks such as `lr > 0` and then fail deep inside training: refuse them here."""
    for sec, body in d.items():
        for key, value in body.items():
            values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else [value]
            for v in values:
                if isinstance(v, float) and not math.isfinite(v):
                    raise ConfigError(f"config key '{sec}.{key}' must be a finite number, got {v}")


def validate(cfg: Config) -> None:
    """Range and choice checks that do not need the data (those that do live in train.py)."""
    d = to_dict(cfg)
    _check_finite(d)
    for key, allowed in CHOICES.items():
        sec, name = key.split(".")
        v = d[sec][name]
        if v not in allowed:
            close = difflib.get_close_matches(str(v), allowed, n=1)
            hint = f" Did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"config key '{key}' is '{v}'; allowed: {', '.join(allowed)}.{hint}")
    t, m, dc = cfg.train, cfg.mixing, cfg.data
    _check(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _check(0 <= t.min_lr_ratio <= 1, "train.min_lr_ratio", f"must be in [0, 1], got {t.min_lr_ratio}")
    _check(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _check(0 < t.decay_fraction <= 1, "train.decay_fraction", f"must be in (0, 1], got {t.decay_fraction}")
    _check(t.batch_size >= 1, "train.batch_size", f"must be >= 1, got {t.batch_size}")
    _check(t.micro_batch_size is None or t.micro_batch_size >= 1, "train.micro_batch_size", "must be >= 1")
    _check(t.steps is None or t.steps >= 1, "train.steps", f"must be >= 1, got {t.steps}")
    _check(t.tokens is None or t.tokens >= 1, "train.tokens", f"must be >= 1, got {t.tokens}")
    _check(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 disables), got {t.grad_clip}")
    _check(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _check(0 <= t.beta1 < 1 and 0 <= t.beta2 < 1, "train.beta1/beta2", "must be in [0, 1)")
    _check(t.loss_chunk_tokens >= 1, "train.loss_chunk_tokens", "must be >= 1")
    _check(0 <= t.seed < 2**63, "train.seed", f"must be an integer in [0, 2**63), got {t.seed}")
    _check(dc.seq_len >= 1, "data.seq_len", f"must be >= 1, got {dc.seq_len}")
    _check(dc.max_repetition > 0, "data.max_repetition", f"must be > 0, got {dc.max_repetition}")
    _check(0 < dc.subsample <= 1, "data.subsample", f"must be in (0, 1], got {dc.subsample}")
    _check(m.interval is None or m.interval >= 1, "mixing.interval", f"must be >= 1, got {m.interval}")
    _check(m.warmup is None or m.warmup >= 0, "mixing.warmup", f"must be >= 0, got {m.warmup}")
    _check(m.eta is None or m.eta > 0, "mixing.eta", f"must be > 0, got {m.eta}")
    _check(m.smoothing is None or 0 <= m.smoothing <= 1, "mixing.smoothing", "must be in [0, 1]")
    _check(m.floor is None or m.floor > 0, "mixing.floor", "must be > 0 (it guards a division by the gap)")
    _check(m.ema is None or 0 <= m.ema < 1, "mixing.ema", "must be in [0, 1)")
    _check(m.temperature > 0, "mixing.temperature", "must be > 0")
    _check(0 <= m.sampling_floor < 1, "mixing.sampling_floor", "must be in [0, 1)")
    if m.weights is not None:
        w = list(m.weights.values())
        _check(all(x >= 0 for x in w) and sum(w) > 0, "mixing.weights", "must be non-negative with a positive sum")
        _check(abs(sum(w) - 1) < 1e-6, "mixing.weights", f"must sum to 1, they sum to {sum(w):.6g}")
    if m.rule == "replay":
        _check(m.replay_from is not None, "mixing.replay_from", "is required by rule 'replay' (a run directory)")
    _check(cfg.eval.max_tokens >= 1, "eval.max_tokens", "must be >= 1")
    _check(cfg.eval.batch_size >= 1, "eval.batch_size", "must be >= 1")
    _check(cfg.log.interval >= 1, "log.interval", "must be >= 1")
    _check(bool(cfg.log.wandb_project.strip()), "log.wandb_project", "must name a W&B project, got an empty string")
    _check(cfg.checkpoint.interval is None or cfg.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0")
    _check(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    _check(cfg.checkpoint.preempt_check_interval >= 1, "checkpoint.preempt_check_interval", "must be >= 1")
    _check(not cfg.dist.fsdp_cpu_offload or cfg.dist.strategy == "fsdp2", "dist.fsdp_cpu_offload",
           "needs dist.strategy=fsdp2 (DDP keeps a full replica on every device)")
    # prepare.* is checked by `velocitune.prepare` itself (the library call checks the same values).
    tc = cfg.targets
    _check(0 < tc.fraction <= 1, "targets.fraction", f"must be in (0, 1], got {tc.fraction}")
    _check(tc.points >= 4, "targets.points", f"must be >= 4 to fit a law, got {tc.points}")
    pl = cfg.plan
    _check(0 < pl.budget <= 4, "plan.budget", f"must be in (0, 4] (a share of the main run's steps), got {pl.budget}")
    _check(0 < pl.tilt < 1, "plan.tilt", f"must be in (0, 1), got {pl.tilt}")
    _check(pl.points >= 4, "plan.points", f"must be >= 4 to fit a law, got {pl.points}")
    for key, d in (("plan.objective", pl.objective), ("plan.max_rise", pl.max_rise)):
        _check(d is None or all(v >= 0 for v in d.values()), key, "must map domain names to numbers >= 0")
    _check(pl.objective is None or sum(pl.objective.values()) > 0, "plan.objective", "needs a positive weight")


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
# older version never paced, so resuming it may not start pacing.
BEFORE_KEY: dict[str, Any] = {"mixing.pace": False}


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


# One-line notes `--help-config` adds after a key's default, where the name and the default do not say enough.
HELP_NOTES = {
    "log.wandb": "   # Weights & Biases logging (pip install 'velocitune[wandb]'); rank 0 only; --resume continues the run",
    "log.wandb_entity": "   # null: W&B's default entity",
    "log.wandb_name": "   # null: the run directory's name",
    "train.activation_checkpointing": " (block: recompute each decoder block in backward; less memory, ~1/3 more compute)",
    "train.memory_check": "   # false: start even when the memory estimate exceeds the device's memory",
    "model.attn_implementation": " (flash_attention_2 needs the flash_attn package and CUDA)",
    "log.wandb_mode": " (auto: $WANDB_MODE, else online; offline writes RUN/wandb/ for `wandb sync`)",
}


def help_text() -> str:
    """Every key with its default, for `velocitune train --help-config`."""
    lines = []
    for section in dataclasses.fields(Config):
        lines.append(f"{section.name}:")
        # The declared defaults (a constructed MixingConfig has already resolved signal 'auto').
        for f in dataclasses.fields(section.default_factory):
            v = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            allowed = CHOICES.get(f"{section.name}.{f.name}")
            extra = f"   # one of: {', '.join(allowed)}" if allowed else ""
            if f"{section.name}.{f.name}" == "mixing.signal":
                extra += " (auto: the rule's, train for odm, eval for the others)"
            if f"{section.name}.{f.name}" == "mixing.pace":
                extra += "   # null: true for velocitune's robust preset, false for faithful and the baselines"
            extra += HELP_NOTES.get(f"{section.name}.{f.name}", "")
            lines.append(f"  {f.name}: {v!r}{extra}")
    return "\n".join(lines)
