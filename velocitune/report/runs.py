"""Reading and cross-checking the run directories of one report, and the per-run numbers drawn from them.

`load_runs` reads each run directory through `velocitune.runfiles` (which owns every file's format and
checks its version and schema) and adds the checks only a report needs: the directory exists, the run
finished, its files are all there, each run is given once and all cover the same domains. `run_result`
turns a run into the numbers of the report (final losses, normalised progress, cost); `mean_sd` and
`difference` are the statistics over seeds; `group_arms` and `static_arm` group runs into arms;
`online_target_errors` and `max_rise_limit` read a run's online targets and its mixing.max_rise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from velocitune import rules, runfiles
from velocitune.errors import DataError
from velocitune.fileio import require_dir

# Normalised progress divides by l_init - l_target. Below this gap (nats) the ratio is dominated by noise
# or flips meaning (a domain predicted to stay level or get worse), so the report shows "n/a". Same value
# as the velocity floor delta_min of docs/design.md §3.
PROGRESS_MIN_GAP = 0.02

# The files every finished run directory holds (targets.json is optional).
REQUIRED_FILES = (runfiles.SUMMARY_FILE, runfiles.EVAL_FILE, runfiles.MIXTURE_FILE)
# The points of a run at which the report measures how far its online target was from the final loss.
TARGET_ERROR_FRACTIONS = (0.25, 0.5, 0.75)
# summary.json's per-domain fields and numbers, read as floats (counts included: they are divided and plotted).
_SUMMARY_PER_DOMAIN = ("init_loss", "final_val_loss", "tokens_per_domain", "targets")
_SUMMARY_NUMBERS = ("tokens", "wall_time_s", "time_eval_s", "time_update_s")


@dataclass(frozen=True)
class Run:
    """One finished run directory, read and checked against the contract."""

    path: Path
    name: str  # short label, unique within one report
    summary: dict[str, Any]
    evals: list[dict[str, Any]]  # eval.jsonl records (tokens, losses), ordered by tokens
    # mixture.jsonl records (step, tokens, sampling_weights, velocity, targets; static_prediction where the run
    # refits its targets), ordered by tokens
    mixture: list[dict[str, Any]]
    targets_file: dict[str, Any] | None  # targets.json when the run has one
    downstream: dict[str, float] | None = None  # "task metric" -> score from downstream.json (`velocitune eval`)
    mixing: dict[str, Any] = field(default_factory=dict)  # config.yaml's mixing section ({} without config.yaml)

    @property
    def arm(self) -> str:
        return str(self.summary["arm"])

    @property
    def rule(self) -> str:
        return str(self.summary["rule"])

    @property
    def adaptive(self) -> bool:
        """Do the run's weights move (`weights_move`)?"""
        return weights_move(self.rule)

    @property
    def seed(self) -> int:
        return int(self.summary["seed"])

    @property
    def domains(self) -> list[str]:
        return list(self.summary["domains"])

    @property
    def targets(self) -> dict[str, float | None] | None:
        """ℓ_target per domain (None for a domain without one), or None when the run trained without targets."""
        return self.summary.get("targets")


def weights_move(rule: str) -> bool:
    """Do a rule's weights move during a run? Those of a fixed rule (static, uniform, ...) never do: it has no
    signal and spends nothing on reweighting. The registry says (rules.is_adaptive); a rule this process has
    not registered (another program's) counts as moving."""
    return rules.is_adaptive(rule) if rule in rules.rule_names() else True


def _floats(values: dict[str, Any] | None) -> dict[str, float | None] | None:
    """A per-domain mapping with every value a float (null stays None)."""
    if values is None:
        return None
    return {d: None if v is None else float(v) for d, v in values.items()}


def _summary(run_dir: Path) -> dict[str, Any]:
    """summary.json of a finished run, its per-domain fields and times as floats."""
    summary = dict(runfiles.read_summary(run_dir / runfiles.SUMMARY_FILE))
    if summary["complete"] is not True:
        raise DataError(f"run directory {run_dir} is incomplete: {runfiles.SUMMARY_FILE} has complete="
                        f"{summary['complete']!r}; finish or resume the run with `velocitune train ... --resume`")
    if not summary["domains"]:
        raise DataError(f"{run_dir / runfiles.SUMMARY_FILE}: 'domains' is empty; a run trains at least one domain: "
                        f"re-run or resume the training that wrote it")
    for key in _SUMMARY_PER_DOMAIN:
        summary[key] = _floats(summary.get(key))
    for key in _SUMMARY_NUMBERS:
        summary[key] = float(summary[key])
    return summary


