"""The run directory's files: one writer and one reader per format, each versioned and checked on read.

A run directory (docs/design.md §5, docs/contracts.md) holds `config.yaml`, three JSON-lines logs
(`metrics.jsonl`, `eval.jsonl`, `mixture.jsonl`), `init_loss.json`, `targets.json`, `summary.json` and, with
log.wandb, `wandb.json` (the W&B run that `--resume` continues).
Every stage that writes or reads one of them goes through this module, so each format has one owner: its
writer stamps the format's name and version and checks the document against its schema before it is
written (atomically); its reader checks the version and the schema, so that a truncated, hand-edited or
foreign file becomes one `DataError` naming the file, the line and what is wrong, instead of a traceback
somewhere downstream. Files written before formats carried versions (velocitune 0.1) read as version 1.

`RunLock` keeps a second process out of a run directory.
"""

from __future__ import annotations

import fcntl
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from velocitune.config import Config, dump_yaml, load_config
from velocitune.errors import CheckpointError, ConfigError, DataError
from velocitune.fileio import JsonlWriter, atomic_write_json, atomic_write_text, read_json, read_jsonl, truncate_after

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval.jsonl"
MIXTURE_FILE = "mixture.jsonl"
INIT_LOSS_FILE = "init_loss.json"
TARGETS_FILE = "targets.json"
PLAN_FILE = "plan.json"
SUMMARY_FILE = "summary.json"
DOWNSTREAM_FILE = "downstream.json"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
TENSORBOARD_DIR = "tb"
WANDB_RUN_FILE = "wandb.json"  # the W&B run id that `--resume` continues (log.wandb)
WANDB_DIR = "wandb"  # W&B's own local files (offline runs, media), unless $WANDB_DIR says elsewhere
CALLBACK_STATE_FILE = "velocitune_state.json"  # the Trainer callback's state, in each Trainer checkpoint
LOG_FILES = (METRICS_FILE, EVAL_FILE, MIXTURE_FILE)


# ----------------------------------------------------------------------------------------------- schemas


@dataclass(frozen=True)
class Field:
    """One key of a record. kind: count (int >= 0), number (finite), text, flag (bool), names (list of
    domain names), domains (mapping domain -> finite number), domain_counts (domain -> int >= 0), points
    (list of [tokens, loss] pairs), mapping (any JSON object), list, any. `optional`: the key may be absent;
    `nullable`: the value may be null; `null_values`: a domains mapping may hold null for some domains."""

    kind: str
    optional: bool = False
    nullable: bool = False
    null_values: bool = False


@dataclass(frozen=True)
class Format:
    """A file format: its name (stamped as "velocitune-<name>"), version, fields, and what fixes a bad file."""

    name: str
    version: int
    fields: Mapping[str, Field]
    fix: str


_N = Field("number")
_COUNT = Field("count")
_PER_DOMAIN = Field("domains")

