"""Compare finished run directories in one report: markdown tables of per-domain results and cost, and PNG plots.

`make_report` reads run directories (docs/contracts.md, "Run directory"), checks that each is complete, was
written by this velocitune version and covers the same domains, and writes `report.md` with
`weights.png`, `val_loss.png`, `velocity.png` and `targets.png` beside it. `velocitune report` is its CLI.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

import velocitune
from velocitune.errors import DataError

# Normalised progress divides by l_init - l_target. Below this gap (nats) the ratio is dominated by noise
# or flips meaning (a domain predicted to stay level or get worse), so the report shows "n/a". Same value
# as the velocity floor delta_min of DESIGN §3.
PROGRESS_MIN_GAP = 0.02

# Rules whose weights never move: they spend nothing on reweighting.
FIXED_RULES = frozenset({"static", "uniform", "temperature", "replay"})

REQUIRED_FILES = ("summary.json", "eval.jsonl", "mixture.jsonl")
SUMMARY_KEYS = (
    "velocitune_version", "complete", "arm", "rule", "signal", "seed", "domains", "steps", "tokens",
    "init_loss", "final_val_loss", "tokens_per_domain", "wall_time_s", "time_eval_s", "time_update_s",
)
PLOT_FILES = ("weights.png", "val_loss.png", "velocity.png", "targets.png")
PLOT_DPI = 110
TITLE_SIZE = 10
MAX_PANELS_PER_ROW = 4
GUARD_MARK = "†"
BORROWED_MARK = "‡"


# ----------------------------------------------------------------------------------------------------------
# Reading and checking run directories


@dataclass(frozen=True)
class Run:
    """One finished run directory, read and checked against the contract."""

    path: Path
    name: str  # short label, unique within one report
    summary: dict[str, Any]
    evals: list[dict[str, Any]]  # eval.jsonl records, ordered by tokens
    mixture: list[dict[str, Any]]  # mixture.jsonl records, ordered by tokens
    targets_file: dict[str, Any] | None  # targets.json when the run has one

    @property
    def arm(self) -> str:
        return str(self.summary["arm"])

    @property
    def rule(self) -> str:
        return str(self.summary["rule"])

    @property
    def seed(self) -> int:
        return int(self.summary["seed"])

    @property
    def domains(self) -> list[str]:
        return list(self.summary["domains"])

    @property
    def targets(self) -> dict[str, float] | None:
        return self.summary.get("targets")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DataError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}); the file is damaged: "
                        f"re-run the step that wrote it") from None


def _read_jsonl(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line of a JSON-lines file."""
    records = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}, line {lineno}: not valid JSON ({e.msg}); the file is damaged: "
                                f"re-run the training or delete that line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path}, line {lineno}: expected a JSON object, got {type(record).__name__}")
            records.append((lineno, record))
    if not records:
        raise DataError(f"{path} is empty: the run did not finish writing it; re-run or resume the training")
    return records


def _major_minor(version: str) -> tuple[int, int] | None:
    m = re.match(r"^\s*(\d+)\.(\d+)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def _check_version(summary: dict[str, Any], run_dir: Path) -> None:
    ours = velocitune.__version__
    theirs = summary.get("velocitune_version")
    if theirs is None:
        raise DataError(f"{run_dir / 'summary.json'} has no 'velocitune_version': the run was written by another "
                        f"version than this one ({ours}); report it with the version that trained it")
    if _major_minor(str(theirs)) != _major_minor(ours):
        raise DataError(f"run directory {run_dir} was written by velocitune {theirs}, but this is velocitune {ours} "
                        f"(major.minor must match); report it with velocitune {theirs} or re-run it")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where} must be a finite number, got {value!r}")
    return float(value)


def _per_domain(mapping: Any, domains: Sequence[str], where: str) -> dict[str, float]:
    """{domain: float} from a record field, naming the missing domain when there is one."""
    if not isinstance(mapping, dict):
        raise DataError(f"{where} must be a mapping from domain to number, got {mapping!r}")
    missing = [d for d in domains if d not in mapping]
    if missing:
        raise DataError(f"{where} has no value for domain(s) {', '.join(missing)} (domains: {', '.join(domains)})")
    return {d: _number(mapping[d], f"{where}[{d!r}]") for d in domains}