def _evals(run_dir: Path, domains: Sequence[str]) -> list[dict[str, Any]]:
    records = runfiles.read_log(run_dir / runfiles.EVAL_FILE, runfiles.EVAL, domains)
    out = [{"tokens": float(r["tokens"]), "losses": _floats(r["losses"])} for r in records]
    return sorted(out, key=lambda r: r["tokens"])


def _mixture_record(r: dict[str, Any]) -> dict[str, Any]:
    out = {"step": int(r["step"]), "tokens": float(r["tokens"]), "sampling_weights": _floats(r["sampling_weights"]),
           "velocity": _floats(r["velocity"]), "targets": _floats(r["targets"])}
    if isinstance(r.get("static_prediction"), dict):  # written at the updates of a run with online targets only
        out["static_prediction"] = _floats(r["static_prediction"])
    return out


def _mixture(run_dir: Path, domains: Sequence[str]) -> list[dict[str, Any]]:
    records = runfiles.read_log(run_dir / runfiles.MIXTURE_FILE, runfiles.MIXTURE, domains)
    return sorted((_mixture_record(r) for r in records), key=lambda r: r["tokens"])


def _mixing_config(run_dir: Path) -> dict[str, Any]:
    """config.yaml's mixing section as plain YAML, {} when the run has no config.yaml.

    Not `runfiles.read_config`: that type-checks the whole config against this release's keys, so a run of
    another velocitune release (a key added or renamed) would be refused, and the report needs two keys.
    """
    path = run_dir / runfiles.CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not valid YAML ({exc}); the run's resolved config is damaged or was edited "
                        f"by hand: copy the whole run directory, or re-run the training") from None
    mixing = doc.get("mixing") if isinstance(doc, dict) else None
    return dict(mixing) if isinstance(mixing, dict) else {}


