"""The tables of report.md: markdown tables of per-run and per-arm results and of the targets, with their
notes, and the results section built from them. `report.command` assembles report.md."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from velocitune.report.runs import (
    PROGRESS_MIN_GAP,
    TARGET_ERROR_FRACTIONS,
    Difference,
    Run,
    RunNumbers,
    Spread,
    difference,
    downstream_columns,
    max_rise_limit,
    mean_sd,
    online_target_errors,
    reference_targets,
    refits_targets,
)

GUARD_MARK = "†"
BORROWED_MARK = "‡"
BREACH_MARK = "**breach**"
# A Δ within this of max_rise is no breach: losses read from JSON and subtracted carry rounding of ~1e-16, and a
# Δ that equals the bound (as written in the config) kept it.
BREACH_TOLERANCE = 1e-9


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
    """A token count readable at every scale: exact below 1,000 ("552"), else three significant digits with
    k, M, B or T ("15.4k", "1.23M", "4.56B")."""
    n = float(n)
    if abs(n) < 999.5:
        return f"{n:.0f}"
    for suffix, scale in (("k", 1e3), ("M", 1e6), ("B", 1e9)):
        if abs(n) / scale < 999.5:  # below: .3g would round up to 1000 (1e+03) of this unit
            return f"{n / scale:.3g}{suffix}"
    return f"{n / 1e12:,.3g}T" if abs(n) / 1e12 < 999.5 else f"{n / 1e12:,.0f}T"


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
    header = ["run", "arm", "seed", *[f"loss {d}" for d in domains], "mean loss"]
    if has_progress:
        header += [*[f"progress {d}" for d in domains], "worst progress"]
    header += [*[f"tokens {d}" for d in domains], "wall time", "reweighting"]
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
        row += [fmt_tokens(r.tokens[d]) for d in domains]
        row += [_hms(r.wall_time_s), _share(r.reweight_share)]
        rows.append(row)
    return _table(header, rows, text_cols=(0, 1, 2))


def _arm_values(results: Sequence[RunNumbers], get) -> list[tuple[int, float]] | None:
    """(seed, value) for each run of an arm, or None when any run lacks the value."""
    values = [(r.run.seed, get(r)) for r in results]
    return None if any(v is None for _, v in values) else values


def _stat(results: Sequence[RunNumbers], get, fmt: str) -> str:
    """mean ± sd over an arm's seeds of `get(run numbers)`; n/a when a run lacks the value."""
    values = _arm_values(results, get)
    return "n/a" if values is None else _spread_cell(mean_sd([v for _, v in values]), fmt)


def _delta(by_arm: dict[str, list[RunNumbers]], arm: str, reference_arm: str, get, fmt: str) -> str:
    """Δ of `get` between an arm and the reference arm, ± its standard error when the seeds allow one."""
    if arm == reference_arm:
        return "—"
    values, ref = _arm_values(by_arm[arm], get), _arm_values(by_arm[reference_arm], get)
    return "n/a" if values is None or ref is None else _difference_cell(difference(values, ref), fmt)


def _mean_loss(r: RunNumbers) -> float:
    return r.mean_loss


def _worst_progress(r: RunNumbers) -> float | None:
    return r.worst_progress


def arm_table(by_arm: dict[str, list[RunNumbers]], domains: Sequence[str], reference_arm: str | None) -> str:
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
    rows = []
    for arm, results in by_arm.items():
        row = [arm, ", ".join(str(r.run.seed) for r in results)]
        row += [_stat(results, lambda r, d=d: r.final_loss[d], ".4f") for d in domains]
        row.append(_stat(results, _mean_loss, ".4f"))
        if reference_arm is not None:
            row.append(_delta(by_arm, arm, reference_arm, _mean_loss, ".4f"))
        if has_progress:
            row.append(_stat(results, _worst_progress, ".3f"))
            if reference_arm is not None:
                row.append(_delta(by_arm, arm, reference_arm, _worst_progress, ".3f"))
        shares = [r.reweight_share for r in results]
        row += [_hms(float(np.mean([r.wall_time_s for r in results]))),
                "—" if any(s is None for s in shares) else _share(float(np.mean(shares)))]
        rows.append(row)
    return _table(header, rows, text_cols=(0, 1))


