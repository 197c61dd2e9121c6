"""`velocitune targets` (docs/design.md §3 Stage B): run the proxy (or reuse a finished one), fit each
domain, write targets.json, init_loss.json and targets.png."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np

from velocitune import laws, runfiles
from velocitune.config import Config
from velocitune.fileio import output_file
from velocitune.schedule import lr_schedule, warmup_steps
from velocitune.shards import PreparedData
from velocitune.targets.fit import fit_domain, law_curves
from velocitune.targets.init_loss import init_loss_path
from velocitune.targets.proxy import main_steps_for, proxy_config, proxy_reusable


def targets_path(cfg: Config) -> Path:
    """Where `velocitune targets` writes targets.json: mixing.targets (where `train` reads it), else the run dir."""
    return Path(cfg.mixing.targets) if cfg.mixing.targets else Path(cfg.run.out_dir) / runfiles.TARGETS_FILE


def targets_main(cfg: Config, out: str | None = None) -> int:
    """`velocitune targets`: proxy run, per-domain fits, targets.json and targets.png."""
    path = output_file(Path(out) if out else targets_path(cfg), "the targets file (--out)")
    result = estimate_targets(cfg, path)
    print(f"wrote {path} (and {path.with_suffix('.png').name}, {init_loss_path(cfg, path)})")
    for n, d in result["domains"].items():
        flag = "  [guarded]" if d["guarded"] else ""
        print(f"{n:>20s}  init {d['init']:.4f}  target {d['target']:.4f}  ({d['predictor']}){flag}")
        for w in d["warnings"]:
            print(f"{'':>22s}warning: {w}")
    return 0


def estimate_targets(cfg: Config, out: Path | None = None) -> dict:
    """Run the proxy, fit each domain, write targets.json (+ targets.png beside it); return the document.

    `out` defaults to `targets_path(cfg)`; the proxy's run directory is `proxy/` beside it and ℓ_init (the
    proxy's step-0 evaluation) goes to `init_loss_path(cfg, out)`.
    """
    out = output_file(Path(out) if out is not None else targets_path(cfg), "the targets file")
    tc = cfg.targets
    data = PreparedData(cfg.data.path)
    names = data.domains
    steps = main_steps_for(cfg, data)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    proxy_dir = out.parent / "proxy"
    pc = proxy_config(cfg, proxy_dir, steps)
    proxy_wall = _run_proxy(pc, proxy_dir)
    records = runfiles.read_log(proxy_dir / runfiles.EVAL_FILE, runfiles.EVAL, names)
    init_rec = next(r for r in records if r["step"] == 0)
    proxy_steps = pc.train.steps
    doc = {"predictor": tc.predictor, "budget_tokens": float(steps * tokens_per_step), "proxy_fraction": tc.fraction,
           "proxy_schedule": tc.proxy_schedule, "proxy_points": int(tc.points),
           "proxy_tokens": float(proxy_steps * tokens_per_step), "proxy_steps": int(proxy_steps),
           "main_steps": int(steps), "proxy_wall_time_s": proxy_wall,
           "proxy_cost_share": proxy_steps / steps,
           "domains": _fit_domains(cfg, pc, records, names, steps)}
    runfiles.write_targets(out, doc)
    runfiles.write_init_loss(init_loss_path(cfg, out), cfg.model.path or "fresh", names,
                             [init_rec["losses"][n] for n in names], [init_rec["tokens_evaluated"][n] for n in names])
    from velocitune.report import domain_colours, plot_targets

    plot_targets(runfiles.read_targets(out), names, [], domain_colours(names), None, out.with_suffix(".png"))
    return doc


def _run_proxy(pc: Config, proxy_dir: Path) -> float:
    """Run the proxy into proxy_dir, or reuse the finished one with the same config (e.g. refitting with
    another predictor); its wall time in seconds."""
    from velocitune.train import train  # orchestration above the trainer (torch only when a proxy runs)

    if proxy_reusable(proxy_dir, pc):
        return float(runfiles.read_summary(proxy_dir / runfiles.SUMMARY_FILE)["wall_time_s"])
    t0 = time.perf_counter()
    shutil.rmtree(proxy_dir, ignore_errors=True)
    train(pc, resume=False)
    return time.perf_counter() - t0


def _fit_domains(cfg: Config, pc: Config, records: list[dict], names: list[str], main_steps: int) -> dict[str, dict]:
    """Each domain's targets.json entry: its proxy points (eval.jsonl records at pc.eval.points) fitted and
    extrapolated to the main run's end, with the fitted curve and the prediction drawn by the law."""
    tokens_per_step = float(cfg.train.batch_size * cfg.data.seq_len)
    pts = [r for r in records if r["step"] in set(pc.eval.points)]
    steps_at = np.array([r["step"] for r in pts], dtype=np.int64)
    tokens = steps_at * tokens_per_step
    init = next(r for r in records if r["step"] == 0)["losses"]
    # LR areas: the proxy's schedule at its eval steps, and the main schedule at its end, (steps,) each.
    proxy_steps = pc.train.steps
    S1p, S2p = laws.lr_areas(lr_schedule(pc, proxy_steps), warmup_steps(pc, proxy_steps))
    S1m, S2m = laws.lr_areas(lr_schedule(cfg, main_steps), warmup_steps(cfg, main_steps))
    proxy_run = (np.arange(1, proxy_steps + 1) * tokens_per_step, S1p, S2p)
    main_run = (np.arange(1, main_steps + 1) * tokens_per_step, S1m, S2m)
    out = {}
    for n in names:
        losses = np.array([r["losses"][n] for r in pts], dtype=np.float64)
        entry, fit = fit_domain(n, tokens, losses, float(init[n]), main_steps * tokens_per_step, cfg.targets.predictor,
                                (S1p[steps_at - 1], S2p[steps_at - 1]), (float(S1m[-1]), float(S2m[-1])))
        out[n] = {**entry, **law_curves(fit, proxy_run, main_run, float(tokens[0]))}
    return out