def _check_summary(summary: Any, path: Path) -> dict[str, Any]:
    """The summary with its per-domain fields as {domain: float}; DataError naming the first bad key."""
    if not isinstance(summary, dict):
        raise DataError(f"{path} must hold a JSON object")
    missing = [k for k in SUMMARY_KEYS if k not in summary]
    if missing:
        raise DataError(f"{path} lacks key(s) {', '.join(missing)}: it was not written by a finished "
                        f"`velocitune train`; re-run or resume that run")
    domains = summary["domains"]
    if not isinstance(domains, list) or not domains or not all(isinstance(d, str) for d in domains):
        raise DataError(f"{path}: 'domains' must be a non-empty list of domain names, got {domains!r}")
    out = dict(summary)
    for key in ("init_loss", "final_val_loss", "tokens_per_domain"):
        out[key] = _per_domain(summary[key], domains, f"{path}: '{key}'")
    if summary.get("targets") is not None:
        out["targets"] = _per_domain(summary["targets"], domains, f"{path}: 'targets'")
    for key in ("tokens", "wall_time_s", "time_eval_s", "time_update_s"):
        out[key] = _number(summary[key], f"{path}: '{key}'")
    return out


def _check_evals(records: list[tuple[int, dict]], domains: Sequence[str], path: Path) -> list[dict[str, Any]]:
    out = []
    for lineno, r in records:
        where = f"{path}, line {lineno}"
        out.append({"tokens": _number(r.get("tokens"), f"{where}: 'tokens'"),
                    "losses": _per_domain(r.get("losses"), domains, f"{where}: 'losses'")})
    return sorted(out, key=lambda r: r["tokens"])


def _check_mixture(records: list[tuple[int, dict]], domains: Sequence[str], path: Path) -> list[dict[str, Any]]:
    out = []
    for lineno, r in records:
        where = f"{path}, line {lineno}"
        velocity = r.get("velocity")
        out.append({
            "tokens": _number(r.get("tokens"), f"{where}: 'tokens'"),
            "sampling_weights": _per_domain(r.get("sampling_weights"), domains, f"{where}: 'sampling_weights'"),
            "velocity": None if velocity is None else _per_domain(velocity, domains, f"{where}: 'velocity'"),
        })
    return sorted(out, key=lambda r: r["tokens"])


def _check_targets_file(data: Any, path: Path) -> dict[str, Any]:
    """targets.json with the fields the target-fit plot reads checked: points, params, target, budget."""
    if not isinstance(data, dict) or not isinstance(data.get("domains"), dict):
        raise DataError(f"{path} must hold an object with a 'domains' mapping (see `velocitune targets`)")
    if data.get("budget_tokens") is not None:
        _number(data["budget_tokens"], f"{path}: 'budget_tokens'")
    for name, fit in data["domains"].items():
        where = f"{path}: domains[{name!r}]"
        if not isinstance(fit, dict):
            raise DataError(f"{where} must be an object")
        points = fit.get("points", [])
        if not isinstance(points, list) or not all(isinstance(p, list) and len(p) == 2 for p in points):
            raise DataError(f"{where}: 'points' must be a list of [tokens, loss] pairs")
        for i, (tokens, loss) in enumerate(points):
            _number(tokens, f"{where}: points[{i}] tokens")
            _number(loss, f"{where}: points[{i}] loss")
        if fit.get("target") is not None:
            _number(fit["target"], f"{where}: 'target'")
        params = fit.get("params")
        if params is not None and not isinstance(params, dict):
            raise DataError(f"{where}: 'params' must be an object")
    return data


