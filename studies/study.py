"""Update study and the bar of issue 9 (§3, §4): Velocitune variants against static and uniform.

Two domain sets share the demo's tokenizer and base model (so `velocitune demo` must have run in --out):
- `demo`: the demo's replay / code / math / sci;
- `alt`:  replay / cpp / markdown / records, built from other sources (studies/alt_corpus.py);
- `third`: replay / sympy / licenses / afm, from yet other sources (studies/third_corpus.py);
- `fourth`: replay / prose / yaml / cython, mostly English prose (studies/fourth_corpus.py).
For each set this prepares the data, measures ℓ_init and predicts targets with the default recipe
(`velocitune targets` defaults), runs the named arms over seeds as parallel 1-thread processes
(resumable: finished runs are kept), and writes TAG/report.md plus TAG.json/TAG.md (the bar):

    python studies/study.py --out demo_out --set demo --arms static uniform robust --seeds 3

The bar (issue 9 §4), per arm against `static` and `uniform`, seed spread = the larger sample sd of
the two arms compared:
  mean      mean per-domain val loss no worse than static's and uniform's (Δ ≤ spread);
  no_harm   no domain worse than static by more than twice that domain's spread;
  lagging   worst per-domain improvement over the base model (min_i ℓ_init − ℓ_T) larger than
            static's by more than the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `studies`

from studies.alt_corpus import ALT_DOMAINS, build_alt_corpus  # noqa: E402
from studies.fourth_corpus import FOURTH_DOMAINS, build_fourth_corpus  # noqa: E402
from studies.third_corpus import THIRD_DOMAINS, build_third_corpus  # noqa: E402
from velocitune.config import from_dict  # noqa: E402
from velocitune.demo import pipeline  # noqa: E402
from velocitune.fileio import atomic_write_text  # noqa: E402
from velocitune.runfiles import SUMMARY_FILE, read_init_loss, read_summary  # noqa: E402
from velocitune.sweep import Arm, run_arms  # noqa: E402

# Arms of the study: overrides on top of the set's config. The velocity arms name every knob they
# change, so that a later change of a preset's defaults does not silently change an old arm.
# The study's sets name no mixing.interval (issue 27, item 7): an arm gets the interval it names, else its rule's
# default, exactly as `velocitune train` would. The arms measured before issue 27 ran at m = 20: they name it.
_M20 = "--mixing.interval=20"
# The velocity arms before issue 27 used the targets as they were (no online refit, no max_rise) and, unless they
# named the train signal, the eval signal: they say so.
_FIXED = "--mixing.online=false"
_EVAL = "--mixing.signal=eval"
_STATIC_TARGETS = [_FIXED, _EVAL]
ARMS: dict[str, list[str]] = {
    # `velocitune train` with no mixing keys at all (its targets and ℓ_init files are inputs, not knobs)
    "default": [],
    # the default's own time-averaged sampling weights, fixed and paced like the default (issue 27, item 6);
    # DEFAULT_RUN is this seed's default run, which runs first
    "avg-fixed": ["--mixing.rule=replay", "--mixing.replay_from=DEFAULT_RUN", "--mixing.pace=true"],
    # the default as shipped before issue 27 (robust, paced, static targets), at its own interval
    "prior-default": ["--mixing.rule=velocitune", "--mixing.preset=robust", "--mixing.pace=true", *_STATIC_TARGETS],
    # the default on the paper's eval signal (issue 27's bar, criterion 5, reports it beside the default)
    "default-eval": ["--mixing.signal=eval"],
    "static": ["--mixing.rule=static"],
    "uniform": ["--mixing.rule=uniform"],
    "faithful": ["--mixing.rule=velocitune", "--mixing.preset=faithful", _M20, *_STATIC_TARGETS],
    "faithful-train": ["--mixing.rule=velocitune", "--mixing.preset=faithful", "--mixing.signal=train", _M20,
                       _FIXED],
    "robust": ["--mixing.rule=velocitune", "--mixing.preset=robust", _M20, *_STATIC_TARGETS],
    "robust-train": ["--mixing.rule=velocitune", "--mixing.preset=robust", "--mixing.signal=train", _M20,
                     _FIXED],
    "robust-pace": ["--mixing.rule=velocitune", "--mixing.preset=robust", "--mixing.pace=true", _M20, *_STATIC_TARGETS],
    "robust-pace-train": ["--mixing.rule=velocitune", "--mixing.preset=robust", "--mixing.pace=true",
                          "--mixing.signal=train", _M20, _FIXED],
    # the baselines as their authors ran them (issue 17, part 3; issue 27, item 5), each with its own timing
    "odm": ["--mixing.rule=odm", "--mixing.interval=1"],  # every step
    "dbl": ["--mixing.rule=dbl", _M20],
    "ado": ["--mixing.rule=ado"],
    "aioli": ["--mixing.rule=aioli"],
    # `velocitune plan` (issue 17, parts 1-2): its recommended mixture fixed, and Velocitune started there
    # with the plan's targets; PLAN is the set's plan.json, made (or reused) before the arms run
    "plan-static": ["--mixing.rule=static", "--mixing.plan=PLAN"],
    "plan-robust": ["--mixing.rule=velocitune", "--mixing.preset=robust", "--mixing.pace=true", "--mixing.plan=PLAN",
                    _M20, *_STATIC_TARGETS],
    "plan-robust-train": ["--mixing.rule=velocitune", "--mixing.preset=robust", "--mixing.pace=true",
                          "--mixing.plan=PLAN", "--mixing.signal=train", _M20, _FIXED],
    # one knob at a time from `faithful` (update study, §3)
    "c0.05": ["--mixing.rule=velocitune", "--mixing.preset=faithful", "--mixing.smoothing=0.05", _M20, *_STATIC_TARGETS],
    "c0.2": ["--mixing.rule=velocitune", "--mixing.preset=faithful", "--mixing.smoothing=0.2", _M20, *_STATIC_TARGETS],
    "eta0.3": ["--mixing.rule=velocitune", "--mixing.preset=faithful", "--mixing.eta=0.3", _M20, *_STATIC_TARGETS],
    "relfloor0.5": ["--mixing.rule=velocitune", "--mixing.preset=faithful", "--mixing.relative_floor=0.5", _M20,
                    *_STATIC_TARGETS],
    "ema0.7": ["--mixing.rule=velocitune", "--mixing.preset=faithful", "--mixing.ema=0.7", _M20, *_STATIC_TARGETS],
    "m40": ["--mixing.rule=velocitune", "--mixing.preset=faithful", "--mixing.interval=40", *_STATIC_TARGETS],
    "minw0.05": ["--mixing.rule=velocitune", "--mixing.preset=faithful", "--mixing.min_weight=0.05", _M20,
                 *_STATIC_TARGETS],
    "c0.5": ["--mixing.rule=velocitune", "--mixing.preset=faithful", "--mixing.smoothing=0.5", _M20, *_STATIC_TARGETS],
}


# The sets besides the demo's own: corpus builder and domain names.
CORPORA = {"alt": (build_alt_corpus, ALT_DOMAINS), "third": (build_third_corpus, THIRD_DOMAINS),
           "fourth": (build_fourth_corpus, FOURTH_DOMAINS)}


def set_dir(out: Path, name: str) -> Path:
    return out / "study" / name


def prepare_set(out: Path, name: str, parallel: int, steps: int = pipeline.CPT_STEPS, scale: float = 1.0) -> Path:
    """Data, ℓ_init and targets of one domain set; return its cpt.yaml (cached stage by stage)."""
    from velocitune.prepare import prepare_corpus
    from velocitune.targets import estimate_targets

    root = set_dir(out, name)
    root.mkdir(parents=True, exist_ok=True)
    if name == "demo":
        data = out / "data"
    else:
        build, domains = CORPORA[name]
        corpus = build(root / "corpus", scale=scale, progress=False)
        data = root / "data"
        if not (data / "manifest.json").is_file():
            prepare_corpus(out / "tokenizer", data, {d: [str(corpus[d])] for d in domains}, val_fraction=0.05,
                           val_tokens=pipeline.EVAL_TOKENS * 2, workers=parallel)
    config = pipeline.cpt_config(out, steps)
    config["mixing"].pop("interval")  # every arm gets its own rule's default unless it names one (item 7)
    config["data"]["path"] = str(data)
    config["mixing"]["targets"] = str(root / "targets" / "targets.json")
    config["mixing"]["init_loss"] = str(root / "targets" / "init_loss.json")
    path = root / "cpt.yaml"
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))
    if not (root / "targets" / "targets.json").is_file():
        # No `targets` section: the proxy follows the default recipe (`velocitune targets` defaults).
        proxy = from_dict({**config, "mixing": {"interval": pipeline.INTERVAL},
                           "train": {**config["train"], "threads": parallel}})
        estimate_targets(proxy, root / "targets" / "targets.json")
    return path


def _finals(run_dirs: list[Path]) -> tuple[list[str], np.ndarray, float | None]:
    """Domain names, final val losses (seeds, k), and the mean measured reweighting overhead (None: none)."""
    docs = [read_summary(d / SUMMARY_FILE) for d in run_dirs]
    names = list(docs[0]["final_val_loss"])
    cost = [d["measured_overhead"] for d in docs if d.get("measured_overhead") is not None]
    return names, np.array([[d["final_val_loss"][n] for n in names] for d in docs]), (float(np.mean(cost)) if cost else None)


def bar(root: Path, arms: list[str], seeds: int) -> dict:
    """The §4 criteria for every arm, from the runs' final losses and ℓ_init."""
    loss, cost = {}, {}
    for a in arms:
        names, loss[a], cost[a] = _finals([root / "runs" / a / f"seed{s}" for s in range(seeds)])
    init_loss = read_init_loss(root / "targets" / "init_loss.json", names)
    init = np.array([init_loss[n] for n in names])

    def sd(x: np.ndarray) -> np.ndarray:
        return x.std(0, ddof=1) if len(x) > 1 else np.zeros(x.shape[1:])

    summary: dict = {"domains": names, "seeds": seeds, "arms": {}}
    for a in arms:
        L = loss[a]  # (seeds, k)
        mean_loss = L.mean(1)  # (seeds,)
        worst_imp = (init[None] - L).min(1)  # (seeds,)
        summary["arms"][a] = {"mean_loss": float(mean_loss.mean()), "mean_loss_sd": float(sd(mean_loss)),
                              "domain_loss": dict(zip(names, L.mean(0).tolist())),
                              "domain_sd": dict(zip(names, sd(L).tolist())),
                              "worst_improvement": float(worst_imp.mean()), "worst_improvement_sd": float(sd(worst_imp)),
                              "worst_domain": names[int(np.argmin((init[None] - L).mean(0)))],
                              "reweighting_overhead": cost[a]}
    if "static" in loss:
        S = summary["arms"]["static"]
        for a in arms:
            r = summary["arms"][a]
            checks = {}
            for ref in ("static", "uniform"):
                if ref in loss:
                    R = summary["arms"][ref]
                    spread = max(r["mean_loss_sd"], R["mean_loss_sd"])
                    checks[f"mean_vs_{ref}"] = {"delta": r["mean_loss"] - R["mean_loss"], "spread": spread,
                                                "pass": r["mean_loss"] - R["mean_loss"] <= spread}
            spread_d = np.maximum(sd(loss[a]), sd(loss["static"]))
            delta_d = loss[a].mean(0) - loss["static"].mean(0)
            checks["no_harm"] = {"delta": dict(zip(names, delta_d.tolist())), "spread": dict(zip(names, spread_d.tolist())),
                                 "pass": bool(np.all(delta_d <= 2 * spread_d))}
            spread = max(r["worst_improvement_sd"], S["worst_improvement_sd"])
            d = r["worst_improvement"] - S["worst_improvement"]
            checks["lagging"] = {"delta": d, "spread": spread, "pass": d > spread}
            r["checks"] = checks
            r["bar"] = all(c["pass"] for c in checks.values()) if a not in ("static", "uniform") else None
    return summary


