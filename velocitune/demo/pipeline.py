"""`velocitune demo`'s stages: the whole method on the embedded corpus, on a CPU, in minutes.

Stages (each explained as it starts, each cached so a second demo skips what is done):
1. build the demo corpus and tokenizer (corpus.py, tokenizer.py beside this module);
2. pretrain a tiny Llama on general prose only, so continual pre-training is a real distribution shift;
3. prepare the CPT domains (replay slice of prose, code, math, scientific docs);
4. measure ℓ_init and predict targets from a 10 % proxy run;
5. train `static` and `velocitune` from the same base on equal budgets (parallel 1-thread processes);
6. score each final model on the demo's downstream tasks (tasks.py) with lm-evaluation-harness;
7. write report.md comparing them. `--full` adds the baselines and ablations over several seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

from velocitune.demo.corpus import CPT_DOMAINS, PRETRAIN_DOMAIN, build_corpus
from velocitune.demo.tokenizer import train_tokenizer
from velocitune.errors import VelocituneError
from velocitune.fileio import atomic_write_json, atomic_write_text, output_dir, read_json

# Sizes chosen so that `make demo` ends within ~15 minutes on 2 CPU cores (measured: README "Demo").
SEQ_LEN = 128
BATCH = 16
MODEL = {"hidden_size": 128, "n_layers": 4, "n_heads": 4, "intermediate_size": 352}
BASE_STEPS = 300
CPT_STEPS = 400
CPT_LR = 1e-3
INTERVAL = 20  # m: 19 updates over the run
EVAL_TOKENS = 8192  # per domain per evaluation (64 windows of 128)
# The demo keeps the 10 % proxy of its issue to stay within its time; `velocitune targets` defaults to 20 %,
# which halved the target error in the study (docs/study.md §2). Points and predictor are the defaults.
PROXY_FRACTION = 0.1
DOWNSTREAM_EXAMPLES = 200  # per task (tasks.py): a standard error of about 0.035 on an accuracy near 0.5


def _stage(n: int, title: str, why: str) -> None:
    print(f"\n[{n}/7] {title}\n      {why}", flush=True)


def _write_yaml(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))
    return path


def check_settings(out: Path, settings: dict) -> None:
    """Stages are cached in `out`; refuse to mix results of different demo settings in one directory."""
    path = out / "demo.json"
    if path.is_file():
        saved = read_json(path, fix=f"delete it (or {out}) to start the demo over")
        if saved != json.loads(json.dumps(settings)):
            diff = {k: (saved.get(k), v) for k, v in settings.items() if saved.get(k) != v}
            raise VelocituneError(
                f"{out} holds a demo with other settings {diff} (saved, now); use another --out or delete it"
            )
    else:
        output_dir(out, "the demo directory (--out)")
        atomic_write_json(path, settings)


def cpt_config(out: Path, steps: int = CPT_STEPS) -> dict:
    """The main-run config every arm shares (rule and seed come as overrides)."""
    return {
        "data": {"path": str(out / "data"), "seq_len": SEQ_LEN},
        "model": {"path": str(out / "base" / "final")},
        "train": {"steps": steps, "batch_size": BATCH, "lr": CPT_LR, "warmup_steps": 0.05, "schedule": "cosine"},
        "mixing": {"interval": INTERVAL, "targets": str(out / "targets" / "targets.json"),
                   "init_loss": str(out / "targets" / "init_loss.json")},
        "eval": {"max_tokens": EVAL_TOKENS, "batch_size": 32},
        "log": {"interval": 10},
        "checkpoint": {"interval": steps // 3, "keep": 1},  # final/ is kept: `velocitune eval` reads it
    }


def targets_config(out: Path, steps: int = CPT_STEPS, threads: int = 2):
    """The config whose proxy predicts the targets: the main run's, without targets of its own, and the
    demo's proxy recipe (the default points, predictor and schedule; a 10 % proxy for time)."""
    from velocitune.config import from_dict

    config = cpt_config(out, steps)
    return from_dict({**config, "mixing": {"interval": INTERVAL}, "train": {**config["train"], "threads": threads},
                      "targets": {"fraction": PROXY_FRACTION}})


