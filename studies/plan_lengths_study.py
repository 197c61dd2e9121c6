"""Stage-1 study (issue 17, part 4): which way of carrying short proxies to the main budget predicts best?

The plan's error is mostly stage 1 (docs/study.md §7): a mixture's loss at the main budget from proxies
that ran a fraction of it. This script runs plan proxies (the `velocitune plan` proxy recipe: a stratified
fraction of every domain, the main schedule compressed, annealed at the end) at a few mixtures *and* a few
lengths, and scores stage-1 estimators against main-budget runs measured at the same mixtures:

    python studies/plan_lengths_study.py --config demo_out/cpt.yaml --truth studies/results/plan_demo.json \
        --arms sweep/rule=static sweep/rule=uniform sweep_plan/rule=static --lengths 25 50 100 \
        --out demo_out/lengths --results studies/results/plan_lengths_demo.json

--truth is a plan_study.py result (per arm: the realised shares and the measured final losses, mean over
seeds), or --runs the folders holding the finished arms themselves; each named arm's mixture (--nominal,
else its realised shares) is run by the proxies (static arms only). Finished proxies are
reused, so an interrupted study resumes. Each estimator's error is also given for the mixtures' effects
(error − the w0 arm's error), free of the level they share. Estimators (all of a domain's loss at the main budget):
- `offset@L`: the targets file's loss at w0 + (proxy end at L − w0's proxy end at L): plan.stage1 offset.
- `endpoint-pow(L1,L2,L3)`: each mixture's three annealed end losses fitted by E + A·D^-α, at the budget.
- `endpoint-log(L1,L2)`: two end losses, linear in log D, at the budget (a pure power law far from E).
- `w0-log + offset`: w0's log-D line at the budget + the mixture's offset at the longest length.
- `cpt-law-endpoints` (with 4 lengths): the anchored CPT law through ℓ_init and the end losses, by their LR areas.
"""

from __future__ import annotations

import argparse
import json
import sys
from itertools import combinations
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from velocitune import runfiles  # noqa: E402
from velocitune.config import dump_yaml, load_config  # noqa: E402
from velocitune.fileio import atomic_write_text  # noqa: E402
from velocitune.plan.design import plan_proxy_config  # noqa: E402
from velocitune.schedule import main_run_steps  # noqa: E402
from velocitune.shards import PreparedData  # noqa: E402
from velocitune.sweep import Arm, run_arms  # noqa: E402


def main_steps_of(cfg, data: PreparedData) -> int:
    """The main run's steps (train.steps, or train.tokens resolved against the prepared data), as `train` counts them."""
    return main_run_steps(cfg, [data.train(n).n_windows(cfg.data.seq_len) for n in data.domains])


def parse_nominal(spec: str, names: list[str], w0: dict[str, float], realised: dict[str, float]) -> np.ndarray:
    """One --nominal mixture as shares over `names` (normalised), or a SystemExit saying what is wrong."""
    if spec == "-":
        r = [realised[n] for n in names]
    elif spec == "w0":
        r = [w0[n] for n in names]
    elif spec == "uniform":
        r = [1.0] * len(names)
    elif spec.startswith("plan:"):
        rec = json.loads(Path(spec[5:]).read_text())["recommended"]
        r = [rec[n] for n in names]
    else:
        try:
            kv = {k.strip(): float(v) for k, v in (p.split("=") for p in spec.split(","))}
            r = [kv[n] for n in names]
        except (ValueError, KeyError):
            raise SystemExit(f"--nominal {spec!r}: expected w0, uniform, plan:PLAN.json, - or a share for every "
                             f"domain as {','.join(f'{n}=0.25' for n in names)}") from None
    r = np.array(r, dtype=np.float64)
    if not np.all(r >= 0) or r.sum() <= 0:
        raise SystemExit(f"--nominal {spec!r}: shares must be non-negative and not all zero")
    return r / r.sum()


def run_proxies(cfg, names: list[str], main_steps: int, arms: dict[str, np.ndarray], lengths: list[int],
                out: Path, parallel: int) -> dict[tuple[str, int], Path]:
    """One plan proxy per (arm, length) under `out`, run by the sweep harness (finished ones kept)."""
    runs, dirs = [], {}
    for a, (arm, shares) in enumerate(arms.items()):
        for L in lengths:
            name = f"a{a}-L{L}"
            dirs[(arm, L)] = out / name
            # label "w0" for the static arm so the recipe is the plan's own w0 proxy (end loss only: the
            # config names a targets file, so no proxy needs its curve)
            pc = plan_proxy_config(cfg, out / name, main_steps, L, shares, names, "w0" if a == 0 else f"arm{a}")
            path = out / f"{name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, dump_yaml(pc))
            runs.append(Arm(name, [str(path)]))  # each proxy has its own config file: it is the first argument
    run_arms(None, runs, out, parallel=parallel, threads=1)
    return dirs