def single_seed_delta_table(by_arm: dict[str, list[RunNumbers]], reference_arm: str) -> str:
    """One row per arm other than the reference, one seed each: Δ mean loss (and Δ worst progress) to the
    reference arm's run, a difference of two single runs, so without a standard error ("no spread")."""
    has_progress = any(r.progress is not None for rs in by_arm.values() for r in rs)
    header = ["arm", "seed", f"Δ mean loss vs {reference_arm}"]
    header += [f"Δ worst progress vs {reference_arm}"] if has_progress else []
    rows = []
    for arm, results in by_arm.items():
        if arm == reference_arm:
            continue
        row = [arm, ", ".join(str(r.run.seed) for r in results), _delta(by_arm, arm, reference_arm, _mean_loss, ".4f")]
        if has_progress:
            row.append(_delta(by_arm, arm, reference_arm, _worst_progress, ".3f"))
        rows.append(row)
    return _table(header, rows, text_cols=(0, 1))


def _score(key: str):
    def get(r: RunNumbers) -> float | None:
        return (r.run.downstream or {}).get(key)
    return get


def downstream_run_table(results: Sequence[RunNumbers], reference_arm: str | None) -> str:
    """One row per run: each downstream score ("task metric"); with one seed per arm, its Δ to the reference
    arm's run beside it (no spread)."""
    scores = downstream_columns([r.run for r in results])
    by_arm: dict[str, list[RunNumbers]] = {}
    for r in results:
        by_arm.setdefault(r.run.arm, []).append(r)
    with_delta = reference_arm is not None and all(len(rs) == 1 for rs in by_arm.values())
    header = ["run", "arm", "seed"]
    for key in scores:
        header += [key] + ([f"Δ {key} vs {reference_arm}"] if with_delta else [])
    rows = []
    for r in results:
        row = [r.run.name, r.run.arm, str(r.run.seed)]
        for key in scores:
            row.append(_score_cell(_score(key)(r)))
            if with_delta:
                row.append(_delta(by_arm, r.run.arm, reference_arm, _score(key), ".3f"))
        rows.append(row)
    return _table(header, rows, text_cols=(0, 1, 2))


def downstream_arm_table(by_arm: dict[str, list[RunNumbers]], reference_arm: str | None) -> str:
    """One row per arm: each downstream score, mean ± sample sd over seeds, and its Δ to the reference arm."""
    scores = downstream_columns([r.run for rs in by_arm.values() for r in rs])
    header = ["arm", "seeds"]
    for key in scores:
        header += [key] + ([f"Δ {key} vs {reference_arm}"] if reference_arm is not None else [])
    rows = []
    for arm, results in by_arm.items():
        row = [arm, ", ".join(str(r.run.seed) for r in results)]
        for key in scores:
            row.append(_stat(results, _score(key), ".3f"))
            if reference_arm is not None:
                row.append(_delta(by_arm, arm, reference_arm, _score(key), ".3f"))
        rows.append(row)
    return _table(header, rows, text_cols=(0, 1))


def _max_rise(results: Sequence[RunNumbers]) -> float | None:
    """An arm's mixing.max_rise: the strictest finite one of its runs (seeds share the config), None if none."""
    limits = [x for x in (max_rise_limit(r.run) for r in results) if x is not None]
    return min(limits) if limits else None


def domain_delta_table(by_arm: dict[str, list[RunNumbers]], domains: Sequence[str],
                       reference_arm: str) -> tuple[str, list[str]]:
    """One row per arm other than the reference: its mixing.max_rise and each domain's final-loss Δ to the
    reference arm (paired by seed where the seeds allow, as in the arm table), a Δ above max_rise marked
    **breach**; and one line per breach ("`arm` on `domain`: Δ ... > max_rise ...")."""
    header = ["arm", "max_rise (nats)", *[f"Δ loss {d} vs {reference_arm}" for d in domains]]
    rows, breaches = [], []
    for arm, results in by_arm.items():
        if arm == reference_arm:
            continue
        limit = _max_rise(results)
        row = [arm, "—" if limit is None else f"{limit:g}"]
        for d in domains:
            get = lambda r, d=d: r.final_loss[d]  # noqa: E731 (one domain's final loss)
            diff = difference(_arm_values(results, get), _arm_values(by_arm[reference_arm], get))
            cell = _difference_cell(diff, ".4f")
            if limit is not None and diff.diff > limit + BREACH_TOLERANCE:
                cell += " " + BREACH_MARK
                breaches.append(f"`{arm}` on `{d}`: Δ {diff.diff:+.4f} > max_rise {limit:g}")
            row.append(cell)
        rows.append(row)
    return _table(header, rows, text_cols=(0,)), breaches