def arms(full: bool, seeds: int) -> list[tuple[str, list[str]]]:
    """(arm name, overrides) of the comparison; replay comes later, once velocitune has run."""
    base = [("static", ["--mixing.rule=static"]), ("velocitune", ["--mixing.rule=velocitune"])]
    if full:
        base += [
            ("uniform", ["--mixing.rule=uniform"]),
            ("dbl", ["--mixing.rule=dbl"]),
            ("velocitune-no-target", ["--mixing.rule=velocitune-no-target"]),
            ("odm", ["--mixing.rule=odm", "--mixing.interval=1"]),  # every step, as its authors ran it
            ("velocitune-train", ["--mixing.rule=velocitune", "--mixing.signal=train"]),
        ]
    # Seed-major: the first pair to finish is static vs velocitune at seed 0, as in the plain demo.
    return [(f"{name}/seed{s}", ov + [f"--train.seed={s}", f"--run.arm={name}"]) for s in range(seeds) for name, ov in base]


def run_demo(out: Path, full: bool = False, seeds: int | None = None, parallel: int | None = None,
             steps: int = CPT_STEPS, base_steps: int = BASE_STEPS, scale: float = 1.0) -> Path:
    """Run every stage into `out`; return the path of report.md."""
    from velocitune.prepare import prepare_corpus
    from velocitune.report import make_report

    t0 = time.perf_counter()
    out = Path(out).resolve()
    seeds = seeds or (3 if full else 1)
    parallel = parallel or max(1, min(os.cpu_count() or 1, 2))
    check_settings(out, {"steps": steps, "base_steps": base_steps, "scale": scale, "seq_len": SEQ_LEN,
                         "batch": BATCH, "model": MODEL, "interval": INTERVAL, "eval_tokens": EVAL_TOKENS})

    _stage(1, "corpus and tokenizer",
           "Four CPT domains that differ in content and size, plus general prose for the base model, built "
           "offline from the Python standard library, numpy/scipy docstrings and generated math.")
    corpus = build_corpus(out / "corpus", scale=scale)
    tok = train_tokenizer([corpus[d] for d in (PRETRAIN_DOMAIN, *CPT_DOMAINS)], out / "tokenizer")

    _stage(2, "base model",
           "A tiny Llama pretrained on general prose only, so that code, math and scientific docs are new "
           "to it and continual pre-training is a real distribution shift (cached for the next demo).")
    _base_model(out, corpus, tok, base_steps, parallel)

    _stage(3, "prepare the CPT domains",
           "Tokenise each domain into headered token shards with a fixed held-out validation set; the "
           "token shares give the natural mixture w0. `replay` is a small slice of prose kept apart from "
           "the base model's pretraining text.")
    prepare_corpus(tok, out / "data", {d: [str(corpus[d])] for d in CPT_DOMAINS}, val_fraction=0.05, val_tokens=EVAL_TOKENS * 2,
                   workers=2)

    _stage(4, "initial losses and targets",
           "ℓ_init is the base model's loss per domain. A proxy run on a stratified 10 % of every domain "
           "(static w0, same batch, peak LR and schedule shape) is evaluated at 20 points; the LR-aware CPT law "
           "fitted per domain predicts the loss reachable at the full budget: the target ℓ_target.")
    config_path = _targets(out, steps, parallel)

    _stage(5, "train the arms",
           f"Every arm continues the same base model for {steps} steps ({steps * BATCH * SEQ_LEN:,} tokens), "
           f"{parallel} one-thread processes at a time. Velocitune re-weights every {INTERVAL} steps by how far "
           f"each domain still is from its target.")
    dirs = _train_arms(out, config_path, full, seeds, parallel)

    _stage(6, "downstream evaluation",
           "lm-evaluation-harness scores each final model on three tasks over held-out text: exact match of the "
           "answer of generated math problems, picking a problem's first step among steps of other kinds, and "
           "picking a code file's true next line among four of its lines.")
    _downstream(out, dirs)

    _stage(7, "report", "Per-domain final loss, downstream scores, normalised progress toward the targets, tokens "
                        "and cost; plots.")
    report = make_report(dirs, out, title="velocitune demo: " + ("all arms" if full else "static vs velocitune"))
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s: {report}")
    return report


