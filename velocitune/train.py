"""`velocitune train`: continual pre-training of a causal LM on a domain mixture that is re-weighted while it trains.

`Trainer.fit` is the loop, top to bottom (docs/design.md §6): lr → micro-steps → clip → step → log →
evaluate → update the mixture for the next step → checkpoint → stop here if SIGTERM/SIGUSR1 arrived
(velocitune/preempt.py). Set-up (`Trainer.__init__`), resume and the first records (`Trainer.start`) and teardown (`Trainer.finish`) live in their own methods. Updating at the
end of step t-1 is the same boundary as "before step t"; doing it before the checkpoint means every record
of a step is on disk before its checkpoint. Everything that must survive a restart is one `TrainState`
(progress, timers, the log window's sums and the mixing controller with its rule and sampler), so a
resumed run equals an uninterrupted one. Per-domain NLL sums stay on the device between log/update points:
the only per-step host sync is one finiteness flag, needed to skip or stop on a NaN loss before the
optimizer step.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from velocitune import __version__, dist, dist_checkpoint, runfiles
from velocitune.checkpoint import list_checkpoints, load_latest, rng_state, save_checkpoint, set_rng_state
from velocitune.config import Config, check_resume_config, dump_yaml, pace_default, rule_timing, to_dict
from velocitune.controller import (
    MixingController,
    check_same_on_all_ranks,
    check_targets_cover,
    initial_weights,
    make_rule,
    read_given_init,
    read_plan,
    read_targets,
)
from velocitune.errors import ConfigError, DataError, TrainingError
from velocitune.evaluate import ValSet, evaluate, load_val_set
from velocitune.fileio import output_dir
from velocitune.loggers import TensorBoardLogger, WandbLogger, import_wandb, new_wandb_run_id
from velocitune.losses import check_loss_path, forward_losses, fused_forward_losses, liger_nll_sum, loss_path
from velocitune.memory import ModelShape, check_fits, device_capacity, estimate_memory
from velocitune.metrics import Throughput, Timers, flops_per_token, format_weights, peak_flops
from velocitune.model import check_attn_implementation, checkpoint_blocks, load_tokenizer, make_model, unwrap_model
from velocitune.preempt import PREEMPTED_EXIT, Preempted, PreemptionGuard, StopAgreement
from velocitune.sampler import MixtureSampler, Plan, rank_slice
from velocitune.schedule import (
    ADAPTIVE_RULES,
    mixing_interval,
    mixing_warmup,
    resolve_steps,
    step_lr,
    subsampled_windows,
    warmup_steps,
)
from velocitune.shards import PreparedData


@dataclass(frozen=True)
class Layout:
    """The shape of a run, fixed at set-up: domains, steps, batch geometry and when each event happens."""

    names: list[str]
    seq_len: int
    steps: int
    batch: int  # global batch, sequences per optimizer step
    micro: int  # sequences per forward on this rank
    n_micro: int  # micro-batches per rank per step (gradient accumulation)
    warmup: int  # LR warm-up steps
    first_update: int  # steps before the first weight update (mixing.warmup, or the rule's default)
    interval: int  # m: steps between weight updates
    eval_signal: bool  # the rule re-weights from evaluations of the val sets
    eval_points: frozenset  # steps with an evaluation for the loss curves
    ckpt_every: int  # 0: no checkpoints

    @property
    def k(self) -> int:
        return len(self.names)

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len


def plan_layout(cfg: Config, windows: list[int], names: list[str], world_size: int, adaptive: bool) -> Layout:
    """Steps and batch geometry from the config and the data; ConfigError when they do not fit together."""
    steps = resolve_steps(cfg, subsampled_windows(windows, cfg.data.subsample))
    B = cfg.train.batch_size
    if B % world_size:
        raise ConfigError(f"train.batch_size={B} must be divisible by the number of processes ({world_size})")
    per_rank = B // world_size
    micro = cfg.train.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch_size={micro} must divide the per-process batch {per_rank}")
    m = mixing_interval(cfg, steps)
    eval_signal = adaptive and cfg.mixing.signal == "eval"
    eval_every = cfg.eval.interval or (m if eval_signal else max(1, steps // 10))
    points = cfg.eval.points if cfg.eval.points is not None else range(eval_every, steps, eval_every)
    ckpt_every = cfg.checkpoint.interval if cfg.checkpoint.interval is not None else max(1, steps // 5)
    return Layout(names=names, seq_len=cfg.data.seq_len, steps=steps, batch=B, micro=micro, n_micro=per_rank // micro,
                  warmup=warmup_steps(cfg, steps), first_update=mixing_warmup(cfg, steps), interval=m,
                  eval_signal=eval_signal,
                  eval_points=frozenset(points), ckpt_every=ckpt_every)


class TrainState:
    """Everything that must survive a restart besides the model and optimizer tensors.

    Progress (optimizer steps done, skipped non-finite steps, wall seconds of earlier processes), the
    timers, the log window's per-domain NLL sums on the device (float64 (k,)) and step-loss sum, and the
    mixing controller (rule, sampler schedule, ℓ_init, train-signal window, tokens per domain).
    """

    def __init__(self, mixing: MixingController, k: int, device: torch.device):
        self.step = 0
        self.skipped = 0
        self.elapsed_s = 0.0  # wall seconds of the run so far (set before a checkpoint; restored on resume)
        self.timers = Timers()
        self.mixing = mixing
        self.log_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.log_cnt = torch.zeros_like(self.log_sum)
        self.loss_acc = torch.zeros((), dtype=torch.float64, device=device)  # sum of step losses over the window
        self.loss_steps = 0  # steps in that sum: skipped non-finite steps are not

    def state_dict(self) -> dict[str, Any]:
        """Plain values (stored as JSON) and tensors (stored with torch.save): nothing that runs code on load."""
        mixing = self.mixing.state_dict()
        return {
            "progress": {"step": self.step, "skipped": self.skipped, "elapsed_s": self.elapsed_s,
                         "loss_steps": self.loss_steps, "timers": self.timers.state_dict()},
            "mixing": {k: v for k, v in mixing.items() if not isinstance(v, torch.Tensor)},
            "tensors": {"log_sum": self.log_sum.cpu(), "log_cnt": self.log_cnt.cpu(), "loss_acc": self.loss_acc.cpu(),
                        **{k: v for k, v in mixing.items() if isinstance(v, torch.Tensor)}},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        progress, tensors = state["progress"], state["tensors"]
        self.step, self.skipped, self.loss_steps = int(progress["step"]), int(progress["skipped"]), int(progress["loss_steps"])
        self.timers.load_state_dict(progress["timers"])
        self.elapsed_s = float(progress["elapsed_s"])
        self.mixing.load_state_dict({**state["mixing"], "sig_sum": tensors["sig_sum"], "sig_cnt": tensors["sig_cnt"]})
        self.log_sum.copy_(tensors["log_sum"].to(self.log_sum.device))
        self.log_cnt.copy_(tensors["log_cnt"].to(self.log_cnt.device))
        self.loss_acc.copy_(tensors["loss_acc"].to(self.loss_acc.device))


@dataclass
class RunResult:
    out_dir: Path
    steps: int
    final_val_loss: dict[str, float]
    weights: dict[str, float]


def train(cfg: Config, resume: bool = False, dry_run: bool = False) -> RunResult | None:
    """Set up, resume when asked, train, and write the summary and the final model of one run.

    dry_run: set up (config, data, model, targets, budget, memory check), print the plan and return None
    without training or writing anything.
    """
    env = dist.init(cfg.train.device, cfg.dist.backend, cfg.dist.strategy)
    try:
        # From set-up to the end: a SIGTERM/SIGUSR1 during set-up is acted on at the first step boundary.
        with PreemptionGuard() as guard:
            trainer = Trainer(cfg, env, guard)
            if dry_run:
                trainer.dry_run()
                return None
            with trainer.lock():
                try:
                    trainer.start(resume)
                    trainer.fit()
                    return trainer.finish()
                except Preempted:
                    trainer.close_logs()
                    trainer.close_loggers(exit_code=PREEMPTED_EXIT)  # W&B shows it stopped early; resume continues it
                    raise
                except BaseException:
                    trainer.close_loggers(exit_code=1)  # what TensorBoard and W&B were given reaches their files
                    raise
    finally:
        dist.shutdown(env)


class Trainer:
    """One training run: set-up in `__init__`, `start` (resume or step 0), `fit` (the loop), `finish`."""

    def __init__(self, cfg: Config, env: dist.DistEnv, guard: PreemptionGuard | None = None):
        self.t_start = time.perf_counter()
        self.cfg, self.env = cfg, env
        self.out = Path(cfg.run.out_dir)
        self.main = env.is_main
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.data = PreparedData(cfg.data.path)
        names, L = list(self.data.domains), cfg.data.seq_len
        self.domains = {n: self.data.train(n) for n in names}
        windows = [self.domains[n].n_windows(L) for n in names]
        empty = [n for n, w in zip(names, windows) if w == 0]
        if empty:
            raise DataError(
                f"domain(s) {empty} hold fewer training tokens than one window of data.seq_len + 1 = {L + 1}; "
                f"lower data.seq_len or add documents"
            )
        rule = make_rule(cfg.mixing, initial_weights(cfg.mixing, names, self.data.w0), names,
                         np.array([self.data.domain_info(n)["train"]["tokens"] for n in names], dtype=np.float64))
        self.layout = lay = plan_layout(cfg, windows, names, env.world_size, rule.name in ADAPTIVE_RULES)
        read_plan(cfg.mixing, names, float(lay.steps * lay.tokens_per_step))  # a plan for this budget, or none
        self._set_up_model()
        targets = read_targets(cfg.mixing, names)
        self.given_init = read_given_init(cfg.mixing, names)
        check_targets_cover(rule, targets, names)
        sampler = MixtureSampler(
            seed=cfg.train.seed, global_batch=lay.batch, windows_per_domain=windows, initial_weights=rule.initial_weights(),
            max_repetition=cfg.data.max_repetition, floor=cfg.mixing.sampling_floor, subsample=cfg.data.subsample,
            names=names, tokens_per_window=L,
        )
        self.val: ValSet = load_val_set(self.data, L, cfg.eval.max_tokens)
        controller = MixingController(rule, sampler, steps=lay.steps, warmup=lay.first_update, interval=lay.interval,
                                      signal=cfg.mixing.signal, targets=targets, seq_len=L, device=env.device,
                                      pace=cfg.mixing.pace)
        self.state = TrainState(controller, lay.k, env.device)
        self.tb = TensorBoardLogger(self.out / runfiles.TENSORBOARD_DIR, enabled=False)
        self.wb = WandbLogger(enabled=False)
        if cfg.log.wandb and self.main:
            import_wandb()  # a missing package fails here, before the run directory is touched
        self.metrics_log = self.eval_log = None
        self.stop = StopAgreement(guard or PreemptionGuard(), env, cfg.checkpoint.preempt_check_interval)
        self.last_checkpoint = -1  # the step of the checkpoint this process wrote last

    def _set_up_model(self) -> None:
        """Seeds, the model (and the tokenizer final/ ships with), autocast, wrapping and the optimizer."""
        cfg, env = self.cfg, self.env
        torch.manual_seed(cfg.train.seed)
        random.seed(cfg.train.seed)
        np.random.seed(cfg.train.seed % 2**32)
        device = env.device
        check_attn_implementation(cfg.model.attn_implementation, device)
        if cfg.train.loss_kernel == "liger" and device.type != "cuda":
            raise ConfigError(f"train.loss_kernel=liger runs Liger Kernel's Triton kernels, on CUDA only; this run is "
                              f"on {device}: use train.loss_kernel=chunked (the same losses, any device)")
        model = make_model(cfg, self.data)
        blocks = dist.transformer_blocks(model)
        if cfg.train.activation_checkpointing == "block":
            checkpoint_blocks(blocks)
        bf16 = device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
        self._check_memory(model, blocks, bf16)  # before the model takes any device memory
        tok_dir = cfg.model.tokenizer or cfg.model.path or self.data.manifest["tokenizer"].get("name_or_path")
        self.tokenizer = None
        if cfg.model.tokenizer or (tok_dir and Path(tok_dir).is_dir()):
            self.tokenizer = load_tokenizer(tok_dir)  # a model.tokenizer that does not exist is an error, not skipped
        model.to(device)
        model.train()  # load_model returns eval mode
        # Once, before any step: the chunked loss must equal the model's own logits (catches unknown heads).
        first = self.domains[self.layout.names[0]].windows(np.arange(1), self.layout.seq_len)[:, :-1]
        check_loss_path(model, torch.from_numpy(first).to(device))
        # train.loss_kernel=liger: the fused kernel in place of the chunked head (None: the chunked path).
        self.fused = liger_nll_sum(loss_path(model).softcap) if cfg.train.loss_kernel == "liger" else None
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.throughput = Throughput(flops_per_token(model, self.layout.seq_len), peak_flops(device)[0], env.world_size)
        self.peak_name = peak_flops(device)[1]
        if cfg.train.compile:
            # Compile the decoder in place: the chunked loss calls it directly and runs the head itself.
            getattr(model, "base_model", model).compile()
        self.model = model
        offload = env.distributed and cfg.dist.fsdp_cpu_offload
        self.net = dist.wrap_model(model, cfg.dist.strategy, env, bf16, cpu_offload=offload)
        decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
        t = cfg.train
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": t.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            # The fused kernel needs device parameters; offloaded shards live on the host.
            lr=t.lr, betas=(t.beta1, t.beta2), fused=device.type == "cuda" and not offload,
        )

    def _check_memory(self, model: torch.nn.Module, blocks: list[torch.nn.Module], bf16: bool) -> None:
        """The memory estimate per device (printed by `_announce`); ConfigError when it exceeds the device's memory."""
        cfg, env, lay = self.cfg, self.env, self.layout
        strategy = cfg.dist.strategy if env.distributed else "single"
        param_bytes = next(model.parameters()).element_size()
        self.memory = estimate_memory(
            ModelShape.from_model(model, blocks), micro_batch=lay.micro, seq_len=lay.seq_len,
            loss_chunk_tokens=cfg.train.loss_chunk_tokens, strategy=strategy, world_size=env.world_size,
            param_bytes=param_bytes, act_bytes=2 if bf16 else param_bytes,
            gather_bytes=2 if bf16 and strategy == "fsdp2" else None,  # dist.wrap_model's MixedPrecisionPolicy
            checkpointing=cfg.train.activation_checkpointing, attn_implementation=cfg.model.attn_implementation,
            cpu_offload=strategy == "fsdp2" and cfg.dist.fsdp_cpu_offload,
        )
        self.capacity, self.capacity_where = device_capacity(env.device, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if cfg.train.memory_check:
            check_fits(self.memory, self.capacity, self.capacity_where, micro_batch=lay.micro,
                       checkpointing=cfg.train.activation_checkpointing, strategy=strategy, world_size=env.world_size)

    # ------------------------------------------------------------------------------------ start

    def lock(self) -> contextlib.AbstractContextManager:
        """The run directory's lock (rank 0 holds it; the other ranks write nothing)."""
        if not self.main:
            return contextlib.nullcontext()
        output_dir(self.out, "run.out_dir")
        return runfiles.RunLock(self.out)

    def start(self, resume: bool) -> None:
        """Resume from the newest valid checkpoint or start at step 0; open the logs; say what will happen."""
        cfg, out, mix = self.cfg, self.out, self.state.mixing
        if resume:
            resumed = self._resume()
        else:
            resumed = False
            if self.main and (out / runfiles.METRICS_FILE).exists():
                raise ConfigError(f"run directory '{out}' already holds a run; pass --resume to continue it, or set run.out_dir")
        if self.main:
            runfiles.write_config(out / runfiles.CONFIG_FILE, cfg)
            if cfg.mixing.plan:  # the plan gives the targets: keep it with the run, for the record
                if not _same_file(cfg.mixing.plan, out / runfiles.PLAN_FILE):
                    shutil.copyfile(cfg.mixing.plan, out / runfiles.PLAN_FILE)
            elif cfg.mixing.targets and not _same_file(cfg.mixing.targets, out / runfiles.TARGETS_FILE):
                shutil.copyfile(cfg.mixing.targets, out / runfiles.TARGETS_FILE)
            names = self.layout.names
            self.metrics_log = runfiles.RunLog(out / runfiles.METRICS_FILE, runfiles.METRICS, names)
            self.eval_log = runfiles.RunLog(out / runfiles.EVAL_FILE, runfiles.EVAL, names)
            mix.log = runfiles.RunLog(out / runfiles.MIXTURE_FILE, runfiles.MIXTURE, names)
            self.tb = TensorBoardLogger(out / runfiles.TENSORBOARD_DIR, enabled=cfg.log.tensorboard)
            self.wb = self._open_wandb(resumed)
            mix.scalars = self._scalars
            if resumed:
                mix.resume_log(runfiles.read_log(out / runfiles.MIXTURE_FILE, runfiles.MIXTURE, names))
        if not resumed:
            self._measure_init()
        self._announce()

    def _open_wandb(self, resumed: bool) -> WandbLogger:
        """The W&B run (log.wandb; rank 0): the one wandb.json names when resuming, so W&B shows one run; a new
        one otherwise (a `--resume` that found no checkpoint starts over, and so does its W&B run)."""
        lc, path = self.cfg.log, self.out / runfiles.WANDB_RUN_FILE
        if not lc.wandb:
            return WandbLogger(enabled=False)
        run_id = runfiles.read_wandb_run(path)["run_id"] if resumed and path.is_file() else new_wandb_run_id()
        # Saved before wandb.init: a crash during the first start still leaves the id a resume continues.
        runfiles.write_wandb_run(path, run_id, lc.wandb_project, lc.wandb_entity)
        return WandbLogger(True, run_id=run_id, project=lc.wandb_project, entity=lc.wandb_entity,
                           name=lc.wandb_name or self.out.resolve().name, group=default_arm(self.cfg),
                           tags=lc.wandb_tags, mode=lc.wandb_mode, config=to_dict(self.cfg),
                           local_dir=os.environ.get("WANDB_DIR") or self.out)

    def _scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        """Scalars to every logger that is on (TensorBoard, W&B), under the same names; rank 0 calls it."""
        self.tb.scalars(prefix, values, step)
        self.wb.scalars(prefix, values, step)

    def close_loggers(self, exit_code: int = 0) -> None:
        """Flush and close TensorBoard and W&B (exit_code != 0 marks the run failed in W&B; --resume continues it)."""
        self.tb.close()
        self.wb.close(exit_code=exit_code)

    def close_logs(self) -> None:
        """Sync and close the JSONL logs (rank 0 opened them in `start`)."""
        for log in (self.metrics_log, self.eval_log, self.state.mixing.log):
            if log is not None:
                log.close()

    def _resume(self) -> bool:
        """Load the newest valid checkpoint, if any; logs are cut back to its step. True if one was loaded."""
        root = self.out / runfiles.CHECKPOINTS_DIR
        loaded = load_latest(root) if root.exists() else None
        if loaded is None:
            self._say(f"no valid checkpoint in {root}; starting from step 0")
            if self.main:
                runfiles.remove_logs(self.out)
            return False
        step, parts = loaded
        check_resume_config(parts["config"], to_dict(self.cfg))
        dist_checkpoint.restore_model_state(root, parts, self.model, self.optimizer, self.env)
        self.state.load_state_dict(parts["state"] | {"tensors": parts["tensors"]})
        set_rng_state(parts["rng"])
        self.t_start -= self.state.elapsed_s  # wall time counts the run, not this process
        if self.main:
            runfiles.truncate_logs(self.out, step)
        self._say(f"resumed from step {step}")
        return True

    def _measure_init(self) -> None:
        """ℓ_init: from mixing.init_loss, or measured now on the val sets (and cached in the run directory)."""
        measured = self._evaluate(0, "eval")
        init = self.given_init if self.given_init is not None else measured
        if self.main and self.given_init is None:
            runfiles.write_init_loss(self.out / runfiles.INIT_LOSS_FILE, self.cfg.model.path or "fresh",
                                     self.layout.names, init, self.val.tokens)
        for warning in self.state.mixing.start(init):
            self._say(f"warning: {warning}")

    def _announce(self, timed: bool = True) -> None:
        """Print the resolved config, the budget, the memory estimate and the estimated reweighting overhead.

        timed=False (the dry run) leaves out the timed probe and gives the FLOPs estimate of the overhead alone.
        """
        cfg, lay, env = self.cfg, self.layout, self.env
        # The eval signal's cost per training step: by FLOPs (a forward is a third of a step), and from clocks.
        self.overhead_flops = (self.val.tokens.sum() / (3 * lay.interval * lay.tokens_per_step)) if lay.eval_signal else 0.0
        probe = (probe_overhead(self.net, self.val, env, cfg, self.autocast, lay.micro, lay.n_micro)
                 if lay.eval_signal and timed else None)
        self.overhead = probe.eval_s / (lay.interval * probe.step_s) if probe else self.overhead_flops
        if not self.main:
            return
        names, w = lay.names, self.state.mixing.rule.initial_weights()
        print(dump_yaml(cfg))
        source = "" if cfg.mixing.weights is not None else (f"  (the plan's, {cfg.mixing.plan})" if cfg.mixing.plan
                                                             else "  (w0 = token shares)")
        print(f"domains: {format_weights(names, w)}{source}")
        print(f"steps {lay.steps} x {lay.batch} seq x {lay.seq_len} tok = {lay.steps * lay.tokens_per_step:,} tokens; "
              f"warm-up {lay.warmup}; "
              + (f"update every {lay.interval} steps from step {max(lay.first_update, lay.interval)}; "
                 if self.state.mixing.adaptive else f"{cfg.mixing.rule} weights; ")
              + f"{env.world_size} process(es), {lay.n_micro} micro-batch(es) of {lay.micro}")
        checked = "" if cfg.train.memory_check else " (train.memory_check=false: not enforced)"
        print(f"estimated memory per device: {self.memory.line(self.capacity, self.capacity_where)}{checked}; "
              f"micro-batch {lay.micro} x {lay.seq_len} tok, activation_checkpointing={cfg.train.activation_checkpointing}, "
              f"attn={cfg.model.attn_implementation}")
        if lay.eval_signal and not timed:
            print(f"estimated reweighting overhead: {100 * self.overhead_flops:.1f}% (signal=eval; by FLOPs "
                  f"k*val_tokens/(3*m*tokens_per_step); training times it before step 0)")
        elif probe:
            print(f"estimated reweighting overhead: {100 * self.overhead:.1f}% (signal=eval; timed before training: "
                  f"one evaluation {probe.eval_s:.3g}s per {lay.interval} steps of {probe.step_s:.3g}s; "
                  f"by FLOPs k*val_tokens/(3*m*tokens_per_step) = {100 * self.overhead_flops:.1f}%)")
        elif self.state.mixing.adaptive:
            print(f"estimated reweighting overhead: 0.0% (signal={cfg.mixing.signal}: the training losses "
                  f"already computed" + (f"; one all-reduce of {2 * lay.k} numbers per update)" if env.distributed
                                         else ")"))

    def dry_run(self) -> None:
        """`velocitune train --dry-run`: the set-up has checked config, data, model and targets; say what a run
        would do (config, budget, memory, FLOPs overhead) and write nothing to the run directory."""
        self._announce(timed=False)
        if self.main:
            exists = (self.out / runfiles.METRICS_FILE).exists()
            print(f"dry run: nothing trained or written; run.out_dir {self.out} "
                  + ("already holds a run (start it with --resume, or set run.out_dir)" if exists else "is free"))

    # ------------------------------------------------------------------------------------ the loop

    def fit(self) -> None:
        """The training loop, top to bottom."""
        from tqdm.auto import tqdm

        lay, st, mix = self.layout, self.state, self.state.mixing
        bar = tqdm(total=lay.steps, initial=st.step, disable=not (self.main and self.cfg.log.progress), unit="step",
                   dynamic_ncols=True)
        self.throughput.start()
        # Timer totals as the loop starts: the overhead measured at the end covers this loop only.
        self.loop_t0, self.timers_at_loop = time.perf_counter(), st.timers.seconds()
        self.net.train()
        for step in range(st.step, lay.steps):
            # 1. learning rate for this step
            lr = step_lr(self.cfg, step, lay.steps)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            # 2. forward/backward over this rank's micro-batches of the global plan
            with st.timers("data"):
                plan = mix.plan(step)
            step_loss = self._forward_backward(plan)
            # 3. clip and step; a non-finite loss or gradient stops the run or skips the batch
            gnorm = self._optimizer_step(step, step_loss, bar)
            done = st.step = step + 1
            self.throughput.add(lay.tokens_per_step)
            # 4. log (the host reads device values only here)
            if done % self.cfg.log.interval == 0 or done == lay.steps:
                self._log(done, lr, gnorm, bar)
            bar.update(1)
            # 5. evaluate for the curves (not part of the mixing signal)
            if done in lay.eval_points and done < lay.steps and not (lay.eval_signal and mix.due(done)):
                self._evaluate(done, "eval")
            # 6. update the mixture for the next step (an optimizer-step boundary; never at step 0)
            if mix.due(done):
                self._update_mixture(done, plan)
            # 7. checkpoint (after every record of this step is written, so resume truncates cleanly)
            if lay.ckpt_every and done % lay.ckpt_every == 0 and done < lay.steps:
                with st.timers("checkpoint"):
                    self._save_checkpoint(done)
            # 8. preemption: a SIGTERM/SIGUSR1 received during this step (its evaluation, update or checkpoint
            # included) stops the run here, on every rank at the same step
            if signum := self.stop.agreed(done):
                bar.close()
                self._preempt(signum, done)
        bar.close()

    def _preempt(self, signum: int, done: int) -> None:
        """Checkpoint at step `done` (unless step 7 just wrote it), say how to continue, raise Preempted."""
        if self.last_checkpoint != done:
            with self.state.timers("checkpoint"):
                self._save_checkpoint(done)
        stop = Preempted(signal.Signals(signum).name, done)
        self._say(f"{stop}: checkpoint written; continue with the same command and --resume "
                  f"(exit status {PREEMPTED_EXIT})")
        raise stop

    def _forward_backward(self, plan: Plan) -> torch.Tensor:
        """Gradients of this rank's share of the step; returns the step's mean loss (device, float64)."""
        lay, st = self.layout, self.state
        step_loss = torch.zeros((), dtype=torch.float64, device=self.env.device)
        for j in range(lay.n_micro):
            with st.timers("data"):
                sl = rank_slice(lay.batch, self.env.rank, self.env.world_size, j, lay.n_micro)
                x, d = assemble(self.domains, lay.names, plan.domains[sl], plan.windows[sl], lay.seq_len, self.env.device)
            with dist.grad_sync(self.net, enabled=(j == lay.n_micro - 1)), self.autocast():
                if self.fused is None:
                    out = forward_losses(self.net, x[:, :-1], x[:, 1:], d, lay.k, self.cfg.train.loss_chunk_tokens)
                else:
                    out = fused_forward_losses(self.net, x[:, :-1], x[:, 1:], d, plan.domains[sl], lay.k, self.fused)
            (out.loss / lay.n_micro).backward()
            step_loss += out.loss.detach().double() / lay.n_micro
            st.mixing.observe(out.nll_sum, out.count)
            st.log_sum += out.nll_sum
            st.log_cnt += out.count
        return step_loss

    def _optimizer_step(self, step: int, step_loss: torch.Tensor, bar) -> torch.Tensor:
        """Clip, then step, or stop/skip (train.nan_policy) on a non-finite loss or gradient."""
        st = self.state
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip or float("inf"))
        if bool(torch.isfinite(step_loss) & torch.isfinite(gnorm)):  # the one per-step sync (see docstring)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            st.loss_acc += step_loss
            st.loss_steps += 1
            return gnorm
        if self.cfg.train.nan_policy == "stop":
            bar.close()
            ckpts = list_checkpoints(self.out / runfiles.CHECKPOINTS_DIR)
            where = f"the last checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
            raise TrainingError(
                f"non-finite loss or gradient at step {step} (loss {float(step_loss)}, grad norm {float(gnorm)}); "
                f"{where}. Lower train.lr or raise train.warmup_steps and resume with --resume, "
                f"or set train.nan_policy=skip to skip such batches"
            )
        self.optimizer.zero_grad(set_to_none=True)
        st.skipped += 1
        st.mixing.drop_window()
        st.log_sum.zero_(), st.log_cnt.zero_()
        self._say(f"warning: skipped step {step}: non-finite loss (train.nan_policy=skip; {st.skipped} so far)")
        return gnorm

    def _log(self, done: int, lr: float, gnorm: torch.Tensor, bar) -> None:
        """One metrics.jsonl record: the window's mean loss, per-domain training loss, speed, time shares."""
        st, lay, k = self.state, self.layout, self.layout.k
        packed = dist.all_reduce_sum(torch.cat([st.log_sum, st.log_cnt, st.loss_acc.view(1)]), self.env).cpu().numpy()
        # The mean over the window's trained steps (a skipped non-finite step has no loss to average).
        loss = packed[-1] / self.env.world_size / st.loss_steps if st.loss_steps else None
        # A domain with no tokens in the window has no loss to report (null), not a perfect one.
        dom = np.where(packed[k:2 * k] > 0, packed[:k] / np.maximum(packed[k:2 * k], 1.0), np.nan)
        st.log_sum.zero_(), st.log_cnt.zero_(), st.loss_acc.zero_()
        st.loss_steps = 0
        stats = self.throughput.log_point()
        if not self.main:
            return
        elapsed = time.perf_counter() - self.t_start
        spent = {"data": st.timers.total("data"), "eval": st.timers.total("eval"), "update": st.timers.total("reweight")}
        gnorm = float(gnorm)
        rec = {"step": done, "tokens": done * lay.tokens_per_step, "loss": loss, "lr": lr, "tok_per_s": stats.tok_per_s,
               "tok_per_s_per_rank": stats.tok_per_s / self.env.world_size,
               "grad_norm": gnorm if np.isfinite(gnorm) else None,  # a skipped step's norm is not a number
               "elapsed_s": elapsed, **{f"time_{n}_s": t for n, t in spent.items()},
               **{f"share_{n}": t / elapsed for n, t in spent.items()},  # of the run's wall time so far
               "skipped_steps": st.skipped, "domain_loss": runfiles.per_domain(lay.names, dom)}
        if stats.mfu is not None:
            rec["mfu"] = stats.mfu
            rec["peak_flops"] = self.peak_name
        self.metrics_log.write(rec)
        self._scalars("train", {k: v for k, v in (("loss", loss), ("lr", lr), ("tok_per_s", stats.tok_per_s))
                                if v is not None}, done)
        self._scalars("train_domain_loss", {n: v for n, v in rec["domain_loss"].items() if v is not None}, done)
        w_hat = st.mixing.sampler.plan(done - 1).sampling_weights
        shown = "n/a" if loss is None else f"{loss:.3f}"
        bar.set_postfix_str(f"loss {shown} | {stats.tok_per_s:,.0f} tok/s | {format_weights(lay.names, w_hat)}")

    def _evaluate(self, step: int, timer: str) -> np.ndarray:
        """Per-domain validation loss (an eval.jsonl record); `timer` says what the time counts as."""
        with self.state.timers(timer):
            losses = evaluate(self.net, self.val, self.env, self.cfg.eval.batch_size, self.cfg.train.loss_chunk_tokens,
                              self.autocast())
        if self.main:
            names = self.layout.names
            self.eval_log.write({"step": step, "tokens": step * self.layout.tokens_per_step,
                                 "losses": dict(zip(names, losses.tolist())),
                                 "tokens_evaluated": dict(zip(names, self.val.tokens.tolist())),
                                 "elapsed_s": time.perf_counter() - self.t_start})
            self._scalars("val_loss", dict(zip(names, losses.tolist())), step)
        return losses

    def _update_mixture(self, done: int, plan: Plan) -> None:
        """The rule's update from the eval or train signal; new weights take effect at step `done`."""
        st, mix = self.state, self.state.mixing
        losses = self._evaluate(done, "reweight") if self.layout.eval_signal else None
        with st.timers("reweight"):
            observed = None  # the eval signal sees every domain
            if losses is None:
                losses, observed = mix.window_losses(self.env)
            check = (lambda w: check_same_on_all_ranks(w, self.env)) if self.cfg.dist.check_weights else None
            upd = mix.update(done, losses, plan.sampling_weights, check=check, observed=observed)
        for warning in upd.warnings:
            self._say(f"warning: {warning}")

    def _save_checkpoint(self, step: int) -> None:
        # Collective: under FSDP2 every rank writes its DCP shards; otherwise the full states are gathered for
        # rank 0. Rank 0's checkpoint directory is the commit point (it holds a reference to the shards).
        root = self.out / runfiles.CHECKPOINTS_DIR
        model_part = dist_checkpoint.checkpoint_model_state(root, step, self.model, self.optimizer, self.env, self.cfg.dist.strategy)
        if self.main:
            self.state.elapsed_s = time.perf_counter() - self.t_start
            state = self.state.state_dict()
            save_checkpoint(root, step, {**model_part, "state": {k: v for k, v in state.items() if k != "tensors"},
                                         "tensors": state["tensors"], "rng": rng_state(), "config": to_dict(self.cfg)},
                            keep=self.cfg.checkpoint.keep)
            dist_checkpoint.prune_sharded(root)  # shards of checkpoints that save_checkpoint just pruned
        dist.barrier(self.env)
        self.last_checkpoint = step

    # ------------------------------------------------------------------------------------ the end

    def finish(self) -> RunResult:
        """Final validation loss, summary.json, final/ (save_pretrained) and the closing lines."""
        cfg, lay, st, mix = self.cfg, self.layout, self.state, self.state.mixing
        timers = st.timers
        in_loop = {n: timers.total(n) - self.timers_at_loop.get(n, 0.0) for n in ("reweight", "eval", "checkpoint")}
        steps_s = time.perf_counter() - self.loop_t0 - sum(in_loop.values())  # the training steps alone
        measured = in_loop["reweight"] / steps_s if mix.adaptive and steps_s > 0 else 0.0
        final = self._evaluate(lay.steps, "eval")
        wall = time.perf_counter() - self.t_start
        names = lay.names
        final_sd = dist_checkpoint.full_model_state(self.model, self.env, cfg.dist.strategy) if cfg.checkpoint.save_final else None
        if self.main:
            self.close_logs()  # syncs; left open, a process running many trainings leaks three files per run
            summary = {
                "velocitune_version": __version__, "arm": default_arm(cfg), "rule": cfg.mixing.rule,
                "preset": cfg.mixing.preset, "signal": cfg.mixing.signal, "seed": cfg.train.seed, "domains": names,
                "steps": lay.steps, "tokens": lay.steps * lay.tokens_per_step,
                "init_loss": dict(zip(names, map(float, mix.init))),
                "targets": runfiles.per_domain(names, mix.targets), "final_val_loss": dict(zip(names, final.tolist())),
                "tokens_per_domain": dict(zip(names, mix.tokens_per_domain(lay.steps).tolist())),
                "epochs_per_domain": dict(zip(names, mix.sampler.epochs(lay.steps).tolist())),
                "wall_time_s": wall, "time_eval_s": timers.total("eval"), "time_update_s": timers.total("reweight"),
                "time_data_s": timers.total("data"), "time_checkpoint_s": timers.total("checkpoint"),
                "skipped_steps": st.skipped, "world_size": self.env.world_size, "estimated_overhead": self.overhead,
                "estimated_overhead_flops": self.overhead_flops, "measured_overhead": measured, "complete": True,
            }
            runfiles.write_summary(self.out / runfiles.SUMMARY_FILE, summary)
            if cfg.checkpoint.save_final:
                save_final(unwrap_model(self.model), self.tokenizer, self.out / runfiles.FINAL_DIR, final_sd)
            self._wandb_end(summary)
            self.close_loggers()
            self._closing_lines(final, wall, measured)
        dist.barrier(self.env)
        return RunResult(self.out, lay.steps, dict(zip(names, final.tolist())), dict(zip(names, mix.weights().tolist())))

    def _wandb_end(self, summary: dict[str, Any]) -> None:
        """W&B's run summary (final, initial and target losses, tokens per domain, times) and the report's plots."""
        if not self.wb.enabled:
            return
        for key in ("final_val_loss", "init_loss", "targets", "tokens_per_domain", "epochs_per_domain"):
            self.wb.summary(key, summary[key] or {})
        self.wb.summary("", {k: summary[k] for k in ("wall_time_s", "time_eval_s", "time_update_s", "time_data_s",
                                                     "time_checkpoint_s", "measured_overhead", "estimated_overhead")})
        from velocitune.report.plots import run_plots  # matplotlib: only when the plots are wanted

        with tempfile.TemporaryDirectory(prefix="velocitune-plots-") as tmp:
            try:
                written = run_plots(self.out, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - the run is complete and saved; a plot is not worth failing it
                self._say(f"warning: the report's plots were not logged to W&B ({exc}); "
                          f"draw them with `velocitune report {self.out}`")
                return
            self.wb.images({f"plots/{Path(n).stem}": (Path(tmp) / n, caption) for n, caption in written.items()},
                           step=self.layout.steps)

    def _closing_lines(self, final: np.ndarray, wall: float, measured: float) -> None:
        lay, timers = self.layout, self.state.timers
        print(f"done: {lay.steps} steps, {lay.steps * lay.tokens_per_step:,} tokens in {wall:.0f}s; "
              f"mean val loss {float(np.mean(final)):.4f}; {format_weights(lay.names, final)} (val loss)")
        spent = {"evaluation": "eval", "reweighting": "reweight", "data loading": "data", "checkpoints": "checkpoint"}
        print("time: " + ", ".join(f"{label} {100 * timers.total(t) / wall:.1f}%" for label, t in spent.items())
              + f" of {wall:.0f}s")
        if self.state.mixing.adaptive:
            print(f"reweighting overhead: measured {100 * measured:.1f}% of the training steps' time "
                  f"(estimated {100 * self.overhead:.1f}%; signal={self.cfg.mixing.signal})")

    def _say(self, text: str) -> None:
        if self.main:
            print(text)


# --------------------------------------------------------------------------- helpers of the loop


def _same_file(a: str | os.PathLike, b: Path) -> bool:
    """True when `b` exists and is the file `a` (a targets.json placed inside the run directory)."""
    return b.exists() and os.path.samefile(a, b)


def default_arm(cfg: Config) -> str:
    """The label that groups seeds in reports: run.arm, else the rule (+ preset, + the signal when not the rule's
    own, + "-pace" / "-nopace" when pacing is not the rule's default)."""
    if cfg.run.arm:
        return cfg.run.arm
    arm = cfg.mixing.rule
    if cfg.mixing.rule in ("velocitune", "velocitune-no-target") and cfg.mixing.preset != "robust":
        arm += f"-{cfg.mixing.preset}"
    if cfg.mixing.rule in ADAPTIVE_RULES and cfg.mixing.signal != rule_timing(cfg.mixing.rule)["signal"]:
        arm += f"-{cfg.mixing.signal}"  # velocitune-train, odm-eval
    if cfg.mixing.pace != pace_default(cfg.mixing.rule, cfg.mixing.preset):
        arm += "-pace" if cfg.mixing.pace else "-nopace"
    return arm


def save_final(model: torch.nn.Module, tokenizer, out: Path, state_dict: dict | None = None) -> None:
    """final/: a save_pretrained directory (plus tokenizer), written beside and renamed into place."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def assemble(domains: dict, names: list[str], dom: np.ndarray, win: np.ndarray, L: int, device: torch.device):
    """Gather the planned windows into one int64 batch (n, L+1) and its per-sequence domain ids (n,)."""
    batch = np.empty((len(dom), L + 1), dtype=np.int64)
    for d in np.unique(dom):
        rows = np.nonzero(dom == d)[0]
        batch[rows] = domains[names[d]].windows(win[rows], L)
    x = torch.from_numpy(batch)
    dvec = torch.from_numpy(dom.astype(np.int64))
    if device.type == "cuda":
        x, dvec = x.pin_memory(), dvec.pin_memory()
    return x.to(device, non_blocking=True), dvec.to(device, non_blocking=True)


@dataclass
class OverheadProbe:
    eval_s: float  # one evaluation of the val sets (what the eval signal runs per update), this rank
    step_s: float  # one training step's forward and backward passes (n_micro micro-batches), this rank


def probe_overhead(net, val: ValSet, env: dist.DistEnv, cfg: Config, autocast, micro: int, n_micro: int,
                   repeats: int = 5) -> OverheadProbe:
    """Time the eval signal's evaluation and a training step before training, leaving no trace.

    The FLOPs estimate k·val/(3·m·τ) takes a forward pass for a third of a step; at small scale fixed costs
    (per-layer kernels, the chunked head, Python) make it more, and the estimate runs ~20 % low. So time the
    real thing: one warm-up micro-batch (it also compiles under train.compile), then `repeats` training
    micro-batches (forward + backward through the same chunked loss as the loop; median) on val windows, and
    one whole `evaluate` after a forward-only warm-up. Gradients are dropped and the RNG forked, so the run
    is the same as without the probe. Collective under torchrun (every rank runs it). Leaves out the
    optimizer step, clipping and data loading (a few % of a step). Cost: about one update's evaluation
    plus seven micro-batches. On the CPU benchmark it lands within 10 % of the measured overhead.
    """
    device = env.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flat = np.concatenate(val.windows)  # (all val windows, L+1)
    dom = np.repeat(np.arange(len(val.windows)), [w.shape[0] for w in val.windows])  # (all val windows,)
    rows = np.arange(micro) % flat.shape[0]  # a training-shaped micro-batch, repeating windows if few
    x = torch.from_numpy(flat[rows]).to(device)  # (micro, L+1)
    d = torch.from_numpy(dom[rows]).to(device)  # (micro,)
    model = unwrap_model(net)

    def micro_step(backward: bool = True) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.set_grad_enabled(backward), autocast():
            out = forward_losses(net, x[:, :-1], x[:, 1:], d, len(val.windows), cfg.train.loss_chunk_tokens)
        if backward:
            out.loss.backward()
        sync()
        return time.perf_counter() - t0

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws stay private
        micro_step()  # warm-up of the training pass
        step_s = n_micro * float(np.median([micro_step() for _ in range(repeats)]))
        model.zero_grad(set_to_none=True)
        net.eval()
        micro_step(backward=False)  # warm-up of the forward-only pass (the ℓ_init evaluation may not have run)
        net.train()
        sync()
        t0 = time.perf_counter()
        evaluate(net, val, env, cfg.eval.batch_size, cfg.train.loss_chunk_tokens, autocast())
        eval_s = time.perf_counter() - t0
    return OverheadProbe(eval_s=eval_s, step_s=step_s)
