"""Planning cost against accuracy (issue 17, part 1): proxy length × number of mixtures.

Plans made with different `--budget`s (each proxy's length = budget × main steps / mixtures) are refitted
on every subset of their mixtures that keeps w0 (stage 1 `offset` measures every mixture against it), and
each refit predicts the static arms of a plan_study.py result at the shares they trained:

    python studies/plan_cost_study.py --plans demo_out/plan_b0.25 demo_out/plan_b0.5 demo_out/plan_b1.0 \
        --truth studies/results/plan_demo.json --reference sweep/rule=static --arms sweep/rule=uniform \
        sweep_plan/rule=static --results studies/results/plan_cost_demo.json

Per (proxy length, mixtures) it prints the mean over subsets of the largest |error| over arms and domains,
both absolute (predicted − measured) and of the mixture's effect against --reference (what the
recommendation rests on; the absolute level is the targets file's at w0, the same for every design), and
the cost: proxy steps as a share of the main run's. Nothing is run; only plan.json files are read.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from velocitune.errors import FitError  # noqa: E402
from velocitune.fileio import atomic_write_text  # noqa: E402
from velocitune.plan.fit import fit_laws  # noqa: E402
from velocitune.runfiles import read_plan  # noqa: E402


def refit_errors(plan: dict, keep: list[int], truth: dict, arms: list[str], reference: str) -> tuple[float, float]:
    """(max |absolute error|, max |effect error|) over `arms` × domains of the plan refitted on mixtures `keep`."""
    names = plan["domains"]
    R = np.array([[plan["mixtures"][j]["shares"][n] for n in names] for j in keep])
    Y = np.array([[plan["mixtures"][j]["final"][n] for n in names] for j in keep])
    _, predictors = fit_laws(R, Y, names, plan["law"])

    def err(arm: str) -> np.ndarray:
        r = np.array([truth[arm]["shares"][n] for n in names])
        return np.array([p(r)[0] for p in predictors]) - np.array([truth[arm]["measured"][n] for n in names])

    ref = err(reference)
    absolute = max(np.max(np.abs(err(a))) for a in [reference, *arms])
    effect = max(np.max(np.abs(err(a) - ref)) for a in arms)
    return float(absolute), float(effect)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plans", nargs="+", required=True, type=Path, help="plan directories (holding plan.json)")
    ap.add_argument("--truth", required=True, type=Path, help="a plan_study.py result (measured arms)")
    ap.add_argument("--reference", required=True, help="the truth's arm at w0")
    ap.add_argument("--arms", nargs="+", required=True, help="the truth's other static arms to predict")
    ap.add_argument("--results", type=Path)
    args = ap.parse_args(argv)
    truth = json.loads(args.truth.read_text())["arms"]
    rows = []
    for d in args.plans:
        plan = read_plan(d / "plan.json")
        labels = [m["name"] for m in plan["mixtures"]]
        if "w0" not in labels:
            raise SystemExit(f"{d}: the plan has no w0 mixture")
        w = labels.index("w0")
        others = [j for j in range(len(labels)) if j != w]
        per_mixture = plan["proxy_steps"] / plan["main_steps"]
        for n in range(4, len(labels) + 1):
            errs, failed = [], 0
            for sub in combinations(others, n - 1):
                try:
                    errs.append(refit_errors(plan, [w, *sub], truth, args.arms, args.reference))
                except FitError:
                    failed += 1
            if not errs:
                continue
            a = np.array(errs)
            rows.append({"plan": str(d), "proxy_steps": plan["proxy_steps"], "mixtures": n, "subsets": len(errs),
                         "unfittable": failed, "cost_share": n * per_mixture,
                         "max_abs_error": float(a[:, 0].mean()), "max_abs_effect_error": float(a[:, 1].mean()),
                         "worst_effect_error": float(a[:, 1].max())})
    print("| proxy steps | mixtures | cost (share of main) | subsets | max \\|error\\| | max \\|effect error\\| "
          "(mean over subsets) | worst subset |")
    print("|--:|--:|--:|--:|--:|--:|--:|")
    for r in rows:
        print(f"| {r['proxy_steps']} | {r['mixtures']} | {r['cost_share']:.0%} | {r['subsets']} | "
              f"{r['max_abs_error']:.3f} | {r['max_abs_effect_error']:.3f} | {r['worst_effect_error']:.3f} |")
    if args.results:
        atomic_write_text(args.results, json.dumps({"reference": args.reference, "arms": args.arms, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
