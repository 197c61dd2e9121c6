"""The bar of issue 27, measured on finished study runs (docs/study.md §9).

    python studies/bar27.py --out /path/to/demo_out --sets demo alt third fourth --seeds 3

reads `OUT/study/SET/runs/ARM/seedS/` for every arm present (the `default` and `static` arms are required)
and writes `OUT/study/bar27.json` and `bar27.md`: one table per set and one line per criterion, with the
criteria's wording fixed by the issue:

1. The default (no mixing keys) never ends worse than static on mean validation loss beyond the paired seed
   spread on any of the four sets, and beats static beyond it on at least three.
2. No domain ends worse than under static by more than `max_rise` + 2 seed sd, on every set, with the
   default settings.
3. The default beats uniform, odm, dbl, ado, aioli and the fixed average-weights mixture on mean loss beyond
   the spread on at least three of the four sets, and none of them beats it beyond the spread on any set.
4. The online targets are within 0.05 nats of each domain's final loss by the middle of the run, on every
   domain of every set.
5. The reweighting overhead of the default stays under 10 % of wall time at the study's scale, and the
   `train` signal's result is reported beside it.

Definitions: "the paired seed spread" is the sample standard deviation (ddof = 1) over seeds of the paired
difference default − other at the same seed; "2 seed sd" is twice the larger of the two arms' per-domain
sample sds. A criterion whose arms or sets were not all run is reported as **not measured**, which is a miss.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from velocitune.fileio import atomic_write_text  # noqa: E402
from velocitune.rules import DEFAULT_MAX_RISE  # noqa: E402
from velocitune.runfiles import MIXTURE, MIXTURE_FILE, SUMMARY_FILE, read_log, read_summary  # noqa: E402

PEERS = ("uniform", "odm", "dbl", "ado", "aioli", "avg-fixed")
MIDDLE_TOL = 0.05  # criterion 4, nats
OVERHEAD_MAX = 0.10  # criterion 5, share of wall time


def _runs(root: Path, arm: str, seeds: int) -> list[Path] | None:
    dirs = [root / "runs" / arm / f"seed{s}" for s in range(seeds)]
    return dirs if all((d / SUMMARY_FILE).is_file() for d in dirs) else None


def _finals(dirs: list[Path]) -> tuple[list[str], np.ndarray]:
    docs = [read_summary(d / SUMMARY_FILE) for d in dirs]
    names = list(docs[0]["final_val_loss"])
    return names, np.array([[d["final_val_loss"][n] for n in names] for d in docs])  # (seeds, k)


def paired(a: np.ndarray, b: np.ndarray) -> dict:
    """Mean-loss difference a − b paired by seed: mean, sd (ddof = 1), and the verdict against the sd."""
    d = a.mean(1) - b.mean(1)  # (seeds,)
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    mean = float(d.mean())
    return {"delta": mean, "spread": sd, "worse": mean > sd, "better": mean < -sd}


def target_errors(run: Path, names: list[str], fractions=(0.25, 0.5, 0.75)) -> dict[str, list[float | None]]:
    """|target − final loss| per domain at the last update record at or before each fraction of the run."""
    summary = read_summary(run / SUMMARY_FILE)
    records = [r for r in read_log(run / MIXTURE_FILE, MIXTURE, names) if r.get("laws")]
    out: dict[str, list[float | None]] = {}
    for n in names:
        row = []
        for f in fractions:
            before = [r for r in records if r["step"] <= f * summary["steps"]]
            row.append(None if not before else abs(before[-1]["targets"][n] - summary["final_val_loss"][n]))
        out[n] = row
    return out


def overhead(dirs: list[Path]) -> float:
    """Mean share of wall time spent choosing weights (time_update_s / wall_time_s)."""
    docs = [read_summary(d / SUMMARY_FILE) for d in dirs]
    return float(np.mean([d["time_update_s"] / d["wall_time_s"] for d in docs]))


def measure_set(root: Path, seeds: int) -> dict | None:
    """Every criterion's numbers on one domain set, or None when its default or static arm is missing."""
    default, static = _runs(root, "default", seeds), _runs(root, "static", seeds)
    if default is None or static is None:
        return None
    names, D = _finals(default)
    _, S = _finals(static)
    sd_d = np.maximum(D.std(0, ddof=1), S.std(0, ddof=1))
    delta_d = D.mean(0) - S.mean(0)
    out: dict = {"domains": names, "default_mean": float(D.mean()), "static_mean": float(S.mean()),
                 "vs_static": paired(D, S),
                 "domain_delta": dict(zip(names, delta_d.tolist())), "domain_sd": dict(zip(names, sd_d.tolist())),
                 "domain_breach": {n: bool(delta_d[i] > DEFAULT_MAX_RISE + 2 * sd_d[i]) for i, n in enumerate(names)},
                 "peers": {}, "overhead": overhead(default)}
    for arm in PEERS + ("default-eval", "prior-default"):
        dirs = _runs(root, arm, seeds)
        if dirs is not None:
            _, P = _finals(dirs)
            out["peers"][arm] = {"mean": float(P.mean()), **paired(D, P)}
            if arm == "default-eval":
                out["peers"][arm]["overhead"] = overhead(dirs)
    errors = [target_errors(d, names) for d in default]
    out["target_error"] = {n: [max(e[n][j] for e in errors) if all(e[n][j] is not None for e in errors) else None
                               for j in range(3)] for n in names}
    return out