METRICS = Format("metrics", 1, {
    # loss: mean over the window's trained steps, null if every step of it was skipped as non-finite;
    # grad_norm: of the window's last step, null when that step was skipped (not a number).
    "step": _COUNT, "tokens": _COUNT, "loss": Field("number", nullable=True), "lr": _N, "tok_per_s": _N,
    "tok_per_s_per_rank": _N, "grad_norm": Field("number", nullable=True), "elapsed_s": _N, "time_data_s": _N, "time_eval_s": _N, "time_update_s": _N,
    "share_data": _N, "share_eval": _N, "share_update": _N, "skipped_steps": _COUNT,
    # null for a domain with no tokens in the window: there was nothing to measure.
    "domain_loss": Field("domains", null_values=True),
    "mfu": Field("number", optional=True), "peak_flops": Field("text", optional=True),
}, "re-run or resume the training that wrote it")
EVAL = Format("eval", 1, {
    "step": _COUNT, "tokens": _COUNT, "losses": _PER_DOMAIN, "tokens_evaluated": Field("domain_counts"),
    "elapsed_s": _N,
}, "re-run or resume the training that wrote it")
MIXTURE = Format("mixture", 1, {
    "step": _COUNT, "tokens": _COUNT, "signal": Field("text"), "losses": Field("domains", nullable=True),
    "init": _PER_DOMAIN, "targets": Field("domains", nullable=True, null_values=True),
    "velocity": Field("domains", nullable=True), "weights": _PER_DOMAIN, "sampling_weights": _PER_DOMAIN,
    "tokens_per_domain": Field("domain_counts"), "guarded": Field("names"),
    "warnings": Field("list", optional=True),
}, "re-run or resume the training that wrote it")
INIT_LOSS = Format("init-loss", 1, {
    "model": Field("text"), "domains": Field("mapping"), "seconds": Field("number", optional=True),
}, "re-run `velocitune init-loss`")
TARGET_ENTRY = Format("target", 1, {
    "init": _N, "points": Field("points"), "target": _N, "predictor": Field("text"), "guarded": Field("flag"),
    "params": Field("mapping", optional=True), "r2": Field("number", optional=True, nullable=True),
    "interval": Field("list", optional=True, nullable=True), "warnings": Field("list", optional=True),
    "holdout_error": Field("number", optional=True, nullable=True),
    "fit_curve": Field("points", optional=True), "prediction_curve": Field("points", optional=True),
}, "re-run `velocitune targets`")
TARGETS = Format("targets", 1, {
    "predictor": Field("text", optional=True), "budget_tokens": Field("number", optional=True),
    "domains": Field("mapping"),
}, "re-run `velocitune targets`")
SUMMARY = Format("summary", 1, {
    "velocitune_version": Field("text"), "arm": Field("text"), "rule": Field("text"),
    "preset": Field("text", optional=True), "signal": Field("text"), "seed": _COUNT, "domains": Field("names"),
    "steps": _COUNT, "tokens": _COUNT, "init_loss": _PER_DOMAIN,
    "targets": Field("domains", nullable=True, null_values=True), "final_val_loss": _PER_DOMAIN,
    "tokens_per_domain": Field("domain_counts"), "epochs_per_domain": Field("domains", optional=True),
    "wall_time_s": _N, "time_eval_s": _N, "time_update_s": _N, "time_data_s": Field("number", optional=True),
    "time_checkpoint_s": Field("number", optional=True), "skipped_steps": Field("count", optional=True),
    "world_size": Field("count", optional=True), "estimated_overhead": Field("number", optional=True),
    "estimated_overhead_flops": Field("number", optional=True),
    "measured_overhead": Field("number", optional=True), "complete": Field("flag"),
}, "re-run or resume the training that wrote it")
PLAN = Format("plan", 1, {
    # The main run the plan is for, and the proxies' cost as a share of its steps.
    "domains": Field("names"), "budget_tokens": _N, "main_steps": _COUNT, "proxy_steps": _COUNT,
    "cost_share": _N, "base_cost_share": Field("number", optional=True), "proxy_wall_time_s": _N,
    "law": Field("text"), "stage1": Field("text"), "base": Field("text", nullable=True),
    "objective": _PER_DOMAIN, "max_rise": Field("mapping"),
    # mixtures: [{name, nominal, shares, run_dir, proxy_end, final}], the runs tried and each domain's loss
    # at the main budget (stage 1); fits: domain -> {law, candidates: {law: {params, loo_errors, max_loo_error, ...}}}.
    "mixtures": Field("list"), "fits": Field("mapping"),
    "init": _PER_DOMAIN, "recommended": _PER_DOMAIN, "predicted": _PER_DOMAIN,
    "predicted_w0": _PER_DOMAIN, "warnings": Field("list"),
}, "re-run `velocitune plan` (or `velocitune plan --collect` once its proxies have finished)")
DOWNSTREAM = Format("downstream", 1, {
    # tasks: {task: {"metrics": {name: score}, "stderr": {name: se | null}, "samples": n, "limit", "num_fewshot",
    # "max_length", "include", "seconds"}}, one entry per lm-eval task evaluated (later evaluations add to it).
    "model": Field("text"), "lm_eval_version": Field("text"), "tasks": Field("mapping"),
}, "re-run `velocitune eval` on the run (delete the file first)")
WANDB_RUN = Format("wandb-run", 1, {
    # W&B's id of the run this directory logs to; project and entity it was created in (entity null: the default).
    "run_id": Field("text"), "project": Field("text"), "entity": Field("text", nullable=True),
}, "delete it: the next start or --resume logs to a new W&B run")
CALLBACK_STATE = Format("callback-state", 1, {
    # The transformers.Trainer callback's mixing controller (MixingController.state_dict, plain JSON) and every
    # mixture record it wrote up to the checkpoint (mixture.jsonl's format), so a resume continues both.
    "controller": Field("mapping"), "records": Field("list"),
}, "delete that Trainer checkpoint, or resume from an earlier one")
FORMATS = {f.name: f for f in (METRICS, EVAL, MIXTURE, INIT_LOSS, TARGETS, SUMMARY, PLAN, DOWNSTREAM, WANDB_RUN,
                               CALLBACK_STATE)}


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _problem(value: Any, field: Field, domains: Sequence[str] | None) -> str | None:
    """What is wrong with `value` as `field`, or None."""
    if value is None:
        return None if field.nullable else "is null"
    kind = field.kind
    if kind == "number":
        return None if _is_number(value) else f"must be a finite number, got {value!r:.60}"
    if kind == "count":
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        return None if ok else f"must be a whole number >= 0, got {value!r:.60}"
    if kind == "text":
        return None if isinstance(value, str) else f"must be a string, got {value!r:.60}"
    if kind == "flag":
        return None if isinstance(value, bool) else f"must be true or false, got {value!r:.60}"
    if kind in ("mapping", "list"):
        want = dict if kind == "mapping" else list
        return None if isinstance(value, want) else f"must be a JSON {'object' if want is dict else 'list'}"
    if kind == "names":
        ok = isinstance(value, list) and all(isinstance(n, str) for n in value)
        return None if ok else f"must be a list of domain names, got {value!r:.60}"
    if kind == "points":
        ok = isinstance(value, list) and all(isinstance(p, list) and len(p) == 2 and all(map(_is_number, p))
                                             for p in value)
        return None if ok else "must be a list of [tokens, loss] number pairs"
    if kind in ("domains", "domain_counts"):
        return _domains_problem(value, field, domains)
    return None  # "any"


