"""Benchmark: `velocitune train` against the peer users would pick instead, transformers.Trainer driven by
velocitune's MixtureDataset and VelocituneCallback: same model, data, batch, steps and optimizer, side by side.

Two pairs, each run in turn (ours, theirs, ours, theirs, ... for `--repeats` rounds) in one process with one
torch thread, so that both see the same machine load:
  static   `velocitune train --mixing.rule=static`  vs  Trainer(train_dataset=MixtureDataset(...))
           The two read exactly the same planned batches (MixtureDataset follows the sampler's plan), so
           their training losses must agree; they differ by design in one token per sequence: the Trainer's
           model shifts labels inside a seq_len window and predicts seq_len - 1 tokens, velocitune predicts
           seq_len tokens from a seq_len + 1 window (docs/usage.md, transformers.Trainer).
  eval     `velocitune train` (rule velocitune, eval signal)  vs  the Trainer with VelocituneCallback (which
           supports the eval signal only); same interval, warm-up 0, the same explicit targets.
Both use AdamW (betas 0.9/0.95, weight decay 0.1 on >= 2-D parameters, which for a Llama is what the
Trainer's default excludes too: biases and norms), a constant LR of 1e-3, clip 1.0, the same saved fresh
model. Step times: velocitune's from where train.py counts a step's tokens (`Throughput.add`, patched here),
the Trainer's from `on_step_end`; the first `--skip` steps (start-up, the step-0 evaluation) are left out;
tokens/s = tokens per step / median step time, and over the window's total time (which includes the
steps that carry a mixture update; the median leaves them out). Loss agreement: the mean training loss of each log window
(metrics.jsonl vs the Trainer's log history), max relative difference.

    python benchmarks/hf_trainer.py [--steps 40] [--repeats 2] [--cache DIR]

Goal: ours at least as fast (tokens/s ratio >= 1.0) with the same losses (max relative difference of
window losses below 2 %, the one-token difference). Prints a table; writes benchmarks/results/hf_trainer.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import shutil
import statistics
import sys
import time
import warnings
from pathlib import Path

from results_file import save  # noqa: E402
from throughput import build_data, cpu_setup, saved_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 1e-3, (0.9, 0.95), 0.1, 1.0
TARGET_LOSS = 4.0  # explicit targets for every domain, in both (a fresh model starts near ln(vocab) = 9)
GOALS = {"speed_ratio": 1.0, "loss_rel_diff": 0.02}


def ours(pair: str, s, data_dir: Path, tok_dir: Path, model_dir: Path, names: list[str], out: Path) -> dict:
    """One `velocitune train` run: step end times and the metrics.jsonl window losses."""
    from velocitune import metrics
    from velocitune.config import from_dict
    from velocitune.fileio import read_jsonl
    from velocitune.train import train

    mixing = {"rule": "static"} if pair == "static" else {
        "rule": "velocitune", "signal": "eval", "interval": s.m, "warmup": 0,
        "target_values": {n: TARGET_LOSS for n in names}}
    cfg = from_dict({
        "run": {"out_dir": str(out)},
        "data": {"path": str(data_dir), "seq_len": s.seq_len, "max_repetition": 1e6},
        "model": {"path": str(model_dir), "tokenizer": str(tok_dir)},
        "train": {"steps": s.steps, "batch_size": s.batch, "lr": LR, "schedule": "constant", "warmup_steps": 0,
                  "beta1": BETAS[0], "beta2": BETAS[1], "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP,
                  "threads": 1, "device": "cpu", "seed": 0},
        "mixing": mixing,
        "eval": {"max_tokens": s.eval_tokens, "interval": s.steps, "batch_size": s.batch},  # no curve evals
        "log": {"interval": s.m, "progress": False},
        "checkpoint": {"interval": 0, "save_final": False},
    })
    times: list[float] = []
    original = metrics.Throughput.add

    def add(self, tokens: int) -> None:  # where train.py closes an optimizer step
        original(self, tokens)
        times.append(time.perf_counter())

    shutil.rmtree(out, ignore_errors=True)
    metrics.Throughput.add = add
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            t0 = time.perf_counter()
            train(cfg)
    finally:
        metrics.Throughput.add = original
    losses = {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl")}
    return {"step_ends": [t - t0 for t in times], "losses": losses}


def theirs(pair: str, s, data_dir: Path, model_dir: Path, out: Path) -> dict:
    """One transformers.Trainer run on MixtureDataset (+ VelocituneCallback for the eval pair)."""
    import torch
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from velocitune.integrations.hf_trainer import MixtureDataset, VelocituneCallback, trainer_args_for
    from velocitune.model import load_model

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = load_model(model_dir).train()
    data = MixtureDataset(data_dir, seq_len=s.seq_len, global_batch=s.batch, steps=s.steps, seed=0,
                          max_repetition=1e6)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    callbacks: list = [Clock()]
    if pair == "eval":
        callbacks.insert(0, VelocituneCallback(data, targets={n: TARGET_LOSS for n in data.names},
                                               interval=s.m, warmup_steps=0, eval_tokens=s.eval_tokens,
                                               eval_batch_size=s.batch))
    shutil.rmtree(out, ignore_errors=True)
    args = TrainingArguments(
        output_dir=str(out), learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], weight_decay=WEIGHT_DECAY, max_grad_norm=GRAD_CLIP,
        logging_steps=s.m, save_strategy="no", report_to="none", use_cpu=True, seed=0, disable_tqdm=True,
        **trainer_args_for(data, per_device_batch=s.batch))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        trainer.train()
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    return {"step_ends": [t - t0 for t in times], "losses": losses}


def step_times(step_ends: list[float], skip: int) -> list[float]:
    """Durations of the steps after the first `skip` (each from the previous step's end)."""
    return [b - a for a, b in zip(step_ends[skip - 1:], step_ends[skip:])] if skip >= 1 else []


def analyse(rounds: list[dict], s, skip: int) -> dict:
    tokens = s.batch * s.seq_len
    out = {}
    for pair in ("static", "eval"):
        med = {side: statistics.median([t for r in rounds for t in step_times(r[pair][side]["step_ends"], skip)])
               for side in ("ours", "theirs")}
        # Window totals include the steps that carry a mixture update (the median leaves those out).
        total = {side: sum(sum(step_times(r[pair][side]["step_ends"], skip)) for r in rounds)
                 / sum(len(step_times(r[pair][side]["step_ends"], skip)) for r in rounds) for side in ("ours", "theirs")}
        common = sorted(set(rounds[0][pair]["ours"]["losses"]) & set(rounds[0][pair]["theirs"]["losses"]))
        rel = [abs(r[pair]["ours"]["losses"][k] - r[pair]["theirs"]["losses"][k]) / r[pair]["theirs"]["losses"][k]
               for r in rounds for k in common]
        out[pair] = {"tok_per_s_ours": tokens / med["ours"], "tok_per_s_theirs": tokens / med["theirs"],
                     "median_step_s_ours": med["ours"], "median_step_s_theirs": med["theirs"],
                     "speed_ratio": med["theirs"] / med["ours"],
                     "tok_per_s_ours_window": tokens / total["ours"], "tok_per_s_theirs_window": tokens / total["theirs"],
                     "speed_ratio_window": total["theirs"] / total["ours"], "loss_steps": common,
                     "loss_rel_diff_max": max(rel) if rel else None,
                     "losses_ours": [rounds[0][pair]["ours"]["losses"][k] for k in common],
                     "losses_theirs": [rounds[0][pair]["theirs"]["losses"][k] for k in common]}
        out[pair]["speed_ok"] = min(out[pair]["speed_ratio"], out[pair]["speed_ratio_window"]) >= GOALS["speed_ratio"]
        out[pair]["loss_ok"] = rel != [] and max(rel) < GOALS["loss_rel_diff"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip", type=int, default=5, help="steps left out at the start of every run")
    p.add_argument("--cache", type=Path, default=Path("/tmp/velocitune-bench/cpu"))
    args = p.parse_args()
    import torch

    from velocitune.shards import PreparedData

    s = cpu_setup(argparse.Namespace(vocab=None, steps=args.steps))
    tok_dir, data_dir = build_data(args.cache, s)
    names = list(PreparedData(data_dir).domains)
    vocab = PreparedData(data_dir).manifest["tokenizer"]["vocab_size"]
    model_dir = saved_model(args.cache, s, vocab)
    runs = args.cache / "hf_trainer_runs"
    rounds = []
    for rep in range(args.repeats):
        rnd: dict = {}
        for pair in ("static", "eval"):
            order = ("ours", "theirs") if rep % 2 == 0 else ("theirs", "ours")
            rnd[pair] = {}
            for side in order:
                t = time.perf_counter()
                rnd[pair][side] = (ours(pair, s, data_dir, tok_dir, model_dir, names, runs / f"{pair}-ours")
                                   if side == "ours" else theirs(pair, s, data_dir, model_dir, runs / f"{pair}-theirs"))
                print(f"round {rep + 1}/{args.repeats} {pair:>6} {side:>6}: {time.perf_counter() - t:.1f}s", flush=True)
        rounds.append(rnd)
    res = analyse(rounds, s, args.skip)
    print(f"\nvelocitune train vs transformers.Trainer + MixtureDataset (demo Llama {s.hidden}x{s.layers}, "
          f"batch {s.batch}x{s.seq_len}, {args.steps} steps, {args.repeats} rounds, 1 thread)")
    print("tok/s from the median step time; 'window': from the window's total time, mixture updates included")
    print(f"{'pair':>7} {'ours tok/s':>11} {'Trainer tok/s':>14} {'ratio':>6} {'window ratio':>13} {'max loss diff':>14}  goal")
    for pair, r in res.items():
        diff = "n/a" if r["loss_rel_diff_max"] is None else f"{100 * r['loss_rel_diff_max']:.2f} %"
        print(f"{pair:>7} {r['tok_per_s_ours']:>11,.0f} {r['tok_per_s_theirs']:>14,.0f} {r['speed_ratio']:>6.2f} "
              f"{r['speed_ratio_window']:>13.2f} {diff:>14}  speed {'met' if r['speed_ok'] else 'MISSED'}, "
              f"losses {'met' if r['loss_ok'] else 'MISSED'}")
    import transformers

    path = save("hf_trainer", {"setup": {"steps": args.steps, "repeats": args.repeats, "skip": args.skip,
                                         "batch": s.batch, "seq_len": s.seq_len, "hidden": s.hidden,
                                         "layers": s.layers, "m": s.m, "eval_tokens": s.eval_tokens},
                               "goals": GOALS, "results": res, "torch": torch.__version__,
                               "transformers": transformers.__version__, "machine": platform.platform()})
    print(f"figures written to {path}")


if __name__ == "__main__":
    main()
