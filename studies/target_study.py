"""Target study (issue 9 §2): which proxy recipe predicts the static run's final per-domain loss best?

Every combination of proxy fraction p (0.05 / 0.1 / 0.2), proxy LR schedule (`constant`: warm-up then the
peak LR, the paper's proxy; `compressed`: the main run's schedule squeezed to the proxy, anneal included),
checkpoint density (10 or 20 evaluation points) and predictor (`chinchilla` data law, LR-aware `cpt_law`)
is run on the demo setup and scored against the static arm's final validation losses over its seeds:

    error = predicted target − static final loss      (nats; the seed sd of the static runs beside it)

    python studies/target_study.py [--out demo_out] [--seeds 3] [--parallel 2] [--results FILE] [--key=value ...]

It reuses the demo in --out (base model, data, static runs; `velocitune demo --full` builds them) and
every proxy already run, so an interrupted study resumes. Each proxy is a `velocitune targets`
subprocess with one thread, `--parallel` at a time. Figures: studies/results/target_study.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from targets import static_finals  # studies/targets.py, beside this script

from velocitune.config import dump_yaml
from velocitune.demo import pipeline
from velocitune.runfiles import read_targets

FRACTIONS = (0.05, 0.1, 0.2)
SCHEDULES = ("constant", "compressed")
POINTS = (10, 20)
PREDICTORS = ("chinchilla", "cpt_law")


def variant_dir(root: Path, fraction: float, schedule: str, points: int) -> Path:
    return root / f"p{fraction:g}_{schedule}_n{points}"


def run_variant(config: Path, root: Path, fraction: float, schedule: str, points: int,
                overrides: tuple[str, ...] = ()) -> None:
    """Both predictors for one proxy; the second call reuses the first call's proxy run. `overrides`:
    further `--key=value` config overrides for the proxy."""
    d = variant_dir(root, fraction, schedule, points)
    d.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for pred in PREDICTORS:
        out = d / f"targets_{pred}.json"
        if out.is_file():
            continue
        cmd = [sys.executable, "-m", "velocitune", "targets", str(config), f"--fraction={fraction}",
               f"--points={points}", f"--proxy-schedule={schedule}", f"--predictor={pred}", f"--out={out}",
               "--train.threads=1", "--log.progress=false", *overrides]
        with open(d / "targets.log", "a") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        if rc != 0:
            raise SystemExit(f"proxy {d.name} failed (exit {rc}); see {d / 'targets.log'}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="a `velocitune demo` output directory")
    ap.add_argument("--seeds", type=int, default=3, help="static runs to score against")
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--results", type=Path, default=Path(__file__).parent / "results" / "target_study.json",
                    help="where the figures go (default: studies/results/target_study.json)")
    args, overrides = ap.parse_known_args()  # the rest: config overrides for every proxy (--data.max_repetition=2)
    bad = [o for o in overrides if not (o.startswith("--") and "=" in o)]
    if bad:
        ap.error(f"unrecognised arguments {bad}: config overrides for the proxies are written --key=value")
    out = Path(args.out).resolve()
    if not (out / "cpt.yaml").is_file():
        raise SystemExit(f"{out} holds no demo; run `velocitune demo --full --out {out}` first")
    names, actual = static_finals(out, args.seeds, args.parallel)  # (seeds, k)
    mean, sd = actual.mean(0), actual.std(0, ddof=1)

    root = out / "target_study"
    root.mkdir(exist_ok=True)
    config = root / "proxy.yaml"  # the main run's config without targets of its own
    config.write_text(dump_yaml(pipeline.targets_config(out, threads=1)))
    combos = list(itertools.product(FRACTIONS, SCHEDULES, POINTS))
    with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
        list(pool.map(lambda c: run_variant(config, root, *c, overrides=tuple(overrides)), combos))

    rows = []
    for (fraction, schedule, points), pred in itertools.product(combos, PREDICTORS):
        doc = read_targets(variant_dir(root, fraction, schedule, points) / f"targets_{pred}.json")
        t = np.array([doc["domains"][n]["target"] for n in names])
        err = t - mean
        rows.append({"fraction": fraction, "schedule": schedule, "points": points, "predictor": pred,
                     "target": dict(zip(names, t.tolist())), "error_nats": dict(zip(names, err.tolist())),
                     "error_pct": dict(zip(names, (100 * err / mean).tolist())),
                     "mean_abs_error": float(np.abs(err).mean()), "max_abs_error": float(np.abs(err).max()),
                     "warnings": {n: doc["domains"][n]["warnings"] for n in names if doc["domains"][n]["warnings"]},
                     "proxy_cost_share": doc["proxy_cost_share"], "proxy_wall_time_s": doc["proxy_wall_time_s"]})
    rows.sort(key=lambda r: r["mean_abs_error"])
    print(f"\nerror = predicted target − static final loss (mean of {args.seeds} seeds), nats; sorted by mean |error|")
    head = f"{'p':>5s} {'schedule':>10s} {'pts':>3s} {'predictor':>10s} " + " ".join(f"{n:>8s}" for n in names)
    print(head + f" {'mean|e|':>8s} {'max|e|':>7s} {'cost':>5s}")
    print(f"{'':>5s} {'static sd':>10s} {'':>3s} {'':>10s} " + " ".join(f"{s:>8.4f}" for s in sd))
    for r in rows:
        print(f"{r['fraction']:>5g} {r['schedule']:>10s} {r['points']:>3d} {r['predictor']:>10s} "
              + " ".join(f"{r['error_nats'][n]:>+8.3f}" for n in names)
              + f" {r['mean_abs_error']:>8.3f} {r['max_abs_error']:>7.3f} {100 * r['proxy_cost_share']:>4.0f}%")
    path = args.results
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"seeds": args.seeds, "domains": names, "static_final_mean": dict(zip(names, mean.tolist())),
                                "static_final_sd": dict(zip(names, sd.tolist())), "rows": rows}, indent=2))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
