"""Velocity-based mixing inside a `transformers.Trainer`: a mixture dataset plus a callback.

    from velocitune.integrations.hf_trainer import MixtureDataset, VelocituneCallback, trainer_args_for
    data = MixtureDataset("prepared/", seq_len=512, global_batch=64, steps=2000)
    args = TrainingArguments(output_dir="out", **trainer_args_for(data, per_device_batch=8, grad_accum=8))
    cb = VelocituneCallback(data, targets="targets.json", interval=20)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()

The dataset is map-style: item i is sequence i % B of global step i // B of the sampler's plan, so with
the Trainer's sequential sampling every optimizer step consumes exactly one planned global batch, on any
number of ranks. The callback evaluates the fixed per-domain val sets every `interval` steps, applies the
mixing rule, and appends the new weights to the sampler's schedule from step t + 1 (the Trainer's data
loader has already fetched step t's first micro-batch). Its state is saved in each Trainer checkpoint
(`velocitune_state.pt`) and restored on resume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from transformers import TrainerCallback

from velocitune import dist, mixing
from velocitune.errors import ConfigError
from velocitune.evaluate import evaluate, load_val_set
from velocitune.sampler import MixtureSampler
from velocitune.shards import PreparedData

STATE_FILE = "velocitune_state.pt"


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
        steps: Optional[int] = None,
        seed: int = 0,
        weights: Optional[dict[str, float]] = None,
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
        self.sampler = MixtureSampler(seed, global_batch, windows, self.w0, max_repetition=max_repetition,
                                      names=self.names)
        self.steps = steps if steps is not None else max(1, sum(windows) // global_batch)

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
    """Re-weights a MixtureDataset every `interval` steps by a mixing rule (default: Velocitune)."""

    def __init__(
        self,
        dataset: MixtureDataset,
        rule: str = "velocitune",
        targets: str | Path | dict[str, float] | None = None,
        interval: int = 10,
        warmup_steps: int = 0,
        init_loss: Optional[dict[str, float]] = None,
        eval_tokens: int = 32768,
        eval_batch_size: int = 8,
        log_file: Optional[str | Path] = None,
        **rule_params: Any,
    ):
        self.dataset = dataset
        names = dataset.names
        self.rule = mixing.make_rule(rule, dataset.w0, names, **rule_params)
        if isinstance(targets, (str, Path)):
            doc = json.loads(Path(targets).read_text())["domains"]
            targets = {n: doc[n]["target"] for n in doc}
        self.targets = None if targets is None else np.array([targets[n] for n in names], dtype=np.float64)
        if self.rule.needs_targets and self.targets is None:
            raise ConfigError(f"rule '{rule}' needs targets: pass targets='targets.json' or a dict")
        self.init = None if init_loss is None else np.array([init_loss[n] for n in names], dtype=np.float64)
        self.interval, self.warmup = interval, warmup_steps
        self.val = load_val_set(dataset.data, dataset.seq_len, eval_tokens)
        self.eval_batch_size = eval_batch_size
        self.history: list[dict] = []
        self.log_file = Path(log_file) if log_file else None

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
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
        if state.global_step > 0 and ckpt.is_file():
            saved = torch.load(ckpt, weights_only=False)
            self.dataset.sampler.load_state_dict(saved["sampler"])
            self.rule.load_state_dict(saved["rule"])
            self.init, self.history = saved["init"], saved["history"]
        elif self.init is None:
            self.init = self._losses(model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        t = state.global_step
        if not (t > 0 and t >= self.warmup and (t - self.warmup) % self.interval == 0 and t + 1 < self.dataset.steps):
            return
        losses = self._losses(model)
        upd = self.rule.update(t, losses, self.init, self.targets)
        if upd.skipped:
            return
        w_hat = self.dataset.sampler.set_weights(t + 1, upd.weights)
        names = self.dataset.names
        rec = {"step": t + 1, "losses": dict(zip(names, losses.tolist())),
               "velocity": None if upd.velocity is None else dict(zip(names, np.asarray(upd.velocity).tolist())),
               "weights": dict(zip(names, upd.weights.tolist())), "sampling_weights": dict(zip(names, w_hat.tolist())),
               "guarded": upd.guarded}
        self.history.append(rec)
        if self.log_file is not None and state.is_world_process_zero:
            with open(self.log_file, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        out = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (STATE_FILE + ".tmp")
        torch.save({"sampler": self.dataset.sampler.state_dict(), "rule": self.rule.state_dict(),
                    "init": self.init, "history": self.history}, tmp)
        tmp.replace(out / STATE_FILE)
