"""How well a plan predicts measured runs (issue 17, part 4): the plan's error table.

For every arm directory under the given roots (a folder holding seed*/summary.json), the plan's chosen
laws are evaluated at the shares the arm actually trained (its tokens per domain, averaged over seeds)
and compared with its measured final validation losses (mean over seeds):

    python studies/plan_study.py --plan demo_out/plan/plan.json --runs demo_out/sweep demo_out/sweep_plan \
        --out studies/results/plan_demo.json

A plan predicts static mixtures; for a dynamic arm the average shares stand in for its changing mixture,
so its row is marked dynamic. Prints a markdown table (predicted − measured per domain, nats) and saves
it with the numbers as JSON. `--reference ARM` (the static run at w0) adds the error of each mixture's
effect, (predicted − measured) minus the reference's: what is left once the level every mixture inherits
from the targets at w0 is taken out. `--truth RESULT` scores another plan against the arms of an earlier
result (their shares and measured losses) instead of reading run directories:

    python studies/plan_study.py --plan demo_out/plan_b1.0/plan.json --truth studies/results/plan_demo.json \
        --reference sweep/rule=static
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from velocitune.fileio import atomic_write_text  # noqa: E402
from velocitune.laws import plan_predict  # noqa: E402
from velocitune.runfiles import read_plan, read_summary  # noqa: E402

STATIC_RULES = ("static", "uniform")


def arm_dirs(roots: list[Path]) -> dict[str, Path]:
    """{label: folder} of every folder under the roots with a finished seed*/summary.json; the label is
    ROOT/ARM when several roots are given (two sweeps may both hold rule=static)."""
    found = {}
    for root in roots:
        for d in sorted(p for p in root.iterdir() if p.is_dir()):
            if any((s / "summary.json").is_file() for s in d.glob("seed*")):
                found[f"{root.name}/{d.name}" if len(roots) > 1 else d.name] = d
    return found


def measured_arms(arms: dict[str, Path], names: list[str]) -> dict[str, dict]:
    """Per arm: seeds, rule, realised shares (tokens per domain, mean over seeds), mean final losses."""
    rows = {}
    for label, d in arms.items():
        docs = [read_summary(s / "summary.json") for s in sorted(d.glob("seed*")) if (s / "summary.json").is_file()]
        toks = np.array([[doc["tokens_per_domain"][n] for n in names] for doc in docs], dtype=np.float64)
        rows[label] = {"seeds": len(docs), "rule": docs[0]["rule"],
                       "shares": dict(zip(names, (toks / toks.sum(1, keepdims=True)).mean(0).round(4).tolist())),
                       "measured": dict(zip(names, np.array([[doc["final_val_loss"][n] for n in names]
                                                             for doc in docs]).mean(0).tolist()))}
    return rows


def error_table(plan: dict, arms: dict[str, dict], reference: str | None = None) -> dict:
    """Per arm (measured_arms' rows): predicted per-domain losses at its shares and predicted − measured.

    With a `reference` arm (the static run at w0), also the error of the mixture's *effect*: (predicted arm −
    predicted reference) − (measured arm − measured reference), free of the error in the common level that
    every mixture inherits from the targets at w0, and all that the recommendation rests on."""
    names = plan["domains"]
    rows = {}
    for label, m in arms.items():
        shares = np.array([m["shares"][n] for n in names])
        measured = np.array([m["measured"][n] for n in names])
        predicted = np.array([plan_predict(plan, n, shares)[0] for n in names])
        rows[label] = {**{k: m[k] for k in ("seeds", "rule", "shares", "measured")},
                       "dynamic": m["rule"] not in STATIC_RULES, "predicted": dict(zip(names, predicted.tolist())),
                       "error": dict(zip(names, (predicted - measured).tolist())),
                       "max_abs_error": float(np.max(np.abs(predicted - measured)))}
    if reference is not None:
        if reference not in rows:
            raise SystemExit(f"--reference {reference!r} is not among the arms {list(rows)}")
        ref = np.array([rows[reference]["error"][n] for n in names])
        for r in rows.values():
            eff = np.array([r["error"][n] for n in names]) - ref
            r["effect_error"] = dict(zip(names, eff.tolist()))
            r["max_abs_effect_error"] = float(np.max(np.abs(eff)))
    return {"plan": {k: plan[k] for k in ("recommended", "predicted", "cost_share", "stage1", "base", "proxy_steps")
                     if k in plan}, "reference": reference, "arms": rows}


def markdown(result: dict, names: list[str]) -> str:
    head = "| arm | seeds | shares (" + " / ".join(names) + ") | " + " | ".join(names) + " | max \\|err\\| |"
    lines = [head, "|:--|--:|:--|" + "--:|" * len(names) + "--:|"]
    for arm, r in result["arms"].items():
        label = arm + (" (dynamic: mean shares)" if r["dynamic"] else "")
        shares = " / ".join(f"{r['shares'][n]:.3f}" for n in names)
        errs = " | ".join(f"{r['error'][n]:+.3f}" for n in names)
        lines.append(f"| {label} | {r['seeds']} | {shares} | {errs} | {r['max_abs_error']:.3f} |")
    if result.get("reference"):
        lines += ["", f"Error of each mixture's effect, measured against {result['reference']} (nats):", "",
                  "| arm | " + " | ".join(names) + " | max \\|err\\| |", "|:--|" + "--:|" * len(names) + "--:|"]
        for arm, r in result["arms"].items():
            if arm != result["reference"]:
                errs = " | ".join(f"{r['effect_error'][n]:+.3f}" for n in names)
                lines.append(f"| {arm} | {errs} | {r['max_abs_effect_error']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", required=True, type=Path, help="plan.json of `velocitune plan`")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--runs", nargs="+", type=Path, help="folders holding arm directories")
    src.add_argument("--truth", type=Path, help="an earlier result of this script: its arms' shares and measured "
                                                "losses stand in for the runs (to score another plan against them)")
    ap.add_argument("--reference", help="the arm at w0 (e.g. sweep/rule=static): also score each mixture's effect "
                                        "relative to it")
    ap.add_argument("--out", type=Path, help="where to save the JSON (default: print only)")
    args = ap.parse_args(argv)
    plan = read_plan(args.plan)
    if args.truth:
        arms = json.loads(args.truth.read_text())["arms"]
    else:
        arms = measured_arms(arm_dirs(args.runs), plan["domains"])
    result = error_table(plan, arms, args.reference)
    md = markdown(result, plan["domains"])
    print(md)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps({**result, "markdown": md}, indent=2))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
