"""`velocitune plan`: predict any mixture's per-domain loss from a few short runs (docs/design.md §3 Stage P, §4.4).

`make_plan` lays the plan out (`design`), runs its proxies or emits them for a cluster or collects the
finished ones (`proxies`), fits the laws and recommends a mixture (`fit`), and writes plan.json and plan.png;
`main` is the command line.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from velocitune import runfiles
from velocitune.announce import warn
from velocitune.config import Config, load_config
from velocitune.errors import ConfigError
from velocitune.fileio import output_file
from velocitune.plan.design import budget_warning, plan_setup
from velocitune.plan.fit import LAWS, plan_document
from velocitune.plan.proxies import collect, emit_commands, run_proxies, unfinished
from velocitune.report import plot_plan

MODES = ("run", "emit", "collect")


def make_plan(cfg: Config, out: Path, mode: str = "run", resume: bool = False, verbose: bool = False) -> dict | None:
    """Run (mode "run"), emit (mode "emit": configs + commands, no fit) or collect the proxies, then fit and
    write out/plan.json and out/plan.png. Returns the plan document (None when emitting). resume: continue a
    preempted proxy (else one is refused); verbose: each proxy prints its whole config."""
    if mode not in MODES:
        raise ValueError(f"make_plan: mode {mode!r} is not one of {MODES}")
    s = plan_setup(cfg, out)
    share = len(s.design) * s.steps / s.main_steps
    print(f"plan: {len(s.design)} proxy runs x {s.steps} steps = {share:.0%} of the main run's {s.main_steps} steps "
          f"(+ {sum(len(c.eval.points) for c in s.configs)} evaluations), each on {s.steps / s.main_steps:.1%} of "
          f"every domain")
    if (stretched := budget_warning(s.main_steps, len(s.design), cfg.plan.budget, cfg.plan.points)) is not None:
        warn(stretched)
    if mode == "emit":
        emit_commands(s)
        return None
    if mode == "run":
        run_proxies(s, resume=resume, verbose=verbose)
    doc = plan_document(s, collect(s, unfinished(s) if mode == "collect" else []))
    path = out / runfiles.PLAN_FILE
    runfiles.write_plan(path, doc)
    plot_plan(doc, path.with_suffix(".png"))
    return doc


# ---------------------------------------------------------------------------------------------- command


def _pairs(flag: str, text: str) -> dict[str, float]:
    """'code=2,math=1' -> {'code': 2.0, 'math': 1.0}."""
    out = {}
    for part in filter(None, text.split(",")):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise ConfigError(f"{flag}: '{part}' is not DOMAIN=NUMBER (e.g. {flag} code=2,math=1)")
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of `velocitune plan` besides the config and its overrides."""
    p.add_argument("--out", required=True, help="the plan's directory: proxies/, plan.json, plan.png, init_loss.json")
    p.add_argument("--objective", help="per-domain weights of the loss to minimise, e.g. code=2,math=1 "
                                       "(plan.objective; default: mixing.objective, else every domain 1, the mean loss)")
    p.add_argument("--max-rise", help="largest rise (nats) a domain may take over its predicted loss under w0, "
                                      "e.g. replay=0.05 (plan.max_rise; default: mixing.max_rise for every domain, "
                                      "0.03 with the default online targets)")
    p.add_argument("--budget", type=float, help="the proxies' steps together as a share of the main run's "
                                                "(plan.budget, default 0.5)")
    p.add_argument("--law", choices=["auto", *LAWS], help="mixture law per domain (plan.law, default auto: "
                                                          "the lower leave-one-mixture-out error)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--emit", action="store_true", help="write each proxy's config and commands.sh instead "
                                                          "of running them (a cluster runs them; then --collect)")
    mode.add_argument("--collect", action="store_true", help="run nothing: fit from the finished proxy run "
                                                             "directories (missing ones are listed and skipped)")
    mode.add_argument("--resume", action="store_true", help="continue a proxy stopped by a preemption (SIGTERM) "
                                                            "from its checkpoint; without it such a proxy is refused")
    p.add_argument("--verbose", action="store_true", help="each proxy prints its whole resolved config "
                                                          "(default: one line)")


def main(args: argparse.Namespace, overrides: list[str], config: str | None) -> int:
    """`velocitune plan CONFIG --out DIR`: flags become plan.* overrides (a flag wins over the file)."""
    flags = {"objective": args.objective and _pairs("--objective", args.objective),
             "max_rise": args.max_rise and _pairs("--max-rise", args.max_rise),
             "budget": args.budget, "law": args.law}
    overrides = overrides + [f"--plan.{k}={json.dumps(v)}" for k, v in flags.items() if v is not None]
    cfg = load_config(config, overrides)
    out = Path(args.out)
    output_file(out / runfiles.PLAN_FILE, "the plan directory (--out)")
    doc = make_plan(cfg, out, "emit" if args.emit else "collect" if args.collect else "run", resume=args.resume,
                    verbose=args.verbose)
    if doc is not None:
        _print_plan(doc, out)
    return 0


def _print_plan(doc: dict, out: Path) -> None:
    """What the plan cost, each domain's law and its recommended share and predicted loss, and how to use it."""
    names = doc["domains"]
    print(f"wrote {out / runfiles.PLAN_FILE} and {out / 'plan.png'}  (proxies: {doc['cost_share']:.0%} of the main "
          f"run's steps, {doc['proxy_wall_time_s']:.0f} s" + (f"; with the targets proxy that gave w0's losses: "
          f"{doc['cost_share'] + doc['base_cost_share']:.0%}" if doc.get("base_cost_share") else "") + ")")
    print(f"{'domain':>20s}  {'law':>6s}  {'LOO err':>8s}  {'w0':>6s}  {'plan':>6s}  {'loss @w0':>9s}  {'loss @plan':>10s}")
    for n in names:
        f = doc["fits"][n]
        loo = f["candidates"][f["law"]].get("max_loo_error")
        print(f"{n:>20s}  {f['law']:>6s}  {loo if loo is not None else float('nan'):8.4f}  "
              f"{doc['mixtures'][0]['shares'][n] if doc['mixtures'][0]['name'] == 'w0' else float('nan'):6.3f}  "
              f"{doc['recommended'][n]:6.3f}  {doc['predicted_w0'][n]:9.4f}  {doc['predicted'][n]:10.4f}")
    for w in doc["warnings"]:
        print(f"warning: {w}")
    print(f"use it: velocitune train CONFIG --mixing.plan={out / runfiles.PLAN_FILE}  (add --mixing.rule=static "
          f"for the planned mixture, fixed)")