def domain_delta_section(by_arm: dict[str, list[RunNumbers]], domains: Sequence[str],
                         reference_arm: str) -> list[str]:
    """"Per-domain Δ to static and max_rise": the table, then a line naming every breach (or saying none)."""
    table, breaches = domain_delta_table(by_arm, domains, reference_arm)
    limits = any(_max_rise(rs) is not None for arm, rs in by_arm.items() if arm != reference_arm)
    if breaches:
        verdict = "**Breaches of max_rise**: " + "; ".join(breaches) + "."
    elif limits:
        verdict = "No domain's Δ exceeds its arm's max_rise."
    else:
        verdict = "No arm sets a finite `mixing.max_rise`, so no breach is checked."
    return [f"### Per-domain Δ to `{reference_arm}` and max_rise", "",
            f"Each domain's final loss, the arm's minus the `{reference_arm}` arm's (± its standard error, "
            f"paired by seed where both arms ran the same seeds; *(no spread)* with one seed), beside the arm's `mixing.max_rise` from its config.yaml (— "
            f"when null or inf: no bound). max_rise bounds how far a domain may rise over its predicted loss "
            f"under static; a Δ above it against the actual `{reference_arm}` run is marked {BREACH_MARK}.", "",
            table, "", verdict, ""]


def _error_cell(e: float | None) -> str:
    return "—" if e is None else f"{e:.4f}"


def target_error_table(runs: Sequence[Run], domains: Sequence[str]) -> str:
    """One row per run that refits its targets: per domain |target − final loss| at 25, 50 and 75 % of the
    run (`online_target_errors`), and the largest over domains at 50 %."""
    pcts = [f"{100 * f:g} %" for f in TARGET_ERROR_FRACTIONS]
    half = TARGET_ERROR_FRACTIONS.index(0.5)
    header = ["run", "arm", "seed", *[f"{d} at {p}" for d in domains for p in pcts], "largest at 50 %"]
    rows = []
    for run in runs:
        errors = online_target_errors(run)
        at_half = [errors[d][half] for d in domains if errors[d][half] is not None]
        rows.append([run.name, run.arm, str(run.seed), *[_error_cell(e) for d in domains for e in errors[d]],
                     _error_cell(max(at_half) if at_half else None)])
    return _table(header, rows, text_cols=(0, 1, 2))


def target_error_section(runs: Sequence[Run], domains: Sequence[str]) -> list[str]:
    """"Online targets against the final loss", for the runs that refit their targets; [] when none does."""
    online = [r for r in runs if refits_targets(r)]
    if not online:
        return []
    return ["### Online targets against the final loss", "",
            "For each run that refits its targets during training (`mixing.online`): |target − final validation "
            "loss| per domain (nats), the target being the one of the last weight update at or before 25 %, 50 % "
            "and 75 % of the run's steps (— before the first update); the last column is the largest over "
            "domains at 50 %. Small errors early mean the online laws foresaw where each domain would end.", "",
            target_error_table(online, domains), ""]


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
    return _table(header, rows, text_cols=(0, 4, 6)), notes


def targets_section(runs: Sequence[Run], domains: Sequence[str]) -> list[str]:
    """The markdown of "Initial losses and targets": whose values the table shows, the table, its notes."""
    ref = reference_targets(runs)
    if ref is None:
        source = f"ℓ_init of the run `{runs[0].name}` (no run has targets)."
    elif len(runs) == 1:
        source = f"ℓ_init and ℓ_target of the run `{ref.name}`."
    else:
        source = (f"ℓ_init and ℓ_target of the run `{ref.name}`, the first run with targets (a run without "
                  f"targets of its own measures its progress against them).")
    table, notes = targets_table(runs, domains)
    return ["## Initial losses and targets", "", source, "", table, "", *[n + "  " for n in notes], ""]


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


