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
import shutil
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from velocitune import dist, dist_checkpoint, runfiles
from velocitune.announce import config_line, warn
from velocitune.checkpoint import list_checkpoints, load_latest, rng_state, save_checkpoint, set_rng_state
from velocitune.config import Config, check_resume_config, dump_yaml, to_dict
from velocitune.controller import MixingController, check_same_on_all_ranks
from velocitune.engine import build_engine
from velocitune.errors import ConfigError, TrainingError
from velocitune.evaluate import ValSet, evaluate, load_val_set
from velocitune.fileio import output_dir
from velocitune.layout import assemble, eval_points, plan_layout, train_windows
from velocitune.loggers import TensorBoardLogger, WandbLogger, import_wandb, new_wandb_run_id
from velocitune.losses import forward_losses, fused_forward_losses
from velocitune.metrics import Throughput, Timers, flops_per_token, format_weights, peak_flops
from velocitune.model import unwrap_model
from velocitune.overhead import flops_overhead, overhead_line, overhead_warning, probe_overhead
from velocitune.preempt import PREEMPTED_EXIT, Preempted, PreemptionGuard, StopAgreement
from velocitune.sampler import MixtureSampler, Plan, rank_slice
from velocitune.schedule import lr_schedule, step_lr
from velocitune.shards import PreparedData
from velocitune.summary import default_arm, run_summary, save_final