def verdicts(sets: dict[str, dict | None], want: list[str]) -> dict[str, dict]:
    """The five criteria over the sets: pass / miss, with the numbers that decide them."""
    got = {s: m for s, m in sets.items() if m is not None}
    missing = [s for s in want if s not in got]
    v: dict[str, dict] = {}
    worse = [s for s, m in got.items() if m["vs_static"]["worse"]]
    better = [s for s, m in got.items() if m["vs_static"]["better"]]
    v["1"] = {"pass": not missing and not worse and len(better) >= 3, "worse_on": worse, "better_on": better,
              "not_run": missing}
    breaches = {s: [n for n, b in m["domain_breach"].items() if b] for s, m in got.items()}
    v["2"] = {"pass": not missing and not any(breaches.values()), "breaches": breaches, "not_run": missing}
    peer_beaten = {p: [s for s, m in got.items() if p in m["peers"] and m["peers"][p]["better"]] for p in PEERS}
    peer_wins = {p: [s for s, m in got.items() if p in m["peers"] and m["peers"][p]["worse"]] for p in PEERS}
    peer_missing = {p: [s for s in want if s not in got or p not in got[s]["peers"]] for p in PEERS}
    v["3"] = {"pass": all(len(peer_beaten[p]) >= 3 and not peer_wins[p] and not peer_missing[p] for p in PEERS),
              "default_beats_on": peer_beaten, "peer_beats_default_on": peer_wins, "not_run": peer_missing}
    mids = {s: {n: e[1] for n, e in m["target_error"].items()} for s, m in got.items()}
    v["4"] = {"pass": not missing and all(x is not None and x <= MIDDLE_TOL for d in mids.values() for x in d.values()),
              "error_at_middle": mids, "not_run": missing}
    v["5"] = {"pass": not missing and all(m["overhead"] < OVERHEAD_MAX for m in got.values()),
              "overhead": {s: m["overhead"] for s, m in got.items()},
              "eval_signal": {s: m["peers"].get("default-eval") for s, m in got.items()}, "not_run": missing}
    return v


def markdown(sets: dict[str, dict | None], v: dict[str, dict]) -> str:
    lines = []
    for s, m in sets.items():
        lines += [f"### {s}", ""]
        if m is None:
            lines += ["Not run (the default or static arm is missing).", ""]
            continue
        lines += ["| arm | mean val loss | default − arm (paired, ± sd over seeds) |", "|:--|--:|--:|",
                  f"| default | {m['default_mean']:.4f} | — |",
                  f"| static | {m['static_mean']:.4f} | {m['vs_static']['delta']:+.4f} ± {m['vs_static']['spread']:.4f} |"]
        lines += [f"| {p} | {r['mean']:.4f} | {r['delta']:+.4f} ± {r['spread']:.4f} |" for p, r in m["peers"].items()]
        lines += ["", "| domain | default − static | 2 sd | breach of max_rise + 2 sd | target error at 25/50/75 % |",
                  "|:--|--:|--:|:-:|:--|"]
        for n in m["domains"]:
            errs = " / ".join("—" if e is None else f"{e:.3f}" for e in m["target_error"][n])
            lines.append(f"| {n} | {m['domain_delta'][n]:+.4f} | {2 * m['domain_sd'][n]:.4f} | "
                         f"{'**yes**' if m['domain_breach'][n] else 'no'} | {errs} |")
        lines += ["", f"Reweighting overhead of the default: {100 * m['overhead']:.1f} % of wall time.", ""]
    lines += ["### Criteria", ""]
    for k, r in v.items():
        lines.append(f"- Criterion {k}: **{'met' if r['pass'] else 'missed'}** — "
                     + json.dumps({key: val for key, val in r.items() if key != 'pass'}, default=str))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="the `velocitune demo` directory the study ran in")
    ap.add_argument("--sets", nargs="+", default=["demo", "alt", "third", "fourth"])
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args(argv)
    root = Path(args.out).resolve() / "study"
    sets = {s: measure_set(root / s, args.seeds) for s in args.sets}
    v = verdicts(sets, list(args.sets))
    atomic_write_text(root / "bar27.json", json.dumps({"sets": sets, "criteria": v}, indent=2, default=str))
    md = markdown(sets, v)
    atomic_write_text(root / "bar27.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
