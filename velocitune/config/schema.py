"""The run configuration's schema: one dataclass per section, each key with its working default.

A key's comment says what it means; `--help-config` (velocitune/config/helptext.py) prints them all. Which
rules exist and their parameters live in the registry (velocitune/rules.py), not here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from velocitune import rules


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
    rule: str = "velocitune"  # one of rules.rule_names() (velocitune/rules.py, the registry)
    preset: str = rules.DEFAULT_PRESET  # velocitune: faithful (paper: c=0) | robust
    signal: str = "auto"  # eval (val sets; the paper) | train (per-domain training loss, no extra cost) | auto: the rule's (rules.timing)
    interval: int | None = None  # m, optimizer steps between updates; default: the rule's (rules.timing), else max(1, steps // 100)
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
    # Online targets (docs/design.md §3): refit each domain's law from the run's own val points, the targets as
    # the prior, and use its mixture-aware target; default: on for the velocitune rule (rules.online_default).
    online: bool | None = None
    # The loss the user wants lowered: per-domain weights, normalised (default: every domain 1, the mean loss).
    objective: dict[str, float] | None = None
    # Largest rise (nats) any domain may take over its predicted loss under static, enforced from the online
    # laws; inf allows trades. Default (None): 0.03 with online targets; without them it cannot be enforced.
    max_rise: float | None = None
    # Parameters of the rule that have no key above (a rule's own, declared in the registry: rules.spec(rule).params).
    params: dict[str, float | str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.rule not in rules.rule_names():
            return  # validation refuses the rule with the closest name; nothing to resolve from it
        if self.signal == "auto":  # resolved on construction, so config.yaml records the signal the run used
            self.signal = rules.timing(self.rule)["signal"]
        if self.pace is None:  # likewise: config.yaml records whether the run paced
            self.pace = rules.pace_default(self.rule, self.preset)
        if self.online is None:  # likewise: whether its targets learnt from the run
            self.online = rules.online_default(self.rule)
        if self.max_rise is None and self.online:
            self.max_rise = rules.DEFAULT_MAX_RISE




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




def to_dict(cfg: Config) -> dict:
    """The config as nested plain dicts (what config.yaml holds)."""
    return dataclasses.asdict(cfg)
