"""`velocitune eval`: downstream scores of finished runs with lm-evaluation-harness, offline.

Each run's final model (`RUN/final/`, a save_pretrained directory with its tokenizer) is evaluated on
lm-eval tasks; the scores go to `RUN/downstream.json` (owner: `velocitune.runfiles`), one entry per task,
so that evaluating more tasks later adds to the file and `velocitune report` shows them next to the losses.

Nothing is downloaded: the Hub and `datasets` are set offline while lm-eval runs (restored after), so a task
must read local files (`dataset_path: json` with `data_files`, or a dataset already in the local cache). Task
files of the user's own go in a directory passed as `--include`; the demo writes its own there
(`velocitune.demo.tasks`). docs/usage.md, section "eval", is the user's guide.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from velocitune import runfiles
from velocitune.errors import ConfigError, DataError
from velocitune.fileio import require_dir
from velocitune.prepare.hf import offline

# lm-eval names a score "metric,filter"; the filter `none` (no post-processing) is left out of our names.
_NO_FILTER = "none"


class _FirstTruncationOnly(logging.Filter):
    """lm-eval warns once per example whose context is cut to the model's length: keep the first warning."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Combined length of context"):
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg = f"{record.msg} (further truncation warnings are not shown; --max-length sets the limit)"
        return True


def _import_lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise ConfigError(
            f"`velocitune eval` needs lm-evaluation-harness ({exc}); install it with "
            f"pip install 'velocitune[eval]'"
        ) from None
    hf_log = logging.getLogger(HFLM.__module__)
    if not any(isinstance(f, _FirstTruncationOnly) for f in hf_log.filters):
        hf_log.addFilter(_FirstTruncationOnly())
    return lm_eval, HFLM, TaskManager