def _base_model(out: Path, corpus: dict[str, Path], tok: Path, base_steps: int, parallel: int) -> None:
    """Stage 2: the base model, pretrained on general prose only, into out/base (kept when complete)."""
    import shutil

    from velocitune.config import from_dict
    from velocitune.prepare import prepare_corpus
    from velocitune.runfiles import run_is_complete
    from velocitune.train import train

    if run_is_complete(out / "base"):
        print("      cached: base/final")
        return
    prepare_corpus(tok, out / "data_base", {PRETRAIN_DOMAIN: [str(corpus[PRETRAIN_DOMAIN])]},
                   val_fraction=0.05, val_tokens=EVAL_TOKENS * 2, workers=2)
    base = from_dict({
        "run": {"out_dir": str(out / "base"), "arm": "base"},
        "data": {"path": str(out / "data_base"), "seq_len": SEQ_LEN, "max_repetition": 4.0},
        "model": {**MODEL, "tokenizer": str(tok)},
        "train": {"steps": base_steps, "batch_size": BATCH, "lr": 3e-3, "warmup_steps": 0.05,
                  "threads": parallel},
        "mixing": {"rule": "static"},
        "eval": {"max_tokens": EVAL_TOKENS, "interval": base_steps},
        "log": {"interval": 20},
        "checkpoint": {"interval": 0},
    })
    shutil.rmtree(out / "base", ignore_errors=True)
    train(base)


def _targets(out: Path, steps: int, parallel: int) -> Path:
    """Stage 4: the arms' config (out/cpt.yaml, returned) and the targets of its proxy (kept when present)."""
    from velocitune.runfiles import read_targets
    from velocitune.targets import estimate_targets

    config_path = _write_yaml(out / "cpt.yaml", cpt_config(out, steps))
    if not (out / "targets" / "targets.json").is_file():
        estimate_targets(targets_config(out, steps, parallel), out / "targets" / "targets.json")
    doc = read_targets(out / "targets" / "targets.json")
    for name, d in doc["domains"].items():
        print(f"      {name:>8s}: ℓ_init {d['init']:.3f} → target {d['target']:.3f} ({d['predictor']})"
              + ("  [guarded]" if d["guarded"] else ""))
    return config_path


def _train_arms(out: Path, config_path: Path, full: bool, seeds: int, parallel: int) -> list[Path]:
    """Stage 5: every arm as parallel one-thread processes; with `full`, the replay ablation after them."""
    from velocitune.sweep import Arm, run_arms

    dirs = run_arms(config_path, [Arm(n, ov) for n, ov in arms(full, seeds)], out / "runs", parallel=parallel,
                    threads=1)
    if full:  # data-ordering ablation: static at velocitune's time-averaged weights
        replay = [Arm(f"replay/seed{s}", ["--mixing.rule=replay", f"--mixing.replay_from={out / 'runs' / 'velocitune' / f'seed{s}'}",
                                          f"--train.seed={s}", "--run.arm=replay"]) for s in range(seeds)]
        dirs += run_arms(config_path, replay, out / "runs", parallel=parallel, threads=1)
    return dirs


def _downstream(out: Path, dirs: list[Path]) -> None:
    """Stage 6: the demo's downstream tasks for every run that has not scored them yet."""
    from velocitune.demo.tasks import TASKS, write_tasks
    from velocitune.downstream import evaluate_runs, evaluated_tasks

    tasks_dir = write_tasks(out / "corpus", out / "tasks", n=DOWNSTREAM_EXAMPLES)
    pending = [d for d in dirs if not set(TASKS) <= evaluated_tasks(d)]
    if pending:
        evaluate_runs(pending, list(TASKS), include=tasks_dir, batch_size=32)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="demo_out", help="output directory (default demo_out); stages already done are reused")
    p.add_argument("--full", action="store_true",
                   help="add uniform, dbl, velocitune-no-target, odm, the train signal and replay, over --seeds seeds")
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (default: 1, or 3 with --full)")
    p.add_argument("--parallel", type=int, default=None, help="training processes at once (default: min(CPUs, 2))")
    p.add_argument("--steps", type=int, default=CPT_STEPS, help=f"CPT steps per arm (default {CPT_STEPS})")
    p.add_argument("--base-steps", type=int, default=BASE_STEPS,
                   help=f"pretraining steps of the base model (default {BASE_STEPS})")
    p.add_argument("--scale", type=float, default=1.0,
                   help="size of the embedded corpus relative to the default (~10 MB; e.g. 0.1 for a quick look)")


def main(args: argparse.Namespace) -> int:
    for flag, value in (("--steps", args.steps), ("--base-steps", args.base_steps), ("--seeds", args.seeds),
                        ("--parallel", args.parallel)):
        if value is not None and value < 1:
            raise VelocituneError(f"{flag} must be >= 1, got {value}")
    run_demo(Path(args.out), full=args.full, seeds=args.seeds, parallel=args.parallel, steps=args.steps,
             base_steps=args.base_steps, scale=args.scale)
    return 0
