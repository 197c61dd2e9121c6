"""How accurate are the targets? Predicted ℓ_target vs the static run's actual final loss, per domain.

On the demo setup: the 10 % proxy predicts each domain's loss at the full budget; the static mixture is
then trained for the full budget over several seeds, and each predictor's error is reported in nats and
in percent, next to the seed spread of the static runs and the proxy's cost as a share of the main run.

    python studies/targets.py [--out demo_out] [--seeds 3] [--parallel 2]

It reuses whatever `velocitune demo` already built in --out (corpus, base model, proxy, static runs), so
after `make demo-full` it only refits. Figures: studies/results/targets.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from velocitune.config import from_dict, to_dict
from velocitune.demo import pipeline
from velocitune.runfiles import SUMMARY_FILE, read_summary
from velocitune.sweep import Arm, run_arms
from velocitune.targets import estimate_targets

PREDICTORS = ("chinchilla", "cpt_law", "auto")


def static_finals(out: Path, seeds: int, parallel: int) -> tuple[list[str], np.ndarray]:
    """Domain names and the static arm's final val losses (seeds, k) in a demo directory (runs what is missing)."""
    statics = run_arms(out / "cpt.yaml", [Arm(f"static/seed{s}", ["--mixing.rule=static", f"--train.seed={s}",
                                                                   "--run.arm=static"]) for s in range(seeds)],
                       out / "runs", parallel=parallel)
    finals = [read_summary(d / SUMMARY_FILE)["final_val_loss"] for d in statics]
    names = list(finals[0])
    return names, np.array([[f[n] for n in names] for f in finals])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--fraction", type=float, default=pipeline.PROXY_FRACTION)
    args = ap.parse_args()
    out = Path(args.out).resolve()
    if not (out / "cpt.yaml").is_file():
        print(f"{out} has no demo yet: running `velocitune demo` stages first", flush=True)
        pipeline.run_demo(out, parallel=args.parallel)
    names, actual = static_finals(out, args.seeds, args.parallel)
    mean, spread = actual.mean(0), actual.std(0, ddof=1) if args.seeds > 1 else np.zeros(len(names))
    cfg = pipeline.targets_config(out, threads=args.parallel)
    results = {"fraction": args.fraction, "seeds": args.seeds, "domains": names,
               "static_final_mean": dict(zip(names, mean.tolist())),
               "static_final_sd": dict(zip(names, spread.tolist())), "predictors": {}}
    tag = "" if args.fraction == pipeline.PROXY_FRACTION else f"_p{args.fraction:g}"
    for pred in PREDICTORS:
        recipe = {"fraction": args.fraction, "points": 10, "predictor": pred, "proxy_schedule": "compressed"}
        doc = estimate_targets(from_dict({**to_dict(cfg), "targets": recipe}),
                               out / f"targets{tag}" / f"targets_{pred}.json")
        pred_t = np.array([doc["domains"][n]["target"] for n in names])
        err = pred_t - mean
        results["predictors"][pred] = {
            "target": dict(zip(names, pred_t.tolist())), "error_nats": dict(zip(names, err.tolist())),
            "error_pct": dict(zip(names, (100 * err / mean).tolist())),
            "used": {n: doc["domains"][n]["predictor"] for n in names},
            "proxy_cost_share": doc["proxy_cost_share"], "proxy_wall_time_s": doc["proxy_wall_time_s"],
        }
    print(f"\ntarget error = predicted target − static final loss (mean of {args.seeds} seeds); proxy p = {args.fraction}")
    print(f"{'predictor':>12s} " + " ".join(f"{n:>18s}" for n in names))
    print(f"{'static sd':>12s} " + " ".join(f"{s:>18.4f}" for s in spread))
    for pred, r in results["predictors"].items():
        print(f"{pred:>12s} " + " ".join(f"{r['error_nats'][n]:+8.4f} ({r['error_pct'][n]:+5.1f}%)" for n in names))
    cost = results["predictors"]["chinchilla"]["proxy_cost_share"]
    print(f"proxy cost: {100 * cost:.0f} % of the main run's steps")
    path = Path(__file__).parent / "results" / f"targets{tag}.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
