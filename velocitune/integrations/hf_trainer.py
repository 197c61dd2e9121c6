"""Velocity-based mixing inside a `transformers.Trainer`: a mixture dataset plus a callback.

    from transformers import Trainer, TrainingArguments
    from velocitune.integrations.hf_trainer import MixtureDataset, VelocituneCallback, trainer_args_for
    from velocitune.model import load_model
    model = load_model("./models/base")  # a local directory; a missing one is an error, never a download
    data = MixtureDataset("prepared/", seq_len=512, global_batch=64, steps=2000)
    args = TrainingArguments(output_dir="out", **trainer_args_for(data, per_device_batch=8, grad_accum=8))
    cb = VelocituneCallback(data, targets="targets.json")
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()

The dataset is map-style: item i is sequence i % B of global step i // B of the sampler's plan, so with
the Trainer's sequential sampling every optimizer step consumes exactly one planned global batch, on any
number of ranks. The callback drives the same `MixingController` as `velocitune train`, with the same
defaults (the `mixing` section of the config: rule `velocitune`, preset `robust`, interval steps // 100,
first update at the end of the Trainer's warm-up): at each update it evaluates the fixed per-domain val
sets (the `eval` signal), applies the rule, and appends the new weights to the sampler's schedule from
step t + 1 (the Trainer's data loader has already fetched step t's first micro-batch). The controller is
built by `MixingController.from_config`, as in `velocitune train`, so a bad key, a missing plan or targets
file is refused when the callback is made. Its state and its mixture records are saved in each Trainer
checkpoint as `velocitune_state.json` (runfiles' versioned `callback-state` format; a file of velocitune 0.1
is still read) and restored on resume; the mixture log is cut back to the checkpoint, so a resumed run's
log has no duplicate lines.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback

from velocitune import dist, runfiles
from velocitune.config import from_dict
from velocitune.controller import MixingController
from velocitune.errors import ConfigError
from velocitune.evaluate import evaluate, load_val_set
from velocitune.fileio import truncate_after
from velocitune.sampler import MixtureSampler
from velocitune.shards import PreparedData

# The weights chosen after step t reach the data from step t + 1: the loader has prefetched step t's batch.
LAG = 1


class MixtureDataset(torch.utils.data.Dataset):
    """The weighted, resumable token stream of a prepared directory, as a map-style dataset.

    Each item is {"input_ids", "labels"} of `seq_len` tokens (the Trainer's model shifts labels itself,
    so the last token of each seq_len + 1 window is not used here).
    """

    def __init__(
        self,
        data_path: str | Path,
        seq_len: int,
        global_batch: int,
        steps: int | None = None,
        seed: int = 0,
        weights: dict[str, float] | None = None,
        max_repetition: float = 1.0,
    ):
        self.data = PreparedData(data_path)
        self.names = list(self.data.domains)
        self.seq_len = seq_len
        self.global_batch = global_batch
        self._tokens = {n: self.data.train(n) for n in self.names}
        windows = [self._tokens[n].n_windows(seq_len) for n in self.names]
        w0 = self.data.w0 if weights is None else np.array([weights[n] for n in self.names], dtype=np.float64)
        self.w0 = w0 / w0.sum()
        self._stream = dict(seed=seed, global_batch=global_batch, windows_per_domain=windows,
                            max_repetition=max_repetition, names=self.names, tokens_per_window=seq_len)
        self.sampler = self.restart(self.w0)
        self.steps = steps if steps is not None else max(1, sum(windows) // global_batch)

    def restart(self, weights: np.ndarray) -> MixtureSampler:
        """A fresh sampler of this stream starting from `weights` (k,), read by the dataset from now on (the
        callback's controller starts it from its rule's initial weights)."""
        self.sampler = MixtureSampler(initial_weights=weights, **self._stream)
        return self.sampler

    def __len__(self) -> int:
        return self.steps * self.global_batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        step, pos = divmod(int(i), self.global_batch)
        plan = self.sampler.plan(step)
        d = int(plan.domains[pos])
        window = self._tokens[self.names[d]].windows(plan.windows[pos : pos + 1], self.seq_len)[0]
        ids = torch.from_numpy(window[: self.seq_len].astype(np.int64))
        return {"input_ids": ids, "labels": ids.clone()}

    def domain_of(self, i: int) -> int:
        step, pos = divmod(int(i), self.global_batch)
        return int(self.sampler.plan(step).domains[pos])


def trainer_args_for(data: MixtureDataset, per_device_batch: int, grad_accum: int = 1, world_size: int = 1) -> dict:
    """TrainingArguments keywords that make the Trainer consume exactly the planned global batches."""
    if per_device_batch * grad_accum * world_size != data.global_batch:
        raise ConfigError(
            f"per_device_batch x grad_accum x world_size = {per_device_batch} x {grad_accum} x {world_size} "
            f"must equal the dataset's global_batch {data.global_batch}"
        )
    return {
        "per_device_train_batch_size": per_device_batch,
        "gradient_accumulation_steps": grad_accum,
        "max_steps": data.steps,
        "train_sampling_strategy": "sequential",
        "dataloader_num_workers": 0,  # weight updates must reach the dataset object the loader reads
        "dataloader_drop_last": True,
    }


class VelocituneCallback(TrainerCallback):
    """Re-weights a MixtureDataset while a `transformers.Trainer` trains, with `velocitune train`'s controller.

    dataset: the MixtureDataset the Trainer reads. targets: a targets.json path or {domain: loss}.
    init_loss: an init_loss.json path or {domain: loss}; default: measured when training begins.
    interval: steps between updates (default: steps // 100, for every rule: each update costs an
    evaluation here); warmup_steps: the first update's step (default: mixing.warmup, else the rule's
    as its authors ran it (dbl: 0), else the Trainer's own warm-up). log_file: where to write the mixture
    records (mixture.jsonl format). Any other keyword is a `mixing` config key (rule, preset, eta, smoothing,
    floor, ...), with the same defaults and checks as in a config file.
    """

    def __init__(
        self,
        dataset: MixtureDataset,
        targets: str | Path | dict[str, float] | None = None,
        init_loss: str | Path | dict[str, float] | None = None,
        interval: int | None = None,
        warmup_steps: float | None = None,
        eval_tokens: int = 32768,
        eval_batch_size: int = 8,
        log_file: str | Path | None = None,
        **mixing: Any,
    ):
        self.dataset = dataset
        names = dataset.names
        # The Trainer gives us evaluations only; and its LR schedule is its own, which the online targets would
        # need (docs/usage.md): the callback keeps the targets as `velocitune targets` made them.
        keys = {"signal": "eval", "online": False, **mixing, "interval": interval}
        if warmup_steps is not None:
            keys["warmup"] = warmup_steps
        if isinstance(targets, (str, Path)):
            keys["targets"] = str(targets)
        elif targets is not None:
            keys["target_values"] = dict(targets)
        if isinstance(init_loss, (str, Path)):
            keys["init_loss"] = str(init_loss)
        mc = from_dict({"mixing": keys}).mixing  # typed, range-checked, did-you-mean on a typo
        if mc.signal != "eval":
            raise ConfigError("VelocituneCallback re-weights from evaluations (mixing.signal=eval): the Trainer "
                              "does not expose per-domain training losses; use `velocitune train` for the train signal")
        if mc.rule == "aioli":
            raise ConfigError("VelocituneCallback does not run rule 'aioli': its LearnParams blocks need the val "
                              "losses at steps the rule sets and their weights from the very next step; use "
                              "`velocitune train --mixing.rule=aioli`")
        self.mixing_config = mc
        given = np.array([init_loss[n] for n in names], dtype=np.float64) if isinstance(init_loss, dict) else None
        tokens = np.array([dataset.data.domain_info(n)["train"]["tokens"] for n in names], dtype=np.float64)
        # The first update may wait for the Trainer's LR warm-up (lr_warmup=None): `on_train_begin` gives it.
        self.controller = MixingController.from_config(
            mc, names, dataset.w0, tokens, make_sampler=dataset.restart, steps=dataset.steps, lr_warmup=None,
            seq_len=dataset.seq_len, device=torch.device("cpu"), given_init=given, rule_interval=False,
            keep_records=True)
        self.val = load_val_set(dataset.data, dataset.seq_len, eval_tokens)
        self.eval_batch_size = eval_batch_size
        self.log_file = Path(log_file) if log_file else None

    @property
    def history(self) -> list[dict]:
        """Every mixture record of this process, step 0 included (restored from the checkpoint on resume)."""
        return self.controller.records

    @property
    def init(self) -> np.ndarray | None:
        return self.controller.init

    def _env(self, model) -> dist.DistEnv:
        device = next(model.parameters()).device
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return dist.DistEnv(torch.distributed.get_rank(), torch.distributed.get_world_size(), 0, device)
        return dist.DistEnv(device=device)

    def _losses(self, model) -> np.ndarray:
        return evaluate(model, self.val, self._env(model), self.eval_batch_size)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.dataloader_num_workers:
            raise ConfigError("VelocituneCallback needs dataloader_num_workers=0 (see trainer_args_for)")
        c = self.controller
        c.use_lr_warmup(args.get_warmup_steps(self.dataset.steps))
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / runfiles.CALLBACK_STATE_FILE
        resuming = state.global_step > 0 and saved.is_file()
        if self.log_file is not None and state.is_world_process_zero:
            if resuming:
                truncate_after(self.log_file, state.global_step + LAG)  # later records are written again
            else:
                self.log_file.unlink(missing_ok=True)
            c.log = runfiles.RunLog(self.log_file, runfiles.MIXTURE, self.dataset.names)
        if resuming:
            doc = runfiles.read_callback_state(saved)
            c.load_state_dict(doc["controller"])
            c.records[:] = doc["records"]
        else:
            c.start(c.given_init if c.given_init is not None else self._losses(model))

    def on_step_end(self, args, state, control, model=None, **kwargs):
        t = state.global_step
        if not self.controller.due(t, lag=LAG):
            return
        losses = self._losses(model)
        # ŵ of the step just trained (t - 1): the ODM rule's importance weights.
        self.controller.update(t, losses, self.dataset.sampler.plan(t - 1).sampling_weights, lag=LAG)

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        out = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        out.mkdir(parents=True, exist_ok=True)
        runfiles.write_callback_state(out / runfiles.CALLBACK_STATE_FILE, self.controller.state_dict(),
                                      self.controller.records)

    def on_train_end(self, args, state, control, **kwargs):
        if self.controller.log is not None:
            self.controller.log.close()