def _domains_problem(value: Any, field: Field, domains: Sequence[str] | None) -> str | None:
    if not isinstance(value, dict):
        return f"must map each domain to a number, got {value!r:.60}"
    if domains is not None:
        missing = [d for d in domains if d not in value]
        if missing:
            return f"has no value for domain(s) {', '.join(missing)} (the run's domains: {', '.join(domains)})"
    count = field.kind == "domain_counts"
    for name, v in value.items():
        if v is None and field.null_values:
            continue
        if count and not (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return f"[{name!r}] must be a whole number >= 0, got {v!r:.60}"
        if not count and not _is_number(v):
            return f"[{name!r}] must be a finite number, got {v!r:.60}"
    return None


def check_record(record: Any, fmt: Format, where: str, domains: Sequence[str] | None = None) -> dict:
    """`record` checked against `fmt` (version and fields); DataError naming `where` and the first problem."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}; {fmt.fix}")
    stamp = record.get("format")
    if stamp is not None and stamp != f"velocitune-{fmt.name}":
        raise DataError(f"{where}: holds a {stamp!r} document, not velocitune-{fmt.name}; {fmt.fix}")
    version = record.get("version", 1)  # files from before versioned formats are version 1
    if version != fmt.version:
        newer = isinstance(version, int) and version > fmt.version
        raise DataError(
            f"{where}: {fmt.name} format version {version!r}, but this velocitune reads version {fmt.version}"
            + ("; it was written by a newer velocitune: upgrade" if newer else f"; {fmt.fix}")
        )
    for key, field in fmt.fields.items():
        if key not in record:
            if field.optional:
                continue
            raise DataError(f"{where}: the key {key!r} is missing (the file was cut short or edited by hand); {fmt.fix}")
        problem = _problem(record[key], field, domains)
        if problem is not None:
            raise DataError(f"{where}: {key!r} {problem}; the file is damaged or was edited by hand: {fmt.fix}")
    return record


def _stamped(fmt: Format, doc: Mapping[str, Any]) -> dict:
    return {"format": f"velocitune-{fmt.name}", "version": fmt.version,
            **{k: v for k, v in doc.items() if k not in ("format", "version")}}


# ------------------------------------------------------------------------------------------- config.yaml


def write_config(path: str | os.PathLike, cfg: Config) -> None:
    """config.yaml: the fully resolved config, loadable as it is (`velocitune train RUN/config.yaml`)."""
    atomic_write_text(Path(path), dump_yaml(cfg))


def read_config(path: str | os.PathLike) -> Config:
    """A run's config.yaml, type-checked like any config; a bad file is a DataError naming it."""
    try:
        return load_config(path)
    except ConfigError as exc:
        raise DataError(f"{path}: {exc} (the run's resolved config is damaged or was edited by hand)") from None


# --------------------------------------------------------------------------------------------- JSON files


def _read_doc(path: Path, fmt: Format, what: str) -> dict:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{what} '{path}' is a directory; point at the JSON file")
    if not path.is_file():
        raise DataError(f"{what} '{path}' does not exist; {fmt.fix}")
    return check_record(read_json(path), fmt, str(path))


def write_init_loss(path: str | os.PathLike, model: str, names: Sequence[str], losses: Sequence[float],
                    tokens: Sequence[int], seconds: float | None = None) -> None:
    """init_loss.json: the base model's per-domain validation loss (ℓ_init) and the tokens it was measured on."""
    doc: dict[str, Any] = {"model": model, "domains": {
        n: {"loss": float(l), "tokens": int(t)} for n, l, t in zip(names, losses, tokens)}}
    if seconds is not None:
        doc["seconds"] = float(seconds)
    doc = _stamped(INIT_LOSS, doc)
    _check_init_entries(doc, str(path), names)
    atomic_write_json(Path(path), doc)


def _check_init_entries(doc: dict, where: str, names: Sequence[str] | None) -> dict[str, float]:
    entries = doc["domains"]
    wanted = names if names is not None else list(entries)
    missing = [n for n in wanted if n not in entries]
    if missing:
        raise DataError(f"{where} has no initial loss for domain(s) {missing}; {INIT_LOSS.fix}")
    out = {}
    for n in wanted:
        e = entries[n]
        if not isinstance(e, dict) or not _is_number(e.get("loss")) or e["loss"] < 0:
            raise DataError(f"{where}: domains[{n!r}] must hold a finite 'loss' >= 0, got {e!r:.80}; {INIT_LOSS.fix}")
        out[n] = float(e["loss"])
    return out


def read_init_loss(path: str | os.PathLike, names: Sequence[str] | None = None) -> dict[str, float]:
    """{domain: ℓ_init} from init_loss.json (for `names` when given: each must be present)."""
    doc = _read_doc(Path(path), INIT_LOSS, "initial-loss file")
    return _check_init_entries(doc, str(path), names)


def write_targets(path: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    """targets.json: the proxy recipe and, per domain, the fit, its checks and the target."""
    doc = _stamped(TARGETS, doc)
    _check_target_entries(doc, str(path))
    atomic_write_json(Path(path), doc)


def _check_target_entries(doc: dict, where: str) -> None:
    for name, entry in doc["domains"].items():
        check_record(entry, TARGET_ENTRY, f"{where}: domains[{name!r}]")


def read_targets(path: str | os.PathLike) -> dict:
    """The whole targets.json document, every domain's entry checked."""
    doc = _read_doc(Path(path), TARGETS, "targets file")
    _check_target_entries(doc, str(path))
    return doc


def target_values(doc: Mapping[str, Any]) -> dict[str, float]:
    """{domain: ℓ_target} of a targets.json document."""
    return {n: float(d["target"]) for n, d in doc["domains"].items()}


def write_plan(path: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    """plan.json: the proxies, the per-domain mixture-law fits and the recommended mixture with its losses."""
    doc = _stamped(PLAN, doc)
    check_record(doc, PLAN, str(path), doc.get("domains"))
    atomic_write_json(Path(path), doc)


def read_plan(path: str | os.PathLike, names: Sequence[str] | None = None) -> dict:
    """plan.json checked against its schema; with `names`, it must be a plan for exactly those domains."""
    path = Path(path)
    raw = _read_doc(path, PLAN, "plan file")
    planned = raw.get("domains")
    doc = check_record(raw, PLAN, str(path), planned if isinstance(planned, list) else None)
    shares = doc["recommended"].values()
    if min(shares) < 0 or abs(sum(shares) - 1.0) > 1e-6:
        raise DataError(f"{path}: the recommended shares must be >= 0 and sum to 1, they sum to {sum(shares):.6g} "
                        f"(smallest {min(shares):.6g}); {PLAN.fix}")
    if names is not None and sorted(planned) != sorted(names):
        raise DataError(
            f"{path} is a plan for the domains {planned}, but the prepared data has {list(names)}; run "
            f"`velocitune plan` on this data"
        )
    return doc


def write_wandb_run(path: str | os.PathLike, run_id: str, project: str, entity: str | None) -> None:
    """wandb.json: the W&B run this run directory logs to, written when the run starts so `--resume` continues it."""
    doc = _stamped(WANDB_RUN, {"run_id": run_id, "project": project, "entity": entity})
    check_record(doc, WANDB_RUN, str(path))
    atomic_write_json(Path(path), doc)


def read_wandb_run(path: str | os.PathLike) -> dict:
    """wandb.json checked against its schema: {run_id, project, entity}."""
    return _read_doc(Path(path), WANDB_RUN, "W&B run file")


def write_summary(path: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    """summary.json: what a finished run did, written last (its `complete` flag marks a finished run)."""
    doc = _stamped(SUMMARY, doc)
    check_record(doc, SUMMARY, str(path), doc.get("domains"))
    atomic_write_json(Path(path), doc)


def read_summary(path: str | os.PathLike) -> dict:
    """summary.json checked against its schema (per-domain fields over its own `domains`)."""
    path = Path(path)
    raw = _read_doc(path, SUMMARY, "run summary")
    domains = raw.get("domains")
    return check_record(raw, SUMMARY, str(path), domains if isinstance(domains, list) else None)


def write_downstream(path: str | os.PathLike, doc: Mapping[str, Any]) -> None:
    """downstream.json: the final model's lm-eval scores, one entry per task."""
    doc = _stamped(DOWNSTREAM, doc)
    _check_downstream_tasks(doc, str(path))
    atomic_write_json(Path(path), doc)


def _check_downstream_tasks(doc: dict, where: str) -> dict:
    check_record(doc, DOWNSTREAM, where)
    for task, entry in doc["tasks"].items():
        metrics = entry.get("metrics") if isinstance(entry, dict) else None
        if not isinstance(metrics, dict) or not metrics or not all(map(_is_number, metrics.values())):
            raise DataError(f"{where}: task {task!r} must hold a non-empty 'metrics' mapping of finite numbers; "
                            f"the file is damaged or was edited by hand: {DOWNSTREAM.fix}")
    return doc


def read_downstream(path: str | os.PathLike) -> dict:
    """downstream.json checked against its schema: every task has finite scores."""
    path = Path(path)
    return _check_downstream_tasks(_read_doc(path, DOWNSTREAM, "downstream scores"), str(path))


def write_callback_state(path: str | os.PathLike, controller: Mapping[str, Any], records: Sequence[Mapping]) -> None:
    """velocitune_state.json of a Trainer checkpoint: the callback's controller state and its mixture records."""
    doc = _stamped(CALLBACK_STATE, {"controller": dict(controller), "records": [dict(r) for r in records]})
    check_record(doc, CALLBACK_STATE, str(path))
    atomic_write_json(Path(path), doc)


def read_callback_state(path: str | os.PathLike) -> dict:
    """The Trainer callback's state: {controller, records}, checked.

    A file of velocitune 0.1 (unstamped: the controller's keys and `history` at the top level) is read too,
    as the same document: its controller state is what `MixingController.load_state_dict` still accepts.
    """
    path = Path(path)
    if not path.is_file():
        return _read_doc(path, CALLBACK_STATE, "Trainer callback state")  # says what is wrong with the path
    raw = read_json(path, fix=CALLBACK_STATE.fix)
    if isinstance(raw, dict) and "format" not in raw and "rule" in raw and "history" in raw:
        raw = _stamped(CALLBACK_STATE, {"controller": {k: v for k, v in raw.items() if k != "history"},
                                        "records": raw["history"]})
    return check_record(raw, CALLBACK_STATE, str(path))


def run_is_complete(run_dir: str | os.PathLike) -> bool:
    """True when the run directory holds the summary of a finished run (any damage reads as unfinished)."""
    try:
        return read_summary(Path(run_dir) / SUMMARY_FILE)["complete"] is True
    except DataError:
        return False


# -------------------------------------------------------------------------------------- JSON-lines logs


class RunLog(JsonlWriter):
    """A run's JSON-lines log of one format: every record stamped with the format's version and checked."""

    def __init__(self, path: str | os.PathLike, fmt: Format, domains: Sequence[str]):
        super().__init__(path)
        self.fmt, self.domains = fmt, list(domains)

    def write(self, record: Mapping[str, Any]) -> None:
        record = {"version": self.fmt.version, **record}
        check_record(record, self.fmt, f"{self.path} (record being written)", self.domains)
        super().write(record)


def read_log(path: str | os.PathLike, fmt: Format, domains: Sequence[str] | None = None) -> list[dict]:
    """Every record of a run log, each checked; a crash-torn last line is dropped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; {fmt.fix}")
    records = read_jsonl(path)
    # Line numbers count the non-blank lines, which is what read_jsonl returns (blank lines are rare).
    return [check_record(r, fmt, f"{path}, record {i}", domains) for i, r in enumerate(records, start=1)]


def truncate_logs(run_dir: str | os.PathLike, step: int) -> None:
    """On resume from a checkpoint at `step`: drop every log record of a later step (byte-exact copy of the rest)."""
    for name in LOG_FILES:
        truncate_after(Path(run_dir) / name, step)


def remove_logs(run_dir: str | os.PathLike) -> None:
    """Start a run over: its logs go (a `--resume` that found no checkpoint)."""
    for name in LOG_FILES:
        (Path(run_dir) / name).unlink(missing_ok=True)


def per_domain(names: Sequence[str], values: Any) -> dict[str, Any] | None:
    """{name: float} of a (k,) vector for a record; None stays None and NaN becomes null (not a measurement)."""
    if values is None:
        return None
    return {n: (None if not math.isfinite(v) else v) for n, v in zip(names, np.asarray(values, dtype=np.float64).tolist())}


# ------------------------------------------------------------------------------------------------ the lock


class RunLock:
    """Lock a run directory against a second concurrent velocitune process.

    `fcntl.flock` on `run_dir/.lock`, non-blocking; the kernel drops the lock when the holder's file is
    closed or the process dies, so a crash never leaves a stale lock. The holder's pid is written into
    the file for the error message. Child processes forked while the lock is held share it.
    """

    def __init__(self, run_dir: str | os.PathLike):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is already held by this RunLock")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise CheckpointError(
                f"another velocitune process (pid {holder}) is using {self.run_dir}: wait for it to finish, "
                "stop it, or use a different run directory"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            # The file stays: deleting it would let a waiter lock an unlinked inode while a third
            # process creates and locks a new one.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