class TrainState:
    """Everything that must survive a restart besides the model and optimizer tensors.

    Progress (optimizer steps done, skipped non-finite steps, wall seconds of earlier processes), the
    timers, the log window's per-domain NLL sums on the device (float64 (k,)) and step-loss sum, and the
    mixing controller (rule, sampler schedule, ℓ_init, train-signal window, tokens per domain). The step
    buffers hold the current step's per-domain sums until the step is kept (`keep_step`): a skipped
    non-finite step leaves both windows as the earlier steps made them.
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
        self.step_sum = torch.zeros_like(self.log_sum)  # this step's per-domain NLL sums, (k,); zero at a boundary
        self.step_cnt = torch.zeros_like(self.log_sum)

    def keep_step(self, step_loss: torch.Tensor) -> None:
        """The step was finite: its loss and per-domain sums join the log window and the train signal's."""
        self.loss_acc += step_loss
        self.loss_steps += 1
        self.log_sum += self.step_sum
        self.log_cnt += self.step_cnt
        self.mixing.observe(self.step_sum, self.step_cnt)
        self.step_sum.zero_(), self.step_cnt.zero_()

    def drop_step(self) -> None:
        """A skipped non-finite step: its sums go, the windows keep the earlier steps'."""
        self.skipped += 1
        self.step_sum.zero_(), self.step_cnt.zero_()

    def state_dict(self) -> dict[str, Any]:
        """Plain values (stored as JSON) and tensors (stored with torch.save): nothing that runs code on load."""
        return {
            "progress": {"step": self.step, "skipped": self.skipped, "elapsed_s": self.elapsed_s,
                         "loss_steps": self.loss_steps, "timers": self.timers.state_dict()},
            "mixing": self.mixing.state_dict(),
            "tensors": {"log_sum": self.log_sum.cpu(), "log_cnt": self.log_cnt.cpu(), "loss_acc": self.loss_acc.cpu()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        progress, tensors = state["progress"], state["tensors"]
        self.step, self.skipped, self.loss_steps = int(progress["step"]), int(progress["skipped"]), int(progress["loss_steps"])
        self.timers.load_state_dict(progress["timers"])
        self.elapsed_s = float(progress["elapsed_s"])
        # Checkpoints of velocitune 0.1 kept the train-signal window with the tensors.
        self.mixing.load_state_dict({**{k: tensors[k] for k in ("sig_sum", "sig_cnt") if k in tensors}, **state["mixing"]})
        self.log_sum.copy_(tensors["log_sum"].to(self.log_sum.device))
        self.log_cnt.copy_(tensors["log_cnt"].to(self.log_cnt.device))
        self.loss_acc.copy_(tensors["loss_acc"].to(self.loss_acc.device))


@dataclass
class RunResult:
    out_dir: Path
    steps: int
    final_val_loss: dict[str, float]
    weights: dict[str, float]


# The end-of-run hook of `Trainer.finish`: (run dir, W&B logger, steps) -> None.
EndHook = Callable[[Path, WandbLogger, int], None]


def train(cfg: Config, resume: bool = False, dry_run: bool = False, on_end: EndHook | None = None,
          verbose: bool = False, resume_hint: str | None = None) -> RunResult | None:
    """Set up, resume when asked, train, and write the summary and the final model of one run.

    dry_run: set up (config, data, model, targets, budget, memory check), print the plan and return None
    without training or writing anything. on_end: `Trainer.finish`'s end-of-run hook (None: none). resume of
    a run that already finished returns None at once, having trained and written nothing. verbose: print the
    whole resolved config (else one line). resume_hint: how a preempted run says to continue (a proxy names
    its own command; default "the same command and --resume").
    """
    if resume and not dry_run and _finished(cfg):
        return None  # a requeued job of a finished run: final/ and the logs stay as they are
    env = dist.init(cfg.train.device, cfg.dist.backend, cfg.dist.strategy)
    try:
        # From set-up to the end: a SIGTERM/SIGUSR1 during set-up is acted on at the first step boundary.
        with PreemptionGuard() as guard:
            trainer = Trainer(cfg, env, guard, verbose=verbose, resume_hint=resume_hint)
            if dry_run:
                trainer.dry_run()
                return None
            with trainer.lock():
                try:
                    trainer.start(resume)
                    trainer.fit()
                    return trainer.finish(on_end)
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

    def __init__(self, cfg: Config, env: dist.DistEnv, guard: PreemptionGuard | None = None, verbose: bool = False,
                 resume_hint: str | None = None):
        self.t_start = time.perf_counter()
        self.cfg, self.env = cfg, env
        self.verbose, self.resume_hint = verbose, resume_hint or "the same command and --resume"
        self.out = Path(cfg.run.out_dir)
        self.main = env.is_main
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self.data = PreparedData(cfg.data.path)
        names, L = list(self.data.domains), cfg.data.seq_len
        self.domains = {n: self.data.train(n) for n in names}
        windows = train_windows(self.domains, L)
        self.layout = lay = plan_layout(cfg, windows, names, env.world_size)
        # The mixture before the model: a missing or mismatched plan or targets file is refused at once.
        sampler = partial(MixtureSampler, seed=cfg.train.seed, global_batch=lay.batch, windows_per_domain=windows,
                          max_repetition=cfg.data.max_repetition, floor=cfg.mixing.sampling_floor,
                          subsample=cfg.data.subsample, names=names, tokens_per_window=L)
        tokens = np.array([self.data.domain_info(n)["train"]["tokens"] for n in names], dtype=np.float64)
        mix = MixingController.from_config(
            cfg.mixing, names, self.data.w0, tokens, make_sampler=lambda w: sampler(initial_weights=w),
            steps=lay.steps, lr_warmup=lay.warmup, seq_len=L, device=env.device,
            budget_tokens=float(lay.steps * lay.tokens_per_step), lrs=lr_schedule(cfg, lay.steps))
        self.eval_points = eval_points(cfg, lay.steps, mix.interval, mix.eval_signal)
        e = self.engine = build_engine(cfg, env, self.data, lay, self.domains[names[0]].windows(np.arange(1), L)[:, :-1])
        self.model, self.net, self.optimizer, self.autocast, self.fused = e.model, e.net, e.optimizer, e.autocast, e.fused
        self.throughput = Throughput(flops_per_token(e.model, L), peak_flops(env.device)[0], env.world_size)
        self.peak_name = peak_flops(env.device)[1]
        self.val: ValSet = load_val_set(self.data, L, cfg.eval.max_tokens)
        self.state = TrainState(mix, lay.k, env.device)
        self.tb = TensorBoardLogger(self.out / runfiles.TENSORBOARD_DIR, enabled=False)
        self.wb = WandbLogger(enabled=False)
        if cfg.log.wandb and self.main:
            import_wandb()  # a missing package fails here, before the run directory is touched
        self.metrics_log = self.eval_log = None
        self.stop = StopAgreement(guard or PreemptionGuard(), env, cfg.checkpoint.preempt_check_interval)
        self.last_checkpoint = -1  # the step of the checkpoint this process wrote last

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
            elif (cfg.mixing.targets and Path(cfg.mixing.targets).is_file()  # a rule without targets may lack it
                  and not _same_file(cfg.mixing.targets, out / runfiles.TARGETS_FILE)):
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
        given = self.state.mixing.given_init
        init = given if given is not None else measured
        if self.main and given is None:
            runfiles.write_init_loss(self.out / runfiles.INIT_LOSS_FILE, self.cfg.model.path or "fresh",
                                     self.layout.names, init, self.val.tokens)
        for warning in self.state.mixing.start(init):
            self._say(f"warning: {warning}")

    def _announce(self, timed: bool = True) -> None:
        """Print the resolved config (one line; all of it when verbose), the budget, the memory estimate and the
        estimated reweighting overhead, with a warning when that is over a quarter of the run.

        timed=False (the dry run) leaves out the timed probe and gives the FLOPs estimate of the overhead alone.
        """
        cfg, lay, env, mix, e = self.cfg, self.layout, self.env, self.state.mixing, self.engine
        # The eval signal's cost per training step: by FLOPs (a forward is a third of a step), and from clocks.
        m = mix.interval
        self.overhead_flops = flops_overhead(self.val.tokens.sum(), m, lay.tokens_per_step) if mix.eval_signal else 0.0
        probe = (probe_overhead(self.net, self.val, env, cfg, self.autocast, lay.micro, lay.n_micro)
                 if mix.eval_signal and timed else None)
        self.overhead = probe.eval_s / (m * probe.step_s) if probe else self.overhead_flops
        if not self.main:
            return
        names, w = lay.names, self.state.mixing.rule.initial_weights()
        print(dump_yaml(cfg) if self.verbose else config_line(cfg, lay.steps, ("eval" if mix.eval_signal else "train")
                                                               if mix.adaptive else None))
        source = "" if cfg.mixing.weights is not None else (f"  (the plan's, {cfg.mixing.plan})" if cfg.mixing.plan
                                                             else "  (w0 = token shares)")
        print(f"domains: {format_weights(names, w)}{source}")
        print(f"steps {lay.steps} x {lay.batch} seq x {lay.seq_len} tok = {lay.steps * lay.tokens_per_step:,} tokens; "
              f"warm-up {lay.warmup}; "
              + (f"update every {m} steps from step {max(mix.warmup, m)}; "
                 if self.state.mixing.adaptive else f"{cfg.mixing.rule} weights; ")
              + f"{env.world_size} process(es), {lay.n_micro} micro-batch(es) of {lay.micro}")
        checked = "" if cfg.train.memory_check else " (train.memory_check=false: not enforced)"
        print(f"estimated memory per device: {e.memory.line(e.capacity, e.capacity_where)}{checked}; "
              f"micro-batch {lay.micro} x {lay.seq_len} tok, activation_checkpointing={cfg.train.activation_checkpointing}, "
              f"attn={cfg.model.attn_implementation}")
        line = overhead_line(cfg.mixing.signal, mix.adaptive, probe, self.overhead_flops, m, timed, env.distributed, lay.k)
        if line:
            print(line)
        if mix.adaptive and (heavy := overhead_warning(self.overhead, m, cfg.eval.max_tokens)):
            warn(heavy)

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
            if done in self.eval_points and done < lay.steps and not (mix.eval_signal and mix.due(done)):
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
        self._say(f"{stop}: checkpoint written; continue with {self.resume_hint} (exit status {PREEMPTED_EXIT})")
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
            st.step_sum += out.nll_sum  # joins the windows once the step is kept (`_optimizer_step`)
            st.step_cnt += out.count
        return step_loss

    def _optimizer_step(self, step: int, step_loss: torch.Tensor, bar) -> torch.Tensor:
        """Clip, then step, or stop/skip (train.nan_policy) on a non-finite loss or gradient."""
        st = self.state
        gnorm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip or float("inf"))
        if bool(torch.isfinite(step_loss) & torch.isfinite(gnorm)):  # the one per-step sync (see docstring)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            st.keep_step(step_loss)
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
        st.drop_step()
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
        losses = self._evaluate(done, "reweight") if self.state.mixing.eval_signal else None
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

    def finish(self, on_end: EndHook | None = None) -> RunResult:
        """Final validation loss, summary.json, final/ (save_pretrained) and the closing lines.

        on_end(run dir, W&B logger, steps): called on rank 0 once the run is complete, before the loggers
        close, when W&B logs the run (log.wandb); the CLI passes the report's `upload_plots`."""
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
            summary = run_summary(cfg, mix, lay.steps, final, timers, wall_time_s=wall, skipped_steps=st.skipped,
                                  world_size=self.env.world_size, estimated_overhead=self.overhead,
                                  estimated_overhead_flops=self.overhead_flops, measured_overhead=measured)
            if cfg.checkpoint.save_final:
                save_final(unwrap_model(self.model), self.engine.tokenizer, self.out / runfiles.FINAL_DIR, final_sd)
            # Last: a summary marked complete is the commit point of a finished run (`--resume` then stops).
            runfiles.write_summary(self.out / runfiles.SUMMARY_FILE, summary)
            self._wandb_end(summary, on_end)
            self.close_loggers()
            self._closing_lines(final, wall, measured)
        dist.barrier(self.env)
        return RunResult(self.out, lay.steps, dict(zip(names, final.tolist())), dict(zip(names, mix.weights().tolist())))

    def _wandb_end(self, summary: dict[str, Any], on_end: EndHook | None) -> None:
        """W&B's run summary (final, initial and target losses, tokens per domain, times), then `on_end`."""
        if not self.wb.enabled:
            return
        for key in ("final_val_loss", "init_loss", "targets", "tokens_per_domain", "epochs_per_domain"):
            self.wb.summary(key, summary[key] or {})
        self.wb.summary("", {k: summary[k] for k in ("wall_time_s", "time_eval_s", "time_update_s", "time_data_s",
                                                     "time_checkpoint_s", "measured_overhead", "estimated_overhead")})
        if on_end is not None:  # e.g. the report's plots (the caller's hook: the Trainer does not import report)
            on_end(self.out, self.wb, self.layout.steps)

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


def _finished(cfg: Config) -> bool:
    """True, having said so, when run.out_dir holds a finished run of this config (summary.json marked complete,
    written after final/); ConfigError when its config.yaml differs in keys that shape the run."""
    out = Path(cfg.run.out_dir)
    if not runfiles.run_is_complete(out):
        return False
    if (out / runfiles.CONFIG_FILE).is_file():
        check_resume_config(to_dict(runfiles.read_config(out / runfiles.CONFIG_FILE)), to_dict(cfg))
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run {out} is complete (its summary.json says so): nothing to resume, nothing written; "
              f"to train it again, use another run.out_dir")
    return True