def final_model_dir(run_dir: str | os.PathLike) -> Path:
    """RUN/final/ of a finished run, checked to hold a model and its tokenizer."""
    run = require_dir(run_dir, "run directory", "pass a run.out_dir that `velocitune train` wrote")
    final = run / runfiles.FINAL_DIR
    if not (final / "config.json").is_file():
        raise DataError(
            f"run directory {run} has no final model ({final}/config.json is missing): the run has not "
            f"finished, or it ran with checkpoint.save_final=false; finish it with `velocitune train ... "
            f"--resume`, or re-run it with --checkpoint.save_final=true"
        )
    if not any((final / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise DataError(
            f"{final} holds no tokenizer files; lm-eval scores text, so the model needs its tokenizer: copy "
            f"the base model's tokenizer there (tokenizer.save_pretrained('{final}'))"
        )
    return final


def parse_tasks(spec: str | Sequence[str]) -> list[str]:
    """'a,b' or ['a', 'b,c'] -> ['a', 'b', 'c'], order kept, repeats dropped."""
    items = [spec] if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        for name in str(item).split(","):
            name = name.strip()
            if name and name not in out:
                out.append(name)
    if not out:
        raise ConfigError("no tasks given: pass --tasks NAME[,NAME...] (lm-eval task or group names)")
    return out


def task_manager(include: str | os.PathLike | None, tasks: Sequence[str]):
    """An lm-eval TaskManager that knows the tasks in `include` (besides lm-eval's own); every name in
    `tasks` must be one of them (ConfigError with the closest names otherwise)."""
    _, _, TaskManager = _import_lm_eval()
    include_path = None
    if include is not None:
        include_path = str(require_dir(include, "task directory (--include)",
                                       "give the directory that holds your lm-eval task YAML files"))
    manager = None
    if include_path is not None:
        # Indexing lm-eval's own thousands of task files takes half a minute: skip it when the
        # user's directory has every task asked for.
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if not set(tasks) <= set(manager.all_tasks):
            manager = None
    if manager is None:
        manager = TaskManager(include_path=include_path)
    known = set(manager.all_tasks)
    for name in tasks:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            where = f" or in {include_path}" if include_path else " (pass --include DIR for your own task files)"
            raise ConfigError(f"unknown lm-eval task {name!r}: it is not one of lm-eval's tasks{where}.{hint}")
    return manager


def _scores(task_results: dict[str, Any]) -> tuple[dict[str, float], dict[str, float | None]]:
    """lm-eval's {"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...} -> ({acc: 0.5}, {acc: 0.1})."""
    metrics: dict[str, float] = {}
    stderr: dict[str, float | None] = {}
    for key, value in task_results.items():
        if "," not in key:
            continue  # alias, name, sample_len
        metric, filt = key.split(",", 1)
        if metric.endswith("_stderr"):
            continue
        name = metric if filt == _NO_FILTER else f"{metric},{filt}"
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metrics[name] = float(value)
        se = task_results.get(f"{metric}_stderr,{filt}")
        stderr[name] = float(se) if isinstance(se, (int, float)) and not isinstance(se, bool) else None
    return metrics, stderr


def evaluate_model(model_dir: Path, tasks: Sequence[str], manager, *, limit: int | None = None,
                   num_fewshot: int | None = None, batch_size: int = 16, device: str = "cpu",
                   max_length: int | None = None, seed: int = 0) -> dict[str, dict[str, Any]]:
    """{task: {"metrics", "stderr", "samples"}} of one model directory on `tasks` (lm-eval's simple_evaluate)."""
    lm_eval, HFLM, _ = _import_lm_eval()
    # An absolute path to a directory final_model_dir checked: lm-eval passes it to from_pretrained, which
    # could take a relative name for a Hub id; the offline() context around the evaluation forbids downloads.
    kwargs: dict[str, Any] = {"pretrained": str(Path(model_dir).resolve()), "device": device, "batch_size": batch_size}
    if max_length is not None:
        kwargs["max_length"] = max_length
    lm = HFLM(**kwargs)
    out = lm_eval.simple_evaluate(
        model=lm, tasks=list(tasks), task_manager=manager, limit=limit, num_fewshot=num_fewshot,
        log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    samples = out.get("n-samples", {})
    results: dict[str, dict[str, Any]] = {}
    for task, task_results in out["results"].items():
        metrics, stderr = _scores(task_results)
        if not metrics:
            continue  # a group without aggregate scores: its tasks are listed on their own
        n = samples.get(task, {})
        results[task] = {"metrics": metrics, "stderr": stderr,
                         "samples": int(n.get("effective", n.get("original", 0)) or 0)}
    return results


def evaluated_tasks(run_dir: str | os.PathLike) -> set[str]:
    """The tasks the run's downstream.json already holds (empty when it has none)."""
    path = Path(run_dir) / runfiles.DOWNSTREAM_FILE
    return set(runfiles.read_downstream(path)["tasks"]) if path.is_file() else set()


def evaluate_runs(run_dirs: Sequence[str | os.PathLike], tasks: str | Sequence[str], *,
                  include: str | os.PathLike | None = None, limit: int | None = None,
                  num_fewshot: int | None = None, batch_size: int = 16, device: str = "cpu",
                  max_length: int | None = None) -> dict[Path, dict]:
    """Evaluate each run's final model on `tasks`; write (merge into) RUN/downstream.json; return the docs."""
    if not run_dirs:
        raise DataError("no run directories given: pass at least one RUN_DIR written by `velocitune train`")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {limit}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {batch_size}")
    names = parse_tasks(tasks)
    finals = [final_model_dir(r) for r in run_dirs]  # every run checked before the first is evaluated
    lm_eval, _, _ = _import_lm_eval()
    # No network while lm-eval runs (the Hub client and `datasets` set offline, restored after): a task
    # whose data are not local fails instead of downloading.
    with offline():
        return _evaluate_all(finals, names, lm_eval, task_manager(include, names), include=include, limit=limit,
                             num_fewshot=num_fewshot, batch_size=batch_size, device=device, max_length=max_length)


def _evaluate_all(finals: list[Path], names: list[str], lm_eval, manager, *, include, limit, num_fewshot,
                  batch_size, device, max_length) -> dict[Path, dict]:
    settings = {"limit": limit, "num_fewshot": num_fewshot, "max_length": max_length,
                "include": None if include is None else str(Path(include).resolve())}
    docs = {}
    for i, final in enumerate(finals, 1):
        run = final.parent
        print(f"[{i}/{len(finals)}] {run}: {', '.join(names)}", flush=True)
        t0 = time.perf_counter()
        results = evaluate_model(final, names, manager, limit=limit, num_fewshot=num_fewshot,
                                 batch_size=batch_size, device=device, max_length=max_length)
        path = run / runfiles.DOWNSTREAM_FILE
        previous = runfiles.read_downstream(path)["tasks"] if path.is_file() else {}
        entries = {t: {**r, **settings, "seconds": round(time.perf_counter() - t0, 2)} for t, r in results.items()}
        doc = {"model": str(final), "lm_eval_version": getattr(lm_eval, "__version__", "unknown"),
               "tasks": {**previous, **entries}}
        runfiles.write_downstream(path, doc)
        docs[run] = doc
        for task, r in results.items():
            cells = ", ".join(f"{m} {v:.4f}" for m, v in r["metrics"].items())
            print(f"    {task} ({r['samples']} examples): {cells}", flush=True)
    return docs


# ----------------------------------------------------------------------------------------------------------
# CLI

DESCRIPTION = """\
Evaluate the final model of finished runs (RUN/final/) on lm-evaluation-harness tasks, offline, and
write RUN/downstream.json; `velocitune report` then shows the scores next to the losses.

Tasks must read local files: lm-eval's own tasks work when their data sets are already in the local
Hugging Face cache; your own task YAML files go in a directory passed with --include (docs/usage.md,
section "eval: downstream scores with lm-evaluation-harness"). The demo writes its tasks to DEMO_OUT/tasks.
"""

EPILOG = """\
example:
  velocitune eval demo_out/runs/*/seed0 --include demo_out/tasks --tasks demo_math_answer,demo_code_next_line
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `velocitune eval`."""
    parser.description = DESCRIPTION
    parser.epilog = EPILOG
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories with a final/ model")
    parser.add_argument("--tasks", required=True, action="append", metavar="NAME[,NAME...]",
                        help="lm-eval task or group names (comma-separated or repeated)")
    parser.add_argument("--include", metavar="DIR", default=None,
                        help="a directory of your own lm-eval task YAML files (read recursively)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="evaluate only the first N examples of each task (a quick look; scores are noisier)")
    parser.add_argument("--num-fewshot", type=int, default=None, metavar="K",
                        help="few-shot examples per prompt (default: the task's own setting)")
    parser.add_argument("--batch-size", type=int, default=16, metavar="N", help="sequences per forward (default 16)")
    parser.add_argument("--device", default=None,
                        help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--max-length", type=int, default=None, metavar="TOKENS",
                        help="longest context in tokens, truncated from the left (default: the model's "
                             "max_position_embeddings)")


def main(args: argparse.Namespace) -> int:
    """Run `velocitune eval`."""
    device = args.device
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    evaluate_runs(args.run_dirs, args.tasks, include=args.include, limit=args.limit, num_fewshot=args.num_fewshot,
                  batch_size=args.batch_size, device=device, max_length=args.max_length)
    return 0