def _no_delta_note(arms: dict[str, list[Run]], reference_arm: str | None) -> str | None:
    """Why a report over several arms has no Δ to static, or None when it has one (or has one arm)."""
    if len(arms) < 2 or reference_arm is not None:
        return None
    return ("No static arm was given (an arm whose runs all use `mixing.rule=static`), so there are no "
            "differences to it.")


def _single_seed_section(results: Sequence[RunNumbers], arms: dict[str, list[Run]], domains: Sequence[str],
                         reference_arm: str | None, per_run: list[str]) -> list[str]:
    md = ["## Results", "", *per_run, ""]
    if reference_arm is None or len(arms) < 2:
        note = _no_delta_note(arms, reference_arm)
        return md + ([note, ""] if note else [])
    by_arm = {arm: [r for r in results if r.run.arm == arm] for arm in arms}
    return md + [f"### Δ to `{reference_arm}` (one seed per arm)", "",
                 f"Each arm's run minus the `{reference_arm}` run: a difference of two single runs, marked "
                 f"*(no spread)*, with no standard error (it includes the seed-to-seed noise, of unknown size). "
                 f"Run ≥ 2 seeds per arm (`velocitune sweep --seeds 3`) for Δ ± its standard error. A negative "
                 f"Δ mean loss and a positive Δ worst progress favour the arm.", "",
                 single_seed_delta_table(by_arm, reference_arm), "",
                 *domain_delta_section(by_arm, domains, reference_arm)]


def _downstream_section(results: Sequence[RunNumbers], by_arm: dict[str, list[RunNumbers]] | None,
                        reference_arm: str | None) -> list[str]:
    """The downstream scores (downstream.json of `velocitune eval`) in their own tables; [] when none."""
    if not downstream_columns([r.run for r in results]):
        return []
    md = ["## Downstream scores", "",
          "Scores of each run's final model from `velocitune eval` (higher is better); — where a run was not "
          "evaluated on that task." + (f" Δ columns: minus the `{reference_arm}` arm, as above." if reference_arm
                                       else ""), ""]
    per_run = downstream_run_table(results, reference_arm)
    if by_arm is None:
        return md + [per_run, ""]
    return md + [downstream_arm_table(by_arm, reference_arm), "",
                 "<details><summary>Per-run downstream scores</summary>", "", per_run, "", "</details>", ""]


def results_section(results: Sequence[RunNumbers], arms: dict[str, list[Run]], domains: Sequence[str],
                    reference_arm: str | None) -> list[str]:
    """The results: per arm (per-run table folded away) when an arm has several seeds, else per run with the
    single-seed Δ to static; either way each domain's Δ to static against max_rise, and the online targets'
    errors when a run refits them; then the downstream scores, when any run has them, in their own tables."""
    per_run = [run_table(results, domains), ""] + [n + "  " for n in _footnotes(results)]
    target_errors = target_error_section([r.run for r in results], domains)
    if not any(len(rs) > 1 for rs in arms.values()):
        return _single_seed_section(results, arms, domains, reference_arm, per_run) + target_errors + \
            _downstream_section(results, None, reference_arm)
    result_of = {res.run.path: res for res in results}
    by_arm = {arm: [result_of[r.path] for r in rs] for arm, rs in arms.items()}
    note = _no_delta_note(arms, reference_arm)
    return ["## Results per arm", "",
            "Each cell is the mean over seeds ± the **sample standard deviation** (ddof = 1); (n=1) marks "
            "an arm with one seed." + (
                f" Δ columns are the arm's mean minus the `{reference_arm}` arm's mean, ± its standard "
                f"error: *paired* by seed (sd of the per-seed differences / √n) when both arms ran the same "
                f"seeds, otherwise *unpaired* (√(s₁²/n₁ + s₂²/n₂)); *(no spread)* when an arm has one seed. "
                f"A negative Δ mean loss and a positive Δ worst progress or downstream score favour the arm."
                if reference_arm else f" {note or ''}"), "",
            arm_table(by_arm, domains, reference_arm), "",
            *(domain_delta_section(by_arm, domains, reference_arm) if reference_arm and len(arms) > 1 else []),
            "<details><summary>Per-run results</summary>", "", *per_run, "", "</details>", "",
            *target_errors, *_downstream_section(results, by_arm, reference_arm)]