def load_run(run_dir: Path) -> Run:
    """Read one run directory; DataError when it is missing, incomplete, from another version or malformed."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise DataError(f"run directory {run_dir} does not exist: pass the run.out_dir that `velocitune train` wrote")
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise DataError(f"run directory {run_dir} is incomplete: no summary.json (training writes it when it "
                        f"finishes); finish or resume the run with `velocitune train ... --resume`")
    raw = _read_json(summary_path)
    if not isinstance(raw, dict):
        raise DataError(f"{summary_path} must hold a JSON object")
    _check_version(raw, run_dir)
    if raw.get("complete") is not True:
        raise DataError(f"run directory {run_dir} is incomplete: summary.json has complete={raw.get('complete')!r}; "
                        f"finish or resume the run with `velocitune train ... --resume`")
    missing = [f for f in REQUIRED_FILES if not (run_dir / f).is_file()]
    if missing:
        raise DataError(f"run directory {run_dir} is incomplete: missing {', '.join(missing)}; "
                        f"copy the whole run directory, or re-run the training")
    summary = _check_summary(raw, summary_path)
    domains = summary["domains"]
    evals = _check_evals(_read_jsonl(run_dir / "eval.jsonl"), domains, run_dir / "eval.jsonl")
    mixture = _check_mixture(_read_jsonl(run_dir / "mixture.jsonl"), domains, run_dir / "mixture.jsonl")
    targets_path = run_dir / "targets.json"
    targets_file = _check_targets_file(_read_json(targets_path), targets_path) if targets_path.is_file() else None
    return Run(path=run_dir.resolve(), name=run_dir.name, summary=summary, evals=evals, mixture=mixture,
               targets_file=targets_file)


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


# ----------------------------------------------------------------------------------------------------------
# Numbers


def normalised_progress(init: float, final: float, target: float,
                        min_gap: float = PROGRESS_MIN_GAP) -> float | None:
    """(l_init - l_T) / (l_init - l_target): 1 = target reached, 0 = no change, < 0 = worse than the base model.

    None when the gap l_init - l_target is below `min_gap` nats (undefined: nothing to make up).
    """
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
    if summary["rule"] in FIXED_RULES or summary["wall_time_s"] <= 0:
        return None
    return summary["time_update_s"] / summary["wall_time_s"]


@dataclass(frozen=True)
class RunResult:
    """The per-run numbers of the report."""

    run: Run
    final_loss: dict[str, float]
    mean_loss: float  # unweighted mean over domains
    progress: dict[str, float | None] | None  # None when no run in the report has targets
    worst_progress: float | None  # lowest defined progress
    borrowed_targets: bool  # progress uses another run's targets (this run has none)
    tokens: dict[str, float]
    wall_time_s: float
    reweight_share: float | None


def _reference_targets(runs: Sequence[Run]) -> Run | None:
    """The first run with targets: they stand for runs that have none, and fill the targets table."""
    return next((r for r in runs if r.targets is not None), None)


def run_result(run: Run, reference: Run | None) -> RunResult:
    """Numbers for one run; `reference` supplies targets when the run has none of its own."""
    s = run.summary
    final = s["final_val_loss"]
    targets = run.targets if run.targets is not None else (reference.targets if reference else None)
    progress = None
    worst = None
    if targets is not None:
        progress = {d: normalised_progress(s["init_loss"][d], final[d], targets[d]) for d in run.domains}
        defined = [p for p in progress.values() if p is not None]
        worst = min(defined) if defined else None
    return RunResult(run=run, final_loss=final, mean_loss=float(np.mean(list(final.values()))),
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


# ----------------------------------------------------------------------------------------------------------
# Markdown


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_cols: Sequence[int]) -> str:
    """A markdown table: the columns at `text_cols` left-aligned, the others (numbers) right-aligned."""
    align = [":--" if i in text_cols else "--:" for i in range(len(header))]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _hms(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _share(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _progress_cell(p: float | None, borrowed: bool) -> str:
    if p is None:
        return "n/a" + GUARD_MARK
    return f"{p:.3f}" + (BORROWED_MARK if borrowed else "")


def _spread_cell(s: Spread, fmt: str) -> str:
    return f"{s.mean:{fmt}} ± {s.sd:{fmt}}" if s.sd is not None else f"{s.mean:{fmt}} (n=1)"


def _difference_cell(d: Difference, fmt: str) -> str:
    if d.se is None:
        return f"{d.diff:+{fmt}} (no spread)"
    return f"{d.diff:+{fmt}} ± {d.se:{fmt}} ({'paired' if d.paired else 'unpaired'})"


def run_table(results: Sequence[RunResult], domains: Sequence[str]) -> str:
    """One row per run: final losses, their mean, normalised progress, tokens, wall time, reweighting share."""
    has_progress = any(r.progress is not None for r in results)
    header = ["run", "arm", "seed", *[f"loss {d}" for d in domains], "mean loss"]
    if has_progress:
        header += [*[f"progress {d}" for d in domains], "worst progress"]
    header += [*[f"tokens {d} (M)" for d in domains], "wall time", "reweighting"]
    rows = []
    for r in results:
        row = [r.run.name, r.run.arm, str(r.run.seed), *[f"{r.final_loss[d]:.4f}" for d in domains],
               f"{r.mean_loss:.4f}"]
        if has_progress:
            if r.progress is None:
                row += ["—"] * (len(domains) + 1)
            else:
                row += [_progress_cell(r.progress[d], r.borrowed_targets) for d in domains]
                row += [_progress_cell(r.worst_progress, r.borrowed_targets)]
        row += [f"{r.tokens[d] / 1e6:.3f}" for d in domains]
        row += [_hms(r.wall_time_s), _share(r.reweight_share)]
        rows.append(row)
    return _table(header, rows, text_cols=(0, 1, 2))


def _arm_values(results: Sequence[RunResult], get) -> list[tuple[int, float]] | None:
    """(seed, value) for each run of an arm, or None when any run lacks the value."""
    values = [(r.run.seed, get(r)) for r in results]
    return None if any(v is None for _, v in values) else values


def arm_table(by_arm: dict[str, list[RunResult]], domains: Sequence[str], reference_arm: str | None) -> str:
    """One row per arm: mean ± sample sd over seeds, and the difference to the reference (static) arm."""
    has_progress = any(r.progress is not None for rs in by_arm.values() for r in rs)
    header = ["arm", "seeds", *[f"loss {d}" for d in domains], "mean loss"]
    if reference_arm is not None:
        header.append(f"Δ mean loss vs {reference_arm}")
    if has_progress:
        header.append("worst progress")
        if reference_arm is not None:
            header.append(f"Δ worst progress vs {reference_arm}")
    header += ["wall time", "reweighting"]

    def stat(results, get, fmt):
        values = _arm_values(results, get)
        return "n/a" if values is None else _spread_cell(mean_sd([v for _, v in values]), fmt)

    def delta(arm, get, fmt):
        if arm == reference_arm:
            return "—"
        values, ref = _arm_values(by_arm[arm], get), _arm_values(by_arm[reference_arm], get)
        return "n/a" if values is None or ref is None else _difference_cell(difference(values, ref), fmt)

    rows = []
    for arm, results in by_arm.items():
        row = [arm, ", ".join(str(r.run.seed) for r in results)]
        row += [stat(results, lambda r, d=d: r.final_loss[d], ".4f") for d in domains]
        row.append(stat(results, lambda r: r.mean_loss, ".4f"))
        if reference_arm is not None:
            row.append(delta(arm, lambda r: r.mean_loss, ".4f"))
        if has_progress:
            row.append(stat(results, lambda r: r.worst_progress, ".3f"))
            if reference_arm is not None:
                row.append(delta(arm, lambda r: r.worst_progress, ".3f"))
        shares = [r.reweight_share for r in results]
        row += [_hms(float(np.mean([r.wall_time_s for r in results]))),
                "—" if any(s is None for s in shares) else _share(float(np.mean(shares)))]
        rows.append(row)
    return _table(header, rows, text_cols=(0, 1))


def targets_table(runs: Sequence[Run], domains: Sequence[str]) -> tuple[str, list[str]]:
    """Per-domain l_init and l_target of the reference run, and notes on runs whose values differ."""
    ref = _reference_targets(runs) or runs[0]
    s = ref.summary
    fits = ref.targets_file.get("domains", {}) if isinstance(ref.targets_file, dict) else {}
    header = ["domain", "ℓ_init (nats)"]
    if ref.targets is not None:
        header += ["ℓ_target (nats)", "gap (nats)", "predictor", "R²", "note"]
    rows = []
    for d in domains:
        row = [d, f"{s['init_loss'][d]:.4f}"]
        if ref.targets is not None:
            gap = s["init_loss"][d] - ref.targets[d]
            fit = fits.get(d, {}) if isinstance(fits.get(d), dict) else {}
            r2 = fit.get("r2")
            notes = []
            if gap < PROGRESS_MIN_GAP:
                notes.append(f"gap < {PROGRESS_MIN_GAP} nats: progress n/a")
            if fit.get("guarded"):
                notes.append("guarded during training")
            row += [f"{ref.targets[d]:.4f}", f"{gap:+.4f}", str(fit.get("predictor", "—")),
                    f"{r2:.3f}" if isinstance(r2, (int, float)) else "—", "; ".join(notes) or ""]
        rows.append(row)
    notes = []
    for run in runs:
        differs = any(abs(run.summary["init_loss"][d] - s["init_loss"][d]) > 1e-6 for d in domains)
        if run.targets is not None and ref.targets is not None:
            differs |= any(abs(run.targets[d] - ref.targets[d]) > 1e-6 for d in domains)
        if differs:
            notes.append(f"`{run.name}` has different ℓ_init or targets; its progress uses its own values.")
    return _table(header, rows, text_cols=(0, 4, 6)), [f"Values of `{ref.name}`."] + notes


# ----------------------------------------------------------------------------------------------------------
# Plots (matplotlib Figure objects on the Agg canvas: no pyplot, no global backend switch)


def domain_colours(domains: Sequence[str]) -> dict[str, Any]:
    """One fixed colour per domain, in domain order, shared by every plot."""
    import matplotlib

    k = len(domains)
    if k <= 10:
        cols = matplotlib.colormaps["tab10"].colors[:k]
    elif k <= 20:
        cols = matplotlib.colormaps["tab20"].colors[:k]
    else:
        cols = [matplotlib.colormaps["hsv"](i / k) for i in range(k)]
    return dict(zip(domains, cols))


def arm_colours(arms: Sequence[str], reference_arm: str | None) -> dict[str, Any]:
    """The reference (static) arm in near-black, the others from a palette distinct from the domain colours."""
    import matplotlib

    palette = matplotlib.colormaps["Dark2"].colors
    others = [a for a in arms if a != reference_arm]
    colours = {a: palette[i % len(palette)] for i, a in enumerate(others)}
    if reference_arm is not None:
        colours[reference_arm] = "0.15"
    return colours


def _panels(n: int, panel_w: float = 3.8, panel_h: float = 2.9, legend_w: float = 1.8):
    """A constrained-layout figure with n panels, at most MAX_PANELS_PER_ROW per row; room for a legend."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter

    ncols = min(MAX_PANELS_PER_ROW, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel_w * ncols + legend_w, panel_h * nrows + 0.4), dpi=PLOT_DPI, layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        fig.delaxes(ax)
    for ax in axes[:n]:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # tokens: 200k, 1.5M, 2G
        ax.grid(alpha=0.3, linewidth=0.6)
    return fig, axes[:n]


