"""Fabricated run directories whose files agree with each other, and readers of the markdown report, shared
by the tests of velocitune.report (imported as `report.rundirs`: tests/ is on the path)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

import velocitune
from velocitune import runfiles

DOMAINS = ("math", "code", "prose")
INIT = {"math": 3.2, "code": 2.8, "prose": 2.5}
# prose is predicted to get slightly worse (l_init - l_target < 0): its progress must show as n/a.
TARGETS = {"math": 2.4, "code": 2.1, "prose": 2.51}
W0 = {"math": 0.5, "code": 0.3, "prose": 0.2}
LAW_B, LAW_BETA = 20.0, 0.35  # proxy points follow L(D) = E + B / D^beta with L(budget) = target
FINAL = {"math": 2.7, "code": 2.4, "prose": 2.6}


def _targets_doc(domains, init: dict[str, float], targets: dict[str, float], total_tokens: int) -> dict:
    """targets.json as `velocitune targets` wrote it before it stored curves: Chinchilla fits with params."""
    fits = {}
    for d in domains:
        E = targets[d] - LAW_B / total_tokens ** LAW_BETA
        pts = [[float(D), E + LAW_B / D ** LAW_BETA] for D in np.linspace(0.01, 0.1, 10) * total_tokens]
        fits[d] = {"init": init[d], "points": pts, "params": {"E": E, "B": LAW_B, "beta": LAW_BETA},
                   "r2": 0.995, "interval": [targets[d] - 0.05, targets[d] + 0.05], "target": targets[d],
                   "predictor": "chinchilla", "guarded": init[d] <= targets[d], "warnings": []}
    return {"predictor": "chinchilla", "budget_tokens": float(total_tokens), "proxy_fraction": 0.1,
            "proxy_tokens": 0.1 * total_tokens, "proxy_wall_time_s": 12.3, "domains": fits}


def _write_log(path: Path, fmt: runfiles.Format, domains, records: list[dict], legacy: bool) -> None:
    if legacy:  # velocitune 0.1: no format version in the records
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        return
    log = runfiles.RunLog(path, fmt, domains)
    for r in records:
        log.write(r)
    log.close()


def fabricate_run(root: Path, name: str, *, arm: str, rule: str, signal: str = "eval", seed: int = 0,
                  final: dict[str, float], total_tokens: int = 1_200_000, wall: float = 300.0,
                  t_eval: float = 40.0, t_update: float = 2.0, targets: dict | None = TARGETS,
                  targets_file: bool = True, domains=DOMAINS, version: str | None = None,
                  n_evals: int = 7, n_updates: int = 6, legacy: bool = False, online: bool = False,
                  max_rise: float | None = None) -> Path:
    """Write a run dir whose files agree: eval losses fall from l_init to `final`, weights move for
    reweighting rules, velocity follows from the losses, tokens per domain integrate the weights.

    With `online` the run refits its targets as mixing.online does: each update record after step 0 carries
    its own target (`online_target(final, frac)`), a static prediction and laws, and with a finite
    `max_rise` floors and forgetting domains; config.yaml then has mixing.online and mixing.max_rise.

    The files are written through velocitune.runfiles (today's formats), or with `legacy` as plain JSON
    without format versions, as velocitune 0.1 wrote them. `version` is summary.json's velocitune_version.
    """
    run = root / name
    run.mkdir(parents=True)
    init = {d: INIT[d] for d in domains}
    w0 = np.array([W0[d] for d in domains])
    w0 = w0 / w0.sum()
    steps = 100

    def loss_at(frac: float) -> dict[str, float]:
        return {d: init[d] + (final[d] - init[d]) * (1 - (1 - frac) ** 2) for d in domains}

    evals = []
    for j in range(n_evals):
        frac = j / (n_evals - 1)
        evals.append({"step": round(frac * steps), "tokens": round(frac * total_tokens), "losses": loss_at(frac),
                      "tokens_evaluated": {d: 4096 for d in domains}, "elapsed_s": frac * wall})

    moving = rule not in ("static", "uniform", "temperature", "replay")
    fracs = np.linspace(0, 1, n_updates, endpoint=False) if moving else np.array([0.0])
    drift = np.linspace(-1, 1, len(domains))  # weights move in opposite directions per domain
    mixture, cum = [], np.zeros(len(domains))
    for j, frac in enumerate(fracs):
        w = w0 * np.exp(drift * frac * (1 + 0.3 * seed))
        w = w / w.sum()
        losses = loss_at(frac)
        velocity = None
        if moving and targets is not None and frac > 0:
            velocity = {d: float(np.clip((losses[d] - targets[d]) / max(init[d] - targets[d], 0.02), 0, 1))
                        for d in domains}
        record = {"step": round(frac * steps), "tokens": round(frac * total_tokens), "signal": signal,
                  "losses": losses, "init": init, "targets": targets, "velocity": velocity,
                  "weights": dict(zip(domains, w.tolist())), "sampling_weights": dict(zip(domains, w.tolist())),
                  "tokens_per_domain": dict(zip(domains, np.round(cum).astype(int).tolist())), "guarded": []}
        if online and frac > 0:
            record["targets"] = online_target({d: final[d] for d in domains}, frac)
            record["static_prediction"] = {d: final[d] + 0.01 for d in domains}
            record["laws"] = {d: {"B": -0.9, "E": 2000.0, "beta": 0.6, "C": 15.0, "points": 3 + j} for d in domains}
            if max_rise is not None and np.isfinite(max_rise):
                record["floors"] = {d: 0.05 for d in domains}
                record["forgetting"] = []
        mixture.append(record)
        span = ((fracs[j + 1] if j + 1 < len(fracs) else 1.0) - frac) * total_tokens
        cum = cum + w * span

    _write_log(run / runfiles.EVAL_FILE, runfiles.EVAL, domains, evals, legacy)
    _write_log(run / runfiles.MIXTURE_FILE, runfiles.MIXTURE, domains, mixture, legacy)
    online_keys = ""
    if online or max_rise is not None:
        bound = "null" if max_rise is None else ".inf" if max_rise == np.inf else repr(float(max_rise))
        online_keys = f"  online: {str(online).lower()}\n  max_rise: {bound}\n"
    (run / runfiles.CONFIG_FILE).write_text(f"mixing:\n  rule: {rule}\n  signal: {signal}\n{online_keys}"
                                           f"run:\n  seed: {seed}\n")
    (run / runfiles.INIT_LOSS_FILE).write_text(json.dumps({"model": "tiny", "domains": {
        d: {"loss": init[d], "tokens": 4096} for d in domains}}))
    if targets is not None and targets_file:
        doc = _targets_doc(domains, init, targets, total_tokens)
        if legacy:
            (run / runfiles.TARGETS_FILE).write_text(json.dumps(doc))
        else:
            runfiles.write_targets(run / runfiles.TARGETS_FILE, doc)
    summary = {"velocitune_version": velocitune.__version__ if version is None else version, "arm": arm,
               "rule": rule, "signal": signal, "seed": seed, "domains": list(domains), "steps": steps,
               "tokens": total_tokens, "init_loss": init, "targets": targets, "final_val_loss": evals[-1]["losses"],
               "tokens_per_domain": dict(zip(domains, np.round(cum).astype(int).tolist())),
               "epochs_per_domain": {d: 0.5 for d in domains}, "wall_time_s": wall, "time_eval_s": t_eval,
               "time_update_s": t_update, "time_data_s": 3.0, "complete": True}
    if legacy:
        (run / runfiles.SUMMARY_FILE).write_text(json.dumps(summary))
    else:
        runfiles.write_summary(run / runfiles.SUMMARY_FILE, summary)
    return run


def online_target(final: dict[str, float], frac: float) -> dict[str, float]:
    """The target a fabricated online run records at the update at `frac` of the run: it closes in on the final
    loss (0.2 nats above it at the start, 0 at the end)."""
    return {d: v + 0.2 * (1 - frac) for d, v in final.items()}


def good_run(tmp_path: Path, name: str = "run", **kw) -> Path:
    return fabricate_run(tmp_path, name, arm="velocitune", rule="velocitune", final=FINAL, **kw)


def read_summary(run: Path) -> dict:
    return json.loads((run / runfiles.SUMMARY_FILE).read_text())


def edit_summary(run: Path, drop: tuple[str, ...] = (), **changes) -> None:
    """Rewrite summary.json by hand (bypassing the writer's checks): keys changed, the keys in `drop` removed."""
    s = read_summary(run)
    s.update(changes)
    s = {k: v for k, v in s.items() if k not in drop}
    (run / runfiles.SUMMARY_FILE).write_text(json.dumps(s))


# ----------------------------------------------------------------------------------------------------------
# Reading the markdown back


def md_tables(md: str) -> list[list[dict[str, str]]]:
    """Every markdown table in the text, as a list of {header: cell} rows."""
    tables, lines = [], md.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("| ") and i + 1 < len(lines) and re.match(r"^\|[:\-|]+\|$", lines[i + 1]):
            header = [c.strip() for c in lines[i].strip("|").split(" | ")]
            rows, i = [], i + 2
            while i < len(lines) and lines[i].startswith("| "):
                rows.append(dict(zip(header, [c.strip() for c in lines[i].strip().strip("|").split(" | ")])))
                i += 1
            tables.append(rows)
        else:
            i += 1
    return tables


def table_with(md: str, column: str) -> list[dict[str, str]]:
    found = [t for t in md_tables(md) if t and column in t[0]]
    assert len(found) == 1, f"expected one table with column {column!r}, found {len(found)}"
    return found[0]


def floats(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+|[-+]?\d+", cell)]


def tokens_value(cell: str) -> float:
    """A token count as the report writes it ("552", "15.4k", "1.23M", "4.56B") read back as a number."""
    m = re.fullmatch(r"([0-9][0-9,]*(?:\.[0-9]+)?)([kMBT]?)", cell)
    assert m, f"not a token count: {cell!r}"
    return float(m.group(1).replace(",", "")) * {"": 1, "k": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2)]


def hms(cell: str) -> float:
    h, m, s = (int(x) for x in cell.split(":"))
    return 3600 * h + 60 * m + s


def assert_valid_png(path: Path) -> None:
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    assert len(data) > 10_000, f"{path.name} is only {len(data)} bytes"
    img = mpimg.imread(path)[..., :3]  # (H, W, 3) floats in [0, 1]
    assert img.var() > 1e-3, f"{path.name} is (almost) a single colour"
    rgb = (img * 255).astype(np.uint32)
    assert np.unique(rgb[..., 0] << 16 | rgb[..., 1] << 8 | rgb[..., 2]).size > 20