def _not_empty(records: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    if not records:
        raise DataError(f"{path} is empty: the run did not finish writing it; re-run or resume the training")
    return records


def load_run(run_dir: Path) -> Run:
    """Read one run directory; DataError when it is missing, incomplete or a file in it is malformed."""
    run_dir = Path(run_dir)
    require_dir(run_dir, "run directory", "pass the run.out_dir that `velocitune train` wrote")
    if not (run_dir / runfiles.SUMMARY_FILE).is_file():
        raise DataError(f"run directory {run_dir} is incomplete: no {runfiles.SUMMARY_FILE} (training writes it "
                        f"when it finishes); finish or resume the run with `velocitune train ... --resume`")
    summary = _summary(run_dir)
    missing = [f for f in REQUIRED_FILES if not (run_dir / f).is_file()]
    if missing:
        raise DataError(f"run directory {run_dir} is incomplete: missing {', '.join(missing)}; "
                        f"copy the whole run directory, or re-run the training")
    domains = summary["domains"]
    evals = _not_empty(_evals(run_dir, domains), run_dir / runfiles.EVAL_FILE)
    mixture = _not_empty(_mixture(run_dir, domains), run_dir / runfiles.MIXTURE_FILE)
    targets_path = run_dir / runfiles.TARGETS_FILE
    targets_file = runfiles.read_targets(targets_path) if targets_path.is_file() else None
    return Run(path=run_dir.resolve(), name=run_dir.name, summary=summary, evals=evals, mixture=mixture,
               targets_file=targets_file, downstream=downstream_scores(run_dir), mixing=_mixing_config(run_dir))


def downstream_scores(run_dir: Path) -> dict[str, float] | None:
    """{"task metric": score} from the run's downstream.json, or None when it was not evaluated."""
    path = Path(run_dir) / runfiles.DOWNSTREAM_FILE
    if not path.is_file():
        return None
    tasks = runfiles.read_downstream(path)["tasks"]
    return {f"{task} {metric}": float(v) for task, entry in tasks.items() for metric, v in entry["metrics"].items()}


def downstream_columns(runs: Sequence[Run]) -> list[str]:
    """Every "task metric" any run has, in order of first appearance."""
    out: list[str] = []
    for run in runs:
        out += [k for k in (run.downstream or {}) if k not in out]
    return out


def _unique_names(runs: list[Run]) -> list[Run]:
    """Label runs by folder name, or by more of their path where folder names repeat."""
    for depth in (1, 2, 3):
        names = ["/".join(r.path.parts[-depth:]) for r in runs]
        if len(set(names)) == len(names):
            return [replace(r, name=n) for r, n in zip(runs, names)]
    return [replace(r, name=str(r.path)) for r in runs]


def load_runs(run_dirs: Iterable[Path]) -> list[Run]:
    """Read and cross-check the runs of one report: each given once, all over the same domains."""
    run_dirs = [Path(p) for p in run_dirs]
    if not run_dirs:
        raise DataError("no run directories given: pass at least one RUN_DIR written by `velocitune train`")
    runs = [load_run(p) for p in run_dirs]
    seen: dict[Path, Path] = {}
    for given, run in zip(run_dirs, runs):
        if run.path in seen:
            raise DataError(f"run directory {given} is given twice (also as {seen[run.path]}): "
                            f"each run may appear once, or its seed would count twice")
        seen[run.path] = given
    first = runs[0]
    for run in runs[1:]:
        if set(run.domains) != set(first.domains):
            raise DataError(
                f"runs cover different domains: {first.path} has {', '.join(first.domains)} but {run.path} has "
                f"{', '.join(run.domains)}; report runs over the same prepared data together")
    return _unique_names(runs)


def group_arms(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Runs by arm, in order of first appearance; seeds sorted within an arm."""
    arms: dict[str, list[Run]] = {}
    for run in runs:
        arms.setdefault(run.arm, []).append(run)
    return {arm: sorted(rs, key=lambda r: r.seed) for arm, rs in arms.items()}


def static_arm(arms: dict[str, list[Run]]) -> str | None:
    """The arm to compare against: the one named `static`, else the first whose runs all use the static rule."""
    if "static" in arms:
        return "static"
    return next((a for a, rs in arms.items() if all(r.rule == "static" for r in rs)), None)


def reference_targets(runs: Sequence[Run]) -> Run | None:
    """The first run with targets: they stand for runs that have none, and fill the targets table."""
    return next((r for r in runs if r.targets is not None), None)


# ----------------------------------------------------------------------------------------------------------
# Numbers


def normalised_progress(init: float, final: float, target: float | None,
                        min_gap: float = PROGRESS_MIN_GAP) -> float | None:
    """(l_init - l_T) / (l_init - l_target): 1 = target reached, 0 = no change, < 0 = worse than the base model.

    None when the domain has no target, or the gap l_init - l_target is below `min_gap` nats (undefined:
    nothing to make up).
    """
    if target is None:
        return None
    gap = init - target
    if gap < min_gap:
        return None
    return (init - final) / gap


def reweight_share(summary: dict[str, Any]) -> float | None:
    """Fraction of wall time spent choosing weights; None for rules whose weights never move.

    The trainer's `time_update_s` covers everything done to choose weights: with the `eval` signal the
    validation passes at update points (the faithful signal's cost), with either signal the all-reduce and
    the rule itself. `time_eval_s` counts only evaluations made for the loss curves, which every rule pays.
    """
    if not weights_move(summary["rule"]) or summary["wall_time_s"] <= 0:
        return None
    return summary["time_update_s"] / summary["wall_time_s"]


@dataclass(frozen=True)
class RunNumbers:
    """The per-run numbers of the report."""

    run: Run
    final_loss: dict[str, float]
    mean_loss: float  # unweighted mean over domains
    targets: dict[str, float | None] | None  # the targets progress uses: the run's own or borrowed ones
    progress: dict[str, float | None] | None  # None when no run in the report has targets
    worst_progress: float | None  # lowest defined progress
    borrowed_targets: bool  # progress uses another run's targets (this run has none)
    tokens: dict[str, float]
    wall_time_s: float
    reweight_share: float | None


def run_result(run: Run, reference: Run | None) -> RunNumbers:
    """Numbers for one run; `reference` supplies targets when the run has none of its own."""
    s = run.summary
    final = s["final_val_loss"]
    targets = run.targets if run.targets is not None else (reference.targets if reference else None)
    progress = None
    worst = None
    if targets is not None:
        progress = {d: normalised_progress(s["init_loss"][d], final[d], targets.get(d)) for d in run.domains}
        defined = [p for p in progress.values() if p is not None]
        worst = min(defined) if defined else None
    return RunNumbers(run=run, final_loss=final, mean_loss=float(np.mean(list(final.values()))), targets=targets,
                     progress=progress, worst_progress=worst,
                     borrowed_targets=run.targets is None and targets is not None,
                     tokens=s["tokens_per_domain"], wall_time_s=s["wall_time_s"], reweight_share=reweight_share(s))


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof = 1) over seeds; sd is None for one seed."""

    mean: float
    sd: float | None
    n: int


def mean_sd(values: Sequence[float]) -> Spread:
    a = np.asarray(values, dtype=np.float64)
    return Spread(float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else None, int(a.size))


@dataclass(frozen=True)
class Difference:
    """Difference of arm means and its standard error; se is None when it cannot be estimated."""

    diff: float
    se: float | None
    paired: bool


def difference(arm: Sequence[tuple[int, float]], reference: Sequence[tuple[int, float]]) -> Difference:
    """mean(arm) - mean(reference) over (seed, value) pairs, with its standard error.

    Paired by seed when both arms ran exactly the same seeds (n >= 2): se = sd(d) / sqrt(n) over the per-seed
    differences d, which removes the seed-to-seed variation the arms share. Otherwise unpaired (Welch):
    se = sqrt(s1^2/n1 + s2^2/n2), which needs at least two seeds in each arm.
    """
    a_seeds, r_seeds = [s for s, _ in arm], [s for s, _ in reference]
    a = np.array([v for _, v in arm], dtype=np.float64)
    r = np.array([v for _, v in reference], dtype=np.float64)
    diff = float(a.mean() - r.mean())
    if len(set(a_seeds)) == len(a_seeds) >= 2 and sorted(a_seeds) == sorted(r_seeds):
        by_seed = dict(reference)
        d = np.array([v - by_seed[s] for s, v in arm], dtype=np.float64)
        return Difference(diff, float(d.std(ddof=1) / math.sqrt(d.size)), paired=True)
    if a.size >= 2 and r.size >= 2:
        return Difference(diff, float(math.sqrt(a.var(ddof=1) / a.size + r.var(ddof=1) / r.size)), paired=False)
    return Difference(diff, None, paired=False)


# ----------------------------------------------------------------------------------------------------------
# Online targets and max_rise


def _update_targets(run: Run) -> list[dict[str, Any]]:
    """The mixture records written at a weight update (step > 0) that carry targets.

    Step 0's record holds the targets the run started from (the prior), not a refit: left out.
    """
    return [r for r in run.mixture if r["step"] > 0 and r["targets"] is not None]


def refits_targets(run: Run) -> bool:
    """Does the run refit its targets during training (mixing.online)? Its update records carry a static
    prediction (only the online laws write one), or its targets change between updates (fixed targets never
    do)."""
    records = _update_targets(run)
    if any("static_prediction" in r for r in records):
        return True
    return any(r["targets"] != records[0]["targets"] for r in records[1:])


def online_target_errors(run: Run, fractions: Sequence[float] = TARGET_ERROR_FRACTIONS
                         ) -> dict[str, list[float | None]]:
    """{domain: [|target − final loss| at each fraction of the run]} of a run that refits its targets.

    At fraction f the target is that of the last update record whose step is <= f · summary.steps: what the
    run aimed at by then, against where the domain ended (summary.json's final_val_loss). None where no update
    had happened yet, or the record has no target for the domain.
    """
    records = _update_targets(run)
    steps = float(run.summary["steps"])
    final = run.summary["final_val_loss"]
    out: dict[str, list[float | None]] = {d: [] for d in run.domains}
    for f in fractions:
        # records are ordered by tokens, and so by step: the last one at or before f of the run
        upto = [r for r in records if r["step"] <= f * steps]
        targets = upto[-1]["targets"] if upto else {}
        for d in run.domains:
            t = targets.get(d)
            out[d].append(None if t is None else float(abs(np.float64(t) - np.float64(final[d]))))
    return out


def max_rise_limit(run: Run) -> float | None:
    """mixing.max_rise of the run's config.yaml in nats, or None when it sets no finite bound (null, absent,
    inf: trades allowed, so nothing can be breached)."""
    value = run.mixing.get("max_rise")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    try:
        limit = float(value)  # YAML writes inf as .inf (a float); a hand-written "inf" is a string
    except ValueError:
        return None
    return limit if math.isfinite(limit) else None