def _short(text: str, limit: int = 34) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _legend(fig, axes, title: str | None = None) -> None:
    """One legend for the figure, outside the panels on the right, from the labels of every panel."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside right upper", title=title, fontsize=9, title_fontsize=9)


def _panel_runs(arms: dict[str, list[Run]]) -> list[tuple[str, Run]]:
    """(title, run) of the runs drawn one panel each: each arm's first seed (every run when seeds are single).

    Titled by arm, not by folder name: arms are short and unique, folder names are often long.
    """
    return [(f"{arm} (seed {rs[0].seed})", rs[0]) for arm, rs in arms.items()]


def _weight_steps(run: Run, domains: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token positions (n+1,) and sampling weights (n+1, k) of a step function held to the run's last token."""
    x = [r["tokens"] for r in run.mixture] + [max(run.summary["tokens"], run.mixture[-1]["tokens"])]
    w = [[r["sampling_weights"][d] for d in domains] for r in run.mixture]
    w.append(w[-1])
    return np.asarray(x, dtype=np.float64), np.asarray(w, dtype=np.float64)


def plot_weights(panels: Sequence[tuple[str, Run]], domains: Sequence[str], colours: dict, path: Path) -> None:
    """Stacked areas of the sampling weights vs tokens trained, one panel per run."""
    fig, axes = _panels(len(panels))
    for ax, (title, run) in zip(axes, panels):
        x, w = _weight_steps(run, domains)
        lower = np.zeros_like(x)
        for j, d in enumerate(domains):
            upper = lower + w[:, j]
            ax.fill_between(x, lower, upper, step="post", color=colours[d], linewidth=0, label=d)
            lower = upper
        ax.set_title(_short(title), fontsize=TITLE_SIZE)
        ax.set(xlim=(x[0], x[-1]), ylim=(0, max(1.0, float(lower.max()))),
               xlabel="tokens trained", ylabel="sampling weight (share)")
    _legend(fig, axes, "domain")
    fig.savefig(path, dpi=PLOT_DPI)


