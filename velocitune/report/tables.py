"""The tables of report.md: markdown tables of per-run and per-arm results and of the targets, with their
notes, and the results section built from them. `report.command` assembles report.md."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from velocitune.report.runs import (
    PROGRESS_MIN_GAP,
    Difference,
    Run,
    RunNumbers,
    Spread,
    difference,
    downstream_columns,
    mean_sd,
    reference_targets,
)

GUARD_MARK = "†"
BORROWED_MARK = "‡"


# ----------------------------------------------------------------------------------------------------------
# Cells and tables


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], text_cols: Sequence[int]) -> str:
    """A markdown table: the columns at `text_cols` left-aligned, the others (numbers) right-aligned."""
    align = [":--" if i in text_cols else "--:" for i in range(len(header))]
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _share(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def fmt_tokens(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


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


def _score_cell(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def run_table(results: Sequence[RunNumbers], domains: Sequence[str]) -> str:
    """One row per run: final losses, their mean, normalised progress, tokens, wall time, reweighting share."""
    has_progress = any(r.progress is not None for r in results)
    scores = downstream_columns([r.run for r in results])
    header = ["run", "arm", "seed", *[f"loss {d}" for d in domains], "mean loss", *scores]
    if has_progress:
        header += [*[f"progress {d}" for d in domains], "worst progress"]
    header += [*[f"tokens {d} (M)" for d in domains], "wall time", "reweighting"]
    rows = []
    for r in results:
        row = [r.run.name, r.run.arm, str(r.run.seed), *[f"{r.final_loss[d]:.4f}" for d in domains],
               f"{r.mean_loss:.4f}", *[_score_cell((r.run.downstream or {}).get(k)) for k in scores]]
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


def _arm_values(results: Sequence[RunNumbers], get) -> list[tuple[int, float]] | None:
    """(seed, value) for each run of an arm, or None when any run lacks the value."""
    values = [(r.run.seed, get(r)) for r in results]
    return None if any(v is None for _, v in values) else values


def arm_table(by_arm: dict[str, list[RunNumbers]], domains: Sequence[str], reference_arm: str | None) -> str:
    """One row per arm: mean ± sample sd over seeds, and the difference to the reference (static) arm."""
    has_progress = any(r.progress is not None for rs in by_arm.values() for r in rs)
    scores = downstream_columns([r.run for rs in by_arm.values() for r in rs])
    header = ["arm", "seeds", *[f"loss {d}" for d in domains], "mean loss"]
    if reference_arm is not None:
        header.append(f"Δ mean loss vs {reference_arm}")
    for key in scores:
        header += [key] + ([f"Δ {key} vs {reference_arm}"] if reference_arm is not None else [])
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
        for key in scores:
            def score(r, key=key):
                return (r.run.downstream or {}).get(key)
            row.append(stat(results, score, ".3f"))
            if reference_arm is not None:
                row.append(delta(arm, score, ".3f"))
        if has_progress:
            row.append(stat(results, lambda r: r.worst_progress, ".3f"))
            if reference_arm is not None:
                row.append(delta(arm, lambda r: r.worst_progress, ".3f"))
        shares = [r.reweight_share for r in results]
        row += [_hms(float(np.mean([r.wall_time_s for r in results]))),
                "—" if any(s is None for s in shares) else _share(float(np.mean(shares)))]
        rows.append(row)
    return _table(header, rows, text_cols=(0, 1))


def _target_cells(init: float, target: float | None, fit: dict) -> list[str]:
    """ℓ_target, gap, predictor, R² and note of one domain in the targets table."""
    r2 = fit.get("r2")
    cells = [str(fit.get("predictor", "—")), f"{r2:.3f}" if isinstance(r2, (int, float)) else "—"]
    if target is None:
        return ["—", "—", *cells, "no target: progress n/a"]
    gap = init - target
    notes = []
    if gap < PROGRESS_MIN_GAP:
        notes.append(f"gap < {PROGRESS_MIN_GAP} nats: progress n/a")
    if fit.get("guarded"):
        notes.append("guarded during training")
    return [f"{target:.4f}", f"{gap:+.4f}", *cells, "; ".join(notes)]


def _differs(a: float | None, b: float | None) -> bool:
    return (a is None) != (b is None) or (a is not None and abs(a - b) > 1e-6)


def targets_table(runs: Sequence[Run], domains: Sequence[str]) -> tuple[str, list[str]]:
    """Per-domain l_init and l_target of the reference run, and notes on runs whose values differ."""
    ref = reference_targets(runs) or runs[0]
    s = ref.summary
    fits = ref.targets_file.get("domains", {}) if isinstance(ref.targets_file, dict) else {}
    header = ["domain", "ℓ_init (nats)"]
    if ref.targets is not None:
        header += ["ℓ_target (nats)", "gap (nats)", "predictor", "R²", "note"]
    rows = []
    for d in domains:
        row = [d, f"{s['init_loss'][d]:.4f}"]
        if ref.targets is not None:
            fit = fits.get(d) if isinstance(fits.get(d), dict) else {}
            row += _target_cells(s["init_loss"][d], ref.targets.get(d), fit)
        rows.append(row)
    notes = []
    for run in runs:
        differs = any(_differs(run.summary["init_loss"][d], s["init_loss"][d]) for d in domains)
        if run.targets is not None and ref.targets is not None:
            differs |= any(_differs(run.targets.get(d), ref.targets.get(d)) for d in domains)
        if differs:
            notes.append(f"`{run.name}` has different ℓ_init or targets; its progress uses its own values.")
    return _table(header, rows, text_cols=(0, 4, 6)), [f"Values of `{ref.name}`."] + notes


def _footnotes(results: Sequence[RunNumbers]) -> list[str]:
    notes = []
    undefined = [(r, d) for r in results if r.progress is not None for d, p in r.progress.items() if p is None]
    if any(r.targets.get(d) is not None for r, d in undefined):
        notes.append(f"{GUARD_MARK} n/a: ℓ_init − ℓ_target < {PROGRESS_MIN_GAP} nats for that domain (predicted "
                     f"to stay level or get worse), so progress is undefined; it is left out of *worst progress*.")
    if any(r.targets.get(d) is None for r, d in undefined):
        notes.append(f"{GUARD_MARK} n/a: the domain has no target (null in summary.json), so progress is "
                     f"undefined; it is left out of *worst progress*.")
    borrowed = [r for r in results if r.borrowed_targets]
    if borrowed:
        ref = reference_targets([r.run for r in results])
        notes.append(f"{BORROWED_MARK} the run has no targets of its own; its progress uses the targets of "
                     f"`{ref.name}`: " + ", ".join(f"`{r.run.name}`" for r in borrowed) + ".")
    if not any(r.progress is not None for r in results):
        notes.append("No run has targets, so normalised progress is not shown.")
    return notes


# ----------------------------------------------------------------------------------------------------------
# The results section of report.md


def results_section(results: Sequence[RunNumbers], arms: dict[str, list[Run]], domains: Sequence[str],
                     reference_arm: str | None) -> list[str]:
    """The results: per arm (per-run table folded away) when an arm has several seeds, else per run."""
    per_run = [run_table(results, domains), ""] + [n + "  " for n in _footnotes(results)]
    if not any(len(rs) > 1 for rs in arms.values()):
        return ["## Results", "", *per_run, ""]
    result_of = {res.run.path: res for res in results}
    by_arm = {arm: [result_of[r.path] for r in rs] for arm, rs in arms.items()}
    return ["## Results per arm", "",
            "Each cell is the mean over seeds ± the **sample standard deviation** (ddof = 1); (n=1) marks "
            "an arm with one seed." + (
                f" Δ columns are the arm's mean minus the `{reference_arm}` arm's mean, ± its standard "
                f"error: *paired* by seed (sd of the per-seed differences / √n) when both arms ran the same "
                f"seeds, otherwise *unpaired* (√(s₁²/n₁ + s₂²/n₂)). A negative Δ mean loss and a positive "
                f"Δ worst progress or downstream score favour the arm." if reference_arm else
                " No static arm was given, so there are no differences to it."), "",
            arm_table(by_arm, domains, reference_arm), "",
            "<details><summary>Per-run results</summary>", "", *per_run, "", "</details>", ""]