def fit_pow(D: np.ndarray, y: np.ndarray, at: float) -> float:
    """E + A·D^-α through three (D, y) points (α by bisection on the ratio of differences), at D = at."""
    from scipy.optimize import brentq

    D, y = np.asarray(D, float), np.asarray(y, float)
    r = (y[0] - y[1]) / (y[1] - y[2]) if y[1] != y[2] else np.inf

    def g(a):  # the ratio the power law gives minus the measured one
        return (D[0] ** -a - D[1] ** -a) / (D[1] ** -a - D[2] ** -a) - r

    try:
        a = brentq(g, 1e-4, 5.0)
    except ValueError:  # no decaying power law through the points (the drops grow per doubling): log-linear
        return fit_log(D[1:], y[1:], at)
    A = (y[0] - y[1]) / (D[0] ** -a - D[1] ** -a)
    E = y[2] - A * D[2] ** -a
    return float(E + A * at ** -a)


def fit_log(D, y, at: float) -> float:
    """The line through (log D, y) by least squares, at D = at."""
    b, c = np.polyfit(np.log(np.asarray(D, float)), np.asarray(y, float), 1)
    return float(b * np.log(at) + c)


def cpt_endpoints(cfg, main_steps: int, proxy_cfgs: dict, ends: dict, arms: list[str], lengths: list[int],
                  init: np.ndarray) -> dict:
    """The anchored CPT law (velocitune.laws) fitted per arm and domain to ℓ_init at step 0 and the annealed
    end losses at every length (their LR areas S1, S2 from each proxy's own schedule), at the main run's
    areas. Needs 4 lengths (the law has 4 parameters; ℓ_init makes the 5 points the fit requires)."""
    from velocitune import laws
    from velocitune.errors import FitError
    from velocitune.schedule import lr_schedule, warmup_steps

    if len(lengths) < 4:
        return {}
    S1m, S2m = laws.lr_areas(lr_schedule(cfg, main_steps), warmup_steps(cfg, main_steps))
    pred = {}
    for a in arms:
        areas = [laws.lr_areas(lr_schedule(proxy_cfgs[(a, L)], L), warmup_steps(proxy_cfgs[(a, L)], L)) for L in lengths]
        s1 = np.array([0.0] + [float(x[0][-1]) for x in areas])
        s2 = np.array([0.0] + [float(x[1][-1]) for x in areas])
        out = []
        for i in range(len(init)):
            y = np.array([init[i]] + [ends[(a, L)][i] for L in lengths])
            try:
                f = laws.fit_cpt_law(s1, s2, y, float(init[i]), bootstrap=0, holdout=0)
                out.append(float(f.predict(float(S1m[-1]), float(S2m[-1]))))
            except FitError:
                out.append(np.nan)
        pred[a] = np.array(out)
    return {f"cpt-law-endpoints{tuple(lengths)}": (tuple(lengths), pred)}