def _arm_curve(runs: Sequence[Run], domain: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(tokens, mean loss, sd or None) for an arm: one mean curve when seeds share eval points, else one per seed."""
    xs = [np.array([e["tokens"] for e in r.evals]) for r in runs]
    ys = [np.array([e["losses"][domain] for e in r.evals]) for r in runs]
    if len(runs) > 1 and all(x.shape == xs[0].shape and np.array_equal(x, xs[0]) for x in xs):
        stack = np.stack(ys)  # (seeds, eval points)
        return [(xs[0], stack.mean(axis=0), stack.std(axis=0, ddof=1))]
    return [(x, y, None) for x, y in zip(xs, ys)]


def plot_val_loss(arms: dict[str, list[Run]], domains: Sequence[str], targets: dict[str, float] | None,
                  colours: dict, path: Path) -> None:
    """Validation loss vs tokens, one panel per domain, one line per arm (mean ± sd band over seeds)."""
    fig, axes = _panels(len(domains))
    for ax, d in zip(axes, domains):
        for arm, runs in arms.items():
            curves = _arm_curve(runs, d)
            label = arm if len(runs) == 1 else (
                f"{arm} (mean ± sd, {len(runs)} seeds)" if len(curves) == 1 else f"{arm} ({len(runs)} seeds)")
            for i, (x, y, sd) in enumerate(curves):
                ax.plot(x, y, color=colours[arm], linewidth=1.4, label=label if i == 0 else None)
                if sd is not None:
                    ax.fill_between(x, y - sd, y + sd, color=colours[arm], alpha=0.2, linewidth=0)
        if targets is not None:
            ax.axhline(targets[d], color="0.4", linestyle="--", linewidth=1.0, label="target ℓ_target")
        ax.set_title(_short(d), fontsize=TITLE_SIZE)
        ax.set(xlabel="tokens trained", ylabel="validation loss (nats)")
    _legend(fig, axes, "arm")
    fig.savefig(path, dpi=PLOT_DPI)


def plot_velocity(panels: Sequence[tuple[str, Run]], domains: Sequence[str], colours: dict, path: Path) -> None:
    """Learning velocity V per domain at each weight update vs tokens, one panel per run."""
    fig, axes = _panels(len(panels))
    for ax, (title, run) in zip(axes, panels):
        recs = [r for r in run.mixture if r["velocity"] is not None]
        x = [r["tokens"] for r in recs]
        for d in domains:
            ax.plot(x, [r["velocity"][d] for r in recs], color=colours[d], marker="o", markersize=3,
                    linewidth=1.2, label=d)
        ax.set_title(_short(title), fontsize=TITLE_SIZE)
        ax.set(ylim=(-0.03, 1.03), xlabel="tokens trained",
               ylabel="velocity V (1 = no progress)")
    _legend(fig, axes, "domain")
    fig.savefig(path, dpi=PLOT_DPI)


def _fit_curve(fit: dict[str, Any], lo: float, hi: float) -> tuple[np.ndarray, np.ndarray] | None:
    """L(D) = E + B / D^beta on a log grid over [lo, hi], when the fit is a Chinchilla data law."""
    params = fit.get("params") or {}
    numeric = all(isinstance(params.get(k), (int, float)) for k in ("E", "B", "beta"))
    if fit.get("predictor", "chinchilla") != "chinchilla" or not numeric:
        return None
    x = np.geomspace(lo, hi, 200)
    return x, params["E"] + params["B"] / x ** params["beta"]


def plot_targets(targets_file: dict[str, Any], domains: Sequence[str], static_runs: Sequence[Run],
                 colours: dict, static_colour: Any, path: Path) -> None:
    """Per-domain target fits: proxy points, fitted law up to the budget (log x), predicted and actual loss."""
    from matplotlib.lines import Line2D

    fits = targets_file.get("domains", {})
    budget = float(targets_file.get("budget_tokens") or 0.0)
    fig, axes = _panels(len(domains))
    for ax, d in zip(axes, domains):
        fit = fits.get(d) or {}
        pts = np.array([p for p in fit.get("points", []) if p[0] > 0], dtype=np.float64).reshape(-1, 2)
        if len(pts):
            ax.scatter(pts[:, 0], pts[:, 1], s=16, color=colours[d], zorder=3)
        hi = budget if budget > 0 else (pts[:, 0].max() if len(pts) else 1.0)
        curve = _fit_curve(fit, pts[:, 0].min(), hi) if len(pts) else None
        if curve is not None:
            ax.plot(*curve, color=colours[d], linewidth=1.3)
        if "target" in fit and budget > 0:
            ax.plot([budget], [fit["target"]], marker="*", markersize=12, linestyle="none", color=colours[d],
                    markeredgecolor="black", zorder=4)
        for run in static_runs:
            ax.plot([run.summary["tokens"]], [run.summary["final_val_loss"][d]], marker="X", markersize=8,
                    linestyle="none", color=static_colour, zorder=5)
        r2 = fit.get("r2")
        title = f"{_short(d)}\n{fit.get('predictor', '?')}" + (f", R² {r2:.3f}" if isinstance(r2, (int, float)) else "")
        ax.set_title(title, fontsize=TITLE_SIZE)
        ax.set(xscale="log", xlabel="tokens trained (D)", ylabel="validation loss (nats)")
    # Markers take each panel's domain colour; the legend shows their shapes in neutral grey.
    grey = "0.45"
    handles = [Line2D([], [], marker="o", markersize=5, linestyle="none", color=grey, label="proxy points"),
               Line2D([], [], color=grey, linewidth=1.3, label="fit L(D) = E + B/D^β"),
               Line2D([], [], marker="*", markersize=12, linestyle="none", color=grey, markeredgecolor="black",
                      label="predicted target at budget")]
    if static_runs:
        handles.append(Line2D([], [], marker="X", markersize=8, linestyle="none", color=static_colour,
                              label="static run, actual final loss"))
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    fig.savefig(path, dpi=PLOT_DPI)


# ----------------------------------------------------------------------------------------------------------
# The report


HOW_TO_READ = (
    "**Loss** is each domain's validation loss (token-weighted mean cross-entropy, nats) at the end of "
    "training; lower is better, and *mean loss* is the unweighted mean over domains. **Progress** is "
    "(ℓ_init − ℓ_T) / (ℓ_init − ℓ_target): 1 means the domain reached its predicted target, 0 that it did not "
    "move from the base model, below 0 that it got worse, above 1 that it beat the target; *worst progress* "
    "is the lowest over domains, the number a mixing rule that protects lagging domains should raise. "
    "**Tokens** are the tokens trained per domain (millions). **Reweighting** is the share of wall time spent "
    "choosing weights (`time_update_s` / wall time: with the `eval` signal this includes the validation "
    "passes at update points, the faithful signal's cost; with the `train` signal only the all-reduce and "
    "the rule); — for rules whose weights never move. In the plots, a domain keeps one colour throughout; dashed lines mark the "
    "predicted targets."
)


def _fmt_tokens(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _footnotes(results: Sequence[RunResult]) -> list[str]:
    notes = []
    if any(r.progress is not None and None in r.progress.values() for r in results):
        notes.append(f"{GUARD_MARK} n/a: ℓ_init − ℓ_target < {PROGRESS_MIN_GAP} nats for that domain (predicted "
                     f"to stay level or get worse), so progress is undefined; it is left out of *worst progress*.")
    borrowed = [r for r in results if r.borrowed_targets]
    if borrowed:
        ref = _reference_targets([r.run for r in results])
        notes.append(f"{BORROWED_MARK} the run has no targets of its own; its progress uses the targets of "
                     f"`{ref.name}`: " + ", ".join(f"`{r.run.name}`" for r in borrowed) + ".")
    if not any(r.progress is not None for r in results):
        notes.append("No run has targets, so normalised progress is not shown.")
    return notes


def _make_plots(runs: Sequence[Run], arms: dict[str, list[Run]], domains: Sequence[str],
                reference_arm: str | None, out_dir: Path) -> dict[str, str]:
    """Write the plots into out_dir; {file name: caption} of those written, a stale copy removed otherwise."""
    dcol = domain_colours(domains)
    acol = arm_colours(list(arms), reference_arm)
    panels = _panel_runs(arms)
    reference = _reference_targets(runs)
    written: dict[str, str] = {}

    plot_weights(panels, domains, dcol, out_dir / "weights.png")
    written["weights.png"] = "Sampling weights (stacked) vs tokens trained"
    plot_val_loss(arms, domains, reference.targets if reference else None, acol, out_dir / "val_loss.png")
    written["val_loss.png"] = "Validation loss per domain vs tokens trained, one line per arm"
    velocity_panels = [(t, r) for t, r in panels if any(m["velocity"] is not None for m in r.mixture)]
    if velocity_panels:
        plot_velocity(velocity_panels, domains, dcol, out_dir / "velocity.png")
        written["velocity.png"] = "Learning velocity per domain at each weight update"
    with_fits = next((r for r in runs if isinstance(r.targets_file, dict) and r.targets_file.get("domains")), None)
    if with_fits is not None:
        statics = arms.get(reference_arm, []) if reference_arm else []
        plot_targets(with_fits.targets_file, domains, statics, dcol, acol.get(reference_arm, "black"),
                     out_dir / "targets.png")
        written["targets.png"] = (f"Target fits from `{with_fits.name}`/targets.json: proxy points, fitted law "
                                  f"to the budget, predicted target" + (", static run's actual final loss"
                                                                        if statics else ""))
    for name in PLOT_FILES:
        if name not in written:
            (out_dir / name).unlink(missing_ok=True)  # a stale plot from an earlier report would mislead
    return written


def make_report(run_dirs: list[Path], out_dir: Path, title: str | None = None) -> Path:
    """Write report.md and its PNG plots into out_dir comparing the given runs; return the path of report.md."""
    runs = load_runs(run_dirs)
    domains = runs[0].domains
    arms = group_arms(runs)
    reference_arm = static_arm(arms)
    reference = _reference_targets(runs)
    results = [run_result(r, reference) for r in runs]
    result_of = {res.run.path: res for res in results}
    by_arm = {arm: [result_of[r.path] for r in rs] for arm, rs in arms.items()}
    multi_seed = any(len(rs) > 1 for rs in arms.values())

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = _make_plots(runs, arms, domains, reference_arm, out_dir)

    title = title or (f"velocitune report: {len(runs)} run{'s' * (len(runs) != 1)}, "
                      f"{len(arms)} arm{'s' * (len(arms) != 1)}")
    md = [f"# {title}", "",
          f"Generated by velocitune {velocitune.__version__} from {len(runs)} run directories over the domains "
          + ", ".join(f"`{d}`" for d in domains) + ".", "",
          "## How to read this", "", HOW_TO_READ, ""]
    per_run = [run_table(results, domains), ""] + [n + "  " for n in _footnotes(results)]
    if multi_seed:
        md += ["## Results per arm", "",
               "Each cell is the mean over seeds ± the **sample standard deviation** (ddof = 1); (n=1) marks "
               "an arm with one seed." + (
                   f" Δ columns are the arm's mean minus the `{reference_arm}` arm's mean, ± its standard "
                   f"error: *paired* by seed (sd of the per-seed differences / √n) when both arms ran the same "
                   f"seeds, otherwise *unpaired* (√(s₁²/n₁ + s₂²/n₂)). A negative Δ mean loss and a positive "
                   f"Δ worst progress favour the arm." if reference_arm else
                   " No static arm was given, so there are no differences to it."), "",
               arm_table(by_arm, domains, reference_arm), "",
               "<details><summary>Per-run results</summary>", "", *per_run, "", "</details>", ""]
    else:
        md += ["## Results", "", *per_run, ""]
    table, notes = targets_table(runs, domains)
    md += ["## Initial losses and targets", "", table, "", *[n + "  " for n in notes], ""]
    md += ["## Plots", ""]
    for name, caption in plots.items():
        md += [f"### {caption}", "", f"![{name[:-4]}]({name})", ""]
    if "velocity.png" not in plots:
        md += ["No run records a learning velocity in its mixture.jsonl, so there is no velocity plot.", ""]
    if "targets.png" not in plots:
        md += ["No run has a targets.json, so there is no target-fit plot.", ""]
    md += ["## Runs", ""]
    for r in runs:
        s = r.summary
        md.append(f"- `{r.name}`: `{r.path}` (arm `{r.arm}`, rule `{r.rule}`, signal `{s['signal']}`, "
                  f"seed {r.seed}, {s['steps']} steps, {_fmt_tokens(s['tokens'])} tokens)")
    path = out_dir / "report.md"
    path.write_text("\n".join(md) + "\n", encoding="utf-8")
    return path


# ----------------------------------------------------------------------------------------------------------
# CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `velocitune report`."""
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories written by `velocitune train` (seeds of one arm are grouped by "
                             "summary.json's 'arm')")
    parser.add_argument("--out", type=Path, default=Path("report"),
                        help="folder for report.md and the PNG plots (default: ./report)")
    parser.add_argument("--title", default=None, help="title of report.md")


def main(args: argparse.Namespace) -> int:
    """Run `velocitune report`: write the report and print where it is."""
    path = make_report(list(args.run_dirs), args.out, title=args.title)
    print(f"report written to {path}")
    return 0