def bar_markdown(summary: dict) -> str:
    lines = ["| arm | mean val loss | Δ vs static | Δ vs uniform | worst improvement (domain) | Δ worst vs static | "
             "no domain > 2 sd worse | bar | reweighting cost |", "|:--|--:|--:|--:|--:|--:|:-:|:-:|--:|"]
    for a, r in summary["arms"].items():
        c = r.get("checks", {})

        def cell(key: str, c: dict = c) -> str:
            if key not in c:
                return "—"
            return f"{c[key]['delta']:+.4f} (±{c[key]['spread']:.4f}) {'✓' if c[key]['pass'] else '✗'}"

        cost = "—" if r["reweighting_overhead"] is None else f"{100 * r['reweighting_overhead']:.0f} %"
        lines.append(f"| {a} | {r['mean_loss']:.4f} ± {r['mean_loss_sd']:.4f} | {cell('mean_vs_static')} | "
                     f"{cell('mean_vs_uniform')} | {r['worst_improvement']:+.4f} ± {r['worst_improvement_sd']:.4f} "
                     f"({r['worst_domain']}) | {cell('lagging')} | "
                     f"{'✓' if c.get('no_harm', {}).get('pass') else ('—' if not c else '✗')} | "
                     f"{'—' if r.get('bar') is None else ('**pass**' if r['bar'] else 'fail')} | {cost} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="demo_out", help="a `velocitune demo` output directory")
    ap.add_argument("--set", choices=["demo", *CORPORA], default="demo")
    ap.add_argument("--arms", nargs="+", default=["static", "uniform", "robust", "robust-train"],
                    help=f"from: {', '.join(ARMS)}")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--steps", type=int, default=pipeline.CPT_STEPS, help="CPT steps per run (default: the demo's)")
    ap.add_argument("--scale", type=float, default=1.0, help="size of the second, third or fourth set's corpus (default 1.0)")
    ap.add_argument("--tag", default="bar", help="name of this comparison's outputs: TAG.json, TAG.md, TAG/report.md")
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    if not (out / "base" / "final").is_dir() or not (out / "tokenizer").is_dir():
        raise SystemExit(f"{out} holds no demo base model; run `velocitune demo --out {out}` first")
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        raise SystemExit(f"unknown arm(s) {unknown}; choose from {list(ARMS)}")
    config = prepare_set(out, args.set, args.parallel, args.steps, args.scale)
    root = set_dir(out, args.set)
    plan_file = root / "plan" / "plan.json"
    if any("--mixing.plan=PLAN" in ARMS[a] for a in args.arms):  # proxies reused when already run
        from velocitune.config import load_config
        from velocitune.plan import make_plan

        make_plan(load_config(config, ["--log.progress=false"]), plan_file.parent)

    def overrides(arm: str, seed: int) -> list[str]:
        default_run = root / "runs" / "default" / f"seed{seed}"
        return [o.replace("=PLAN", f"={plan_file}").replace("=DEFAULT_RUN", f"={default_run}") for o in ARMS[arm]]

    # An arm built from the default's run (avg-fixed) runs after it: its seed's default run comes first.
    later = [a for a in args.arms if any("=DEFAULT_RUN" in o for o in ARMS[a])]
    if later and "default" not in args.arms:
        raise SystemExit(f"arm(s) {later} replay the default arm's weights: add `default` to --arms")
    passes = [[a for a in args.arms if a not in later], later]
    by_arm: dict[str, Path] = {}
    for arms in passes:
        plan = [Arm(f"{a}/seed{s}", overrides(a, s) + [f"--train.seed={s}", f"--run.arm={a}"])
                for s in range(args.seeds) for a in arms]
        by_arm.update({p.name: d for p, d in zip(plan, run_arms(config, plan, root / "runs", parallel=args.parallel,
                                                                  threads=1))})
    dirs = [by_arm[f"{a}/seed{s}"] for s in range(args.seeds) for a in args.arms]
    from velocitune.report import make_report

    make_report(dirs, root / args.tag, title=f"velocitune study, {args.set} domain set: {', '.join(args.arms)}")
    summary = bar(root, args.arms, args.seeds)
    atomic_write_text(root / f"{args.tag}.json", json.dumps(summary, indent=2))
    md = bar_markdown(summary)
    atomic_write_text(root / f"{args.tag}.md", md)
    print(md)
    print(f"wrote {root / args.tag / 'report.md'}, {root / (args.tag + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