def estimates(ends: dict, arms: list[str], lengths: list[int], main: int, base: np.ndarray | None) -> dict:
    """{estimator: (proxy lengths it uses, {arm: (k,) prediction})} from ends[(arm, L)] (k,)."""
    out = {}
    w0 = arms[0]
    if base is not None:
        for L in lengths:
            out[f"offset@{L}"] = ((L,), {a: base + ends[(a, L)] - ends[(w0, L)] for a in arms})
    k = len(ends[(w0, lengths[0])])
    for pair in combinations(lengths, 2):
        out[f"endpoint-log{pair}"] = (pair, {a: np.array([fit_log(pair, [ends[(a, L)][i] for L in pair], main)
                                                           for i in range(k)]) for a in arms})
    for trio in combinations(lengths, 3):
        out[f"endpoint-pow{trio}"] = (trio, {a: np.array([fit_pow(trio, [ends[(a, L)][i] for L in trio], main)
                                                           for i in range(k)]) for a in arms})
    for pair in combinations(lengths, 2):
        Lx = pair[-1]
        line = np.array([fit_log(pair, [ends[(w0, L)][i] for L in pair], main) for i in range(k)])
        out[f"w0-log{pair}+offset@{Lx}"] = (pair, {a: line + ends[(a, Lx)] - ends[(w0, Lx)] for a in arms})
        # the mixture's offset itself linear in log D between the two lengths
        out[f"w0-log{pair}+offset-log{pair}"] = (pair, {
            a: line + np.array([fit_log(pair, [ends[(a, L)][i] - ends[(w0, L)][i] for L in pair], main)
                                for i in range(k)]) for a in arms})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, type=Path)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--truth", type=Path, help="a plan_study.py result (measured arms)")
    src.add_argument("--runs", nargs="+", type=Path, help="folders holding finished arm directories (seed*/)")
    ap.add_argument("--arms", nargs="+", required=True, help="arms of --truth; the first is the corpus mixture w0")
    ap.add_argument("--nominal", nargs="*", default=None,
                    help="the mixture each arm trained, one per arm: w0 (the data's token shares), uniform, "
                         "plan:PLAN.json (its recommended mixture), name=share,..., or - (the arm's realised "
                         "shares, the default; they differ from the nominal where a domain ran out)")
    ap.add_argument("--lengths", nargs="+", type=int, required=True, help="proxy lengths in steps")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--parallel", type=int, default=2)
    ap.add_argument("--results", type=Path)
    args = ap.parse_args(argv)
    cfg = load_config(str(args.config), [])
    data = PreparedData(cfg.data.path)
    if args.truth:
        truth = json.loads(args.truth.read_text())["arms"]
    else:
        from plan_study import arm_dirs, measured_arms  # beside this script

        truth = measured_arms(arm_dirs(args.runs), data.domains)
    missing = [a for a in args.arms if a not in truth]
    if missing:
        raise SystemExit(f"arm(s) {missing} not measured; have {list(truth)}")
    names = list(data.domains)  # the proxies' shares and every table below follow the prepared data's order
    for a in args.arms:
        if set(truth[a]["shares"]) != set(names):
            raise SystemExit(f"arm {a} trained domains {sorted(truth[a]['shares'])}; {args.config} has {sorted(names)}")
    if args.nominal and len(args.nominal) != len(args.arms):
        raise SystemExit(f"--nominal gives {len(args.nominal)} mixtures for {len(args.arms)} arms")
    w0 = dict(zip(data.domains, map(float, data.w0)))
    specs = args.nominal or ["-"] * len(args.arms)
    nominal = {a: parse_nominal(spec, names, w0, truth[a]["shares"]) for a, spec in zip(args.arms, specs)}
    main_steps = main_steps_of(cfg, data)
    dirs = run_proxies(cfg, names, main_steps, nominal, args.lengths, args.out, args.parallel)
    ends = {key: np.array([runfiles.read_summary(d / runfiles.SUMMARY_FILE)["final_val_loss"][n] for n in names])
            for key, d in dirs.items()}
    base = None
    if cfg.mixing.targets and Path(cfg.mixing.targets).is_file():
        found = runfiles.target_values(runfiles.read_targets(cfg.mixing.targets))
        base = np.array([found[n] for n in names])
    else:
        print(f"no targets file at mixing.targets ({cfg.mixing.targets}): the offset@L estimators are left out "
              "(run `velocitune targets` on the config first)", file=sys.stderr)
    est = estimates(ends, args.arms, args.lengths, main_steps, base)
    init_file = args.out / f"a0-L{args.lengths[0]}" / runfiles.INIT_LOSS_FILE
    if init_file.is_file():  # every proxy starts from the same model: the first one's measured ℓ_init
        init = runfiles.read_init_loss(init_file, names)
        proxy_cfgs = {key: runfiles.read_config(d / runfiles.CONFIG_FILE) for key, d in dirs.items()}
        est.update(cpt_endpoints(cfg, main_steps, proxy_cfgs, ends, args.arms, args.lengths, np.array([init[n] for n in names])))
    measured = {a: np.array([truth[a]["measured"][n] for n in names]) for a in args.arms}
    rows = {}
    for e, (used, pred) in est.items():
        err = {a: (pred[a] - measured[a]).tolist() for a in args.arms}
        cost = int(sum(used))  # proxy steps per mixture (the targets proxy behind `offset` not counted)
        # the mixture's effect against w0's (the first arm): the error left once the common level is taken out
        effect = [np.abs(np.array(err[a]) - np.array(err[args.arms[0]])) for a in args.arms[1:]]
        rows[e] = {"error": err, "max_abs": float(max(np.max(np.abs(v)) for v in err.values())),
                   "mean_abs": float(np.mean([np.abs(v) for v in err.values()])),
                   "max_abs_effect": float(max(np.max(v) for v in effect)), "cost_per_mixture": cost}
    print(f"| estimator | proxy steps per mixture (share of {main_steps}) | " +
          " | ".join(f"{a}: " + "/".join(names) for a in args.arms) + " | mean abs | max abs | max abs effect |")
    print("|:--|--:|" + "--:|" * len(args.arms) + "--:|--:|--:|")
    for e, r in sorted(rows.items(), key=lambda kv: kv[1]["max_abs"]):
        cells = " | ".join(" ".join(f"{x:+.3f}" for x in r["error"][a]) for a in args.arms)
        print(f"| {e} | {r['cost_per_mixture']} ({r['cost_per_mixture'] / main_steps:.0%}) | {cells} | "
              f"{r['mean_abs']:.3f} | {r['max_abs']:.3f} | {r['max_abs_effect']:.3f} |")
    if args.results:
        atomic_write_text(args.results, json.dumps({
            "domains": names, "arms": args.arms, "lengths": args.lengths, "main_steps": main_steps,
            "nominal": {a: nominal[a].tolist() for a in args.arms},
            "ends": {f"{a}@{L}": ends[(a, L)].tolist() for a in args.arms for L in args.lengths},
            "measured": {a: measured[a].tolist() for a in args.arms}, "estimators": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
