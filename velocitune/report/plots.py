"""The report's PNG plots: one colour per domain and per arm, panels, and every plot (sampling weights,
validation loss, learning velocity, target fits, online targets). Matplotlib Figure objects on the Agg canvas: no pyplot,
no global backend switch."""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from velocitune import laws
from velocitune.report.runs import Run, load_run, reference_targets, refits_targets
from velocitune.report.tables import fmt_tokens

PLOT_FILES = ("weights.png", "val_loss.png", "velocity.png", "targets.png", "online_targets.png")
PLOT_DPI = 110
TITLE_SIZE = 10
MAX_PANELS_PER_ROW = 4
# Points of a Chinchilla curve drawn from E, B, beta (targets.json written before it stored its curves).
CURVE_POINTS = 64

# Each law a target can come from: (its name in panel titles, its line in the legend of targets.png).
CHINCHILLA_FORM = "L(D) = E + B/D^β"
CPT_LAW_FORM = "L(t) = ℓ_init + B(1 − (1 + E·S1(t))^−β) − C·S2(t)"
LAWS = {
    "chinchilla": ("Chinchilla data law", f"chinchilla: {CHINCHILLA_FORM}\n  (D: tokens trained)"),
    "cpt_law": ("CPT law", f"cpt_law: {CPT_LAW_FORM}\n  (LR-aware CPT law; S1, S2: forward\n  and annealing LR areas)"),
    "loglinear": ("log-linear", "loglinear: log-linear extrapolation\n  of the last points (no curve drawn)"),
}


# ----------------------------------------------------------------------------------------------------------
# Colours and panels


def domain_colours(domains: Sequence[str]) -> dict[str, Any]:
    """One fixed colour per domain, in domain order, shared by every plot."""
    import matplotlib

    k = len(domains)
    if k <= 10:
        cols = matplotlib.colormaps["tab10"].colors[:k]
    elif k <= 20:
        cols = matplotlib.colormaps["tab20"].colors[:k]
    else:
        cols = [matplotlib.colormaps["hsv"](i / k) for i in range(k)]
    return dict(zip(domains, cols))


def arm_colours(arms: Sequence[str], reference_arm: str | None) -> dict[str, Any]:
    """The reference (static) arm in near-black, the others from a palette distinct from the domain colours."""
    import matplotlib

    palette = matplotlib.colormaps["Dark2"].colors
    others = [a for a in arms if a != reference_arm]
    colours = {a: palette[i % len(palette)] for i, a in enumerate(others)}
    if reference_arm is not None:
        colours[reference_arm] = "0.15"
    return colours


def _tokens_formatter():
    """Tick labels of a tokens axis, written as the tables write tokens (fmt_tokens: 552, 15.4k, 1.23M, 4.56B)."""
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda x, pos=None: fmt_tokens(x))


def _panels(n: int, panel_w: float = 3.8, panel_h: float = 2.9, legend_w: float = 1.8):
    """A constrained-layout figure with n panels, at most MAX_PANELS_PER_ROW per row; room for a legend."""
    from matplotlib.figure import Figure

    ncols = min(MAX_PANELS_PER_ROW, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel_w * ncols + legend_w, panel_h * nrows + 0.4), dpi=PLOT_DPI, layout="constrained")
    grid = fig.subplots(nrows, ncols, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n:]:
        fig.delaxes(ax)
    for ax in axes[:n]:
        ax.xaxis.set_major_formatter(_tokens_formatter())  # tokens: 200k, 1.5M, 2B
        ax.grid(alpha=0.3, linewidth=0.6)
    return fig, axes[:n]


def _short(text: str, limit: int = 34) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _legend(fig, axes, title: str | None = None) -> None:
    """One legend for the figure, outside the panels on the right, from the labels of every panel."""
    handles, labels = [], []
    for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside right upper", title=title, fontsize=9, title_fontsize=9)


def _panel_runs(arms: dict[str, list[Run]]) -> list[tuple[str, Run]]:
    """(title, run) of the runs drawn one panel each: each arm's first seed (every run when seeds are single).

    Titled by arm, not by folder name: arms are short and unique, folder names are often long.
    """
    return [(f"{arm} (seed {rs[0].seed})", rs[0]) for arm, rs in arms.items()]


# ----------------------------------------------------------------------------------------------------------
# Weights, validation loss, velocity


def _weight_steps(run: Run, domains: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Token positions (n+1,) and sampling weights (n+1, k) of a step function held to the run's last token."""
    x = [r["tokens"] for r in run.mixture] + [max(run.summary["tokens"], run.mixture[-1]["tokens"])]
    w = [[r["sampling_weights"][d] for d in domains] for r in run.mixture]
    w.append(w[-1])
    return np.asarray(x, dtype=np.float64), np.asarray(w, dtype=np.float64)


def plot_weights(panels: Sequence[tuple[str, Run]], domains: Sequence[str], colours: dict, path: Path) -> None:
    """Stacked areas of the sampling weights vs tokens trained, one panel per run."""
    fig, axes = _panels(len(panels))
    for ax, (title, run) in zip(axes, panels):
        x, w = _weight_steps(run, domains)
        lower = np.zeros_like(x)
        for j, d in enumerate(domains):
            upper = lower + w[:, j]
            ax.fill_between(x, lower, upper, step="post", color=colours[d], linewidth=0, label=d)
            lower = upper
        ax.set_title(_short(title), fontsize=TITLE_SIZE)
        ax.set(xlim=(x[0], x[-1]), ylim=(0, max(1.0, float(lower.max()))),
               xlabel="tokens trained", ylabel="sampling weight (share)")
    _legend(fig, axes, "domain")
    fig.savefig(path, dpi=PLOT_DPI)


def _arm_curve(runs: Sequence[Run], domain: str) -> list[tuple[np.ndarray, np.ndarray, np.ndarray | None]]:
    """(tokens, mean loss, sd or None) for an arm: one mean curve when seeds share eval points, else one per seed."""
    xs = [np.array([e["tokens"] for e in r.evals]) for r in runs]
    ys = [np.array([e["losses"][domain] for e in r.evals]) for r in runs]
    if len(runs) > 1 and all(x.shape == xs[0].shape and np.array_equal(x, xs[0]) for x in xs):
        stack = np.stack(ys)  # (seeds, eval points)
        return [(xs[0], stack.mean(axis=0), stack.std(axis=0, ddof=1))]
    return [(x, y, None) for x, y in zip(xs, ys)]


def plot_val_loss(arms: dict[str, list[Run]], domains: Sequence[str], targets: dict[str, float | None] | None,
                  colours: dict, path: Path) -> None:
    """Validation loss vs tokens, one panel per domain, one line per arm (mean ± sd band over seeds)."""
    fig, axes = _panels(len(domains))
    for ax, d in zip(axes, domains):
        for arm, runs in arms.items():
            curves = _arm_curve(runs, d)
            label = arm if len(runs) == 1 else (
                f"{arm} (mean ± sd, {len(runs)} seeds)" if len(curves) == 1 else f"{arm} ({len(runs)} seeds)")
            for i, (x, y, sd) in enumerate(curves):
                ax.plot(x, y, color=colours[arm], linewidth=1.4, label=label if i == 0 else None)
                if sd is not None:
                    ax.fill_between(x, y - sd, y + sd, color=colours[arm], alpha=0.2, linewidth=0)
        if targets is not None and targets.get(d) is not None:
            ax.axhline(targets[d], color="0.4", linestyle="--", linewidth=1.0, label="target ℓ_target")
        ax.set_title(_short(d), fontsize=TITLE_SIZE)
        ax.set(xlabel="tokens trained", ylabel="validation loss (nats)")
    _legend(fig, axes, "arm")
    fig.savefig(path, dpi=PLOT_DPI)


def plot_velocity(panels: Sequence[tuple[str, Run]], domains: Sequence[str], colours: dict, path: Path) -> None:
    """Learning velocity V per domain at each weight update vs tokens, one panel per run."""
    fig, axes = _panels(len(panels))
    for ax, (title, run) in zip(axes, panels):
        recs = [r for r in run.mixture if r["velocity"] is not None]
        x = [r["tokens"] for r in recs]
        for d in domains:
            ax.plot(x, [r["velocity"][d] for r in recs], color=colours[d], marker="o", markersize=3,
                    linewidth=1.2, label=d)
        ax.set_title(_short(title), fontsize=TITLE_SIZE)
        ax.set(ylim=(-0.03, 1.03), xlabel="tokens trained",
               ylabel="velocity V (1 = no progress)")
    _legend(fig, axes, "domain")
    fig.savefig(path, dpi=PLOT_DPI)


def plot_online_targets(panels: Sequence[tuple[str, Run]], domains: Sequence[str], colours: dict,
                        path: Path) -> None:
    """Online targets vs tokens, one panel per domain: per run (keyed by arm in `colours`) the refitted target
    at each weight update (solid, markers) and the run's final validation loss (dashed, same colour), so a
    target that closes in on the dashed line predicted where the domain ended."""
    fig, axes = _panels(len(domains))
    for ax, d in zip(axes, domains):
        for arm, run in panels:
            recs = [r for r in run.mixture if r["step"] > 0 and r["targets"] is not None
                    and r["targets"].get(d) is not None]
            x = np.array([r["tokens"] for r in recs], dtype=np.float64)
            y = np.array([r["targets"][d] for r in recs], dtype=np.float64)
            ax.plot(x, y, color=colours[arm], marker="o", markersize=3, linewidth=1.2, label=arm)
            ax.axhline(run.summary["final_val_loss"][d], color=colours[arm], linestyle="--", linewidth=1.0)
        ax.set_title(_short(d), fontsize=TITLE_SIZE)
        ax.set(xlabel="tokens trained", ylabel="target (nats)")
    # The dashed lines carry no label of their own (one per arm would double the legend): one grey entry, an
    # empty line (it draws nothing and leaves the limits alone), says what they are.
    axes[0].plot([], [], color="0.4", linestyle="--", linewidth=1.0, label="final validation loss\n(the arm's colour)")
    _legend(fig, axes, "arm")
    fig.savefig(path, dpi=PLOT_DPI)


# ----------------------------------------------------------------------------------------------------------
# Target fits


def _stored_curve(fit: dict[str, Any], key: str) -> np.ndarray | None:
    """A [[tokens, loss], ...] curve of a targets.json entry as an (n, 2) array on tokens > 0, or None."""
    try:
        curve = np.asarray(fit.get(key) or [], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if curve.ndim != 2 or curve.shape[1] != 2 or not np.isfinite(curve).all():
        return None
    curve = curve[curve[:, 0] > 0]  # the x axis is logarithmic
    return curve if len(curve) >= 2 else None


def _chinchilla_curve(params: dict[str, Any], lo: float, hi: float) -> np.ndarray | None:
    """L(D) = E + B / D^beta on a log grid over [lo, hi], when params hold numeric E, B and beta."""
    if not all(isinstance(params.get(k), (int, float)) for k in ("E", "B", "beta")) or not 0 < lo < hi:
        return None
    x = np.geomspace(lo, hi, CURVE_POINTS)
    return np.column_stack([x, params["E"] + params["B"] / x ** params["beta"]])


def _drawn_curves(fit: dict[str, Any], points: np.ndarray, budget: float) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(fit curve over the proxy run, prediction curve to the budget) of one domain, each drawn with its own law.

    The curves targets.json stores when it has them; otherwise a Chinchilla fit is drawn from its E, B, beta
    (the law is one curve in tokens), and any other law not at all: a CPT-law curve depends on the LR
    schedule, which an entry without curves does not record, and the log-linear fallback has no curve.
    """
    fit_curve, prediction = _stored_curve(fit, "fit_curve"), _stored_curve(fit, "prediction_curve")
    if fit_curve is not None or prediction is not None or fit.get("predictor") != "chinchilla" or not len(points):
        return fit_curve, prediction
    params = fit.get("params") or {}
    lo, hi = float(points[:, 0].min()), float(points[:, 0].max())
    return _chinchilla_curve(params, lo, hi), (_chinchilla_curve(params, lo, budget) if budget > 0 else None)


def _target_panel(ax, domain: str, fit: dict[str, Any], budget: float, colour: Any,
                  static_runs: Sequence[Run], static_colour: Any) -> None:
    """One domain: proxy points, fitted law (solid), prediction to the budget (dashed), target, static run."""
    points = np.array([p for p in fit.get("points", []) if p[0] > 0], dtype=np.float64).reshape(-1, 2)
    if len(points):
        ax.scatter(points[:, 0], points[:, 1], s=16, color=colour, zorder=3)
    fit_curve, prediction = _drawn_curves(fit, points, budget)
    if prediction is not None:
        ax.plot(prediction[:, 0], prediction[:, 1], color=colour, linewidth=1.2, linestyle="--", zorder=2)
    if fit_curve is not None:
        ax.plot(fit_curve[:, 0], fit_curve[:, 1], color=colour, linewidth=1.4, linestyle="-", zorder=2.5)
    at = budget if budget > 0 else (float(prediction[-1, 0]) if prediction is not None else None)
    if isinstance(fit.get("target"), (int, float)) and at is not None:
        ax.plot([at], [fit["target"]], marker="*", markersize=12, linestyle="none", color=colour,
                markeredgecolor="black", zorder=4)
    for run in static_runs:
        ax.plot([run.summary["tokens"]], [run.summary["final_val_loss"][domain]], marker="X", markersize=8,
                linestyle="none", color=static_colour, zorder=5)
    predictor = fit.get("predictor")
    law = LAWS.get(predictor, (str(predictor),))[0] if predictor else "no fit"
    r2 = fit.get("r2")
    title = f"{_short(domain)}\n{law}" + (f", R² {r2:.3f}" if isinstance(r2, (int, float)) else "")
    ax.set_title(title, fontsize=TITLE_SIZE)
    ax.set(xlabel="tokens trained (D)", ylabel="validation loss (nats)")
    _log_tokens_axis(ax)


def _log_tokens_axis(ax) -> None:
    """A log x axis labelled like the others (200k, 1M); when it spans under a decade, also at 2, 3 and 5 × 10^k."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    ax.set_xscale("log")  # resets the formatters: set them again
    lo, hi = ax.get_xlim()
    eng = _tokens_formatter()
    ax.xaxis.set_major_formatter(eng)

    def minor(x: float, pos=None) -> str:
        mantissa = round(x / 10 ** math.floor(math.log10(x) + 1e-9))
        return eng(x, pos) if mantissa in (2, 3, 5) else ""

    ax.xaxis.set_minor_formatter(FuncFormatter(minor) if hi < 10 * lo else NullFormatter())


def _targets_legend(fig, predictors: set[str], static_runs: Sequence[Run], static_colour: Any) -> None:
    """Marker and line styles in neutral grey (each panel uses its domain's colour), then each law's form."""
    from matplotlib.lines import Line2D

    grey = "0.45"
    handles = [Line2D([], [], marker="o", markersize=5, linestyle="none", color=grey, label="proxy points"),
               Line2D([], [], color=grey, linewidth=1.4, label="fitted law on the proxy run"),
               Line2D([], [], color=grey, linewidth=1.2, linestyle="--",
                      label="same law along the main run\nto the budget"),
               Line2D([], [], marker="*", markersize=12, linestyle="none", color=grey, markeredgecolor="black",
                      label="predicted target at budget")]
    if static_runs:
        handles.append(Line2D([], [], marker="X", markersize=8, linestyle="none", color=static_colour,
                              label="static run, actual final loss"))
    # A law's line has no glyph: it explains the panel titles that name it.
    handles += [Line2D([], [], linestyle="none", label=form) for name, (_, form) in LAWS.items() if name in predictors]
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)


def targets_figure(targets_file: dict[str, Any], domains: Sequence[str], static_runs: Sequence[Run],
                   colours: dict, static_colour: Any):
    """The target-fit figure: one panel per domain (log x), the legend naming the laws that appear."""
    fits = targets_file.get("domains", {})
    budget = float(targets_file.get("budget_tokens") or 0.0)
    fig, axes = _panels(len(domains), legend_w=3.2)
    for ax, d in zip(axes, domains):
        _target_panel(ax, d, fits.get(d) or {}, budget, colours[d], static_runs, static_colour)
    predictors = {str((fits.get(d) or {}).get("predictor")) for d in domains}
    _targets_legend(fig, predictors, static_runs, static_colour)
    return fig


def plot_targets(targets_file: dict[str, Any], domains: Sequence[str], static_runs: Sequence[Run],
                 colours: dict, static_colour: Any, path: Path) -> None:
    """Per-domain target fits, each drawn with the law that made its prediction, saved as a PNG at `path`."""
    targets_figure(targets_file, domains, static_runs, colours, static_colour).savefig(path, dpi=PLOT_DPI)


def plot_plan(doc: dict[str, Any], path: Path) -> None:
    """plan.png: per domain, the chosen law's loss against the domain's own share (the other shares in w0's
    proportions) with the proxies' losses at the main budget, their leave-one-out predictions and the recommended
    mixture; last panel, every leave-one-out prediction against what the proxy gave."""
    names = doc["domains"]
    colours = domain_colours(names)
    R = np.array([[m["shares"][n] for n in names] for m in doc["mixtures"]])
    Y = np.array([[m["final"][n] for n in names] for m in doc["mixtures"]])
    w0 = np.array([doc["mixtures"][0]["shares"][n] for n in names])
    fig, axes = _panels(len(names) + 1, legend_w=2.6)
    for i, (ax, n) in enumerate(zip(axes, names)):
        fit = doc["fits"][n]
        lo, hi = doc["box"]["lo"][n], doc["box"]["hi"][n]
        s = np.linspace(max(0.0, lo - 0.05), min(1.0, hi + 0.05), 64)
        rest = np.delete(w0, i)
        rest = rest / rest.sum() if rest.sum() > 0 else np.full(rest.size, 1.0 / rest.size)
        curve = np.insert(np.outer(1 - s, rest), i, s, axis=1)  # (64, k): share s of domain i
        ax.plot(s, laws.plan_predict(doc, n, curve), color=colours[n], lw=1.4, label="the chosen law, other shares\n  in w0's proportions")
        ax.axvspan(lo, hi, color="0.9", zorder=0, label="shares the proxies ran")
        ax.scatter(R[:, i], Y[:, i], color=colours[n], s=18, zorder=3, label="proxy, at the main budget")
        loo = fit["candidates"][fit["law"]].get("loo_errors")
        if loo:
            y_loo = Y[:, i] + np.array([np.nan if e is None else e for e in loo])
            ax.scatter(R[:, i], y_loo, facecolors="none", edgecolors="0.3", s=26, zorder=3,
                       label="left-out prediction")
        ax.scatter([doc["recommended"][n]], [doc["predicted"][n]], marker="*", s=90, color="k", zorder=4,
                   label="recommended")
        ax.set_title(f"{_short(n, 24)} ({fit['law']} law)", fontsize=TITLE_SIZE)
        ax.set_xlabel(f"share of {_short(n, 16)}")
        ax.set_ylabel("loss at the main budget")
        ax.xaxis.set_major_formatter("{x:.2f}")
    ax = axes[-1]
    for i, n in enumerate(names):
        fit = doc["fits"][n]
        loo = fit["candidates"][fit["law"]].get("loo_errors")
        if loo:
            pred = Y[:, i] + np.array([np.nan if e is None else e for e in loo])
            ax.scatter(Y[:, i], pred, color=colours[n], s=18, label=n)
    lim = [float(np.nanmin(Y)) - 0.02, float(np.nanmax(Y)) + 0.02]
    ax.plot(lim, lim, color="0.4", lw=0.8, ls="--")
    ax.set_title("left-out mixtures", fontsize=TITLE_SIZE)
    ax.set_xlabel("proxy, at the main budget")
    ax.set_ylabel("law fitted without it")
    ax.xaxis.set_major_formatter("{x:.2f}")
    _legend(fig, axes)
    fig.savefig(path, dpi=PLOT_DPI)


# ----------------------------------------------------------------------------------------------------------
# All plots of a report


def make_plots(runs: Sequence[Run], arms: dict[str, list[Run]], domains: Sequence[str],
               reference_arm: str | None, out_dir: Path) -> dict[str, str]:
    """Write the plots into out_dir; {file name: caption} of those written, a stale copy removed otherwise."""
    dcol = domain_colours(domains)
    acol = arm_colours(list(arms), reference_arm)
    panels = _panel_runs(arms)
    reference = reference_targets(runs)
    written: dict[str, str] = {}

    plot_weights(panels, domains, dcol, out_dir / "weights.png")
    written["weights.png"] = "Sampling weights (stacked) vs tokens trained"
    plot_val_loss(arms, domains, reference.targets if reference else None, acol, out_dir / "val_loss.png")
    written["val_loss.png"] = "Validation loss per domain vs tokens trained, one line per arm"
    velocity_panels = [(t, r) for t, r in panels if any(m["velocity"] is not None for m in r.mixture)]
    if velocity_panels:
        plot_velocity(velocity_panels, domains, dcol, out_dir / "velocity.png")
        written["velocity.png"] = "Learning velocity per domain at each weight update"
    with_fits = next((r for r in runs if isinstance(r.targets_file, dict) and r.targets_file.get("domains")), None)
    if with_fits is not None:
        statics = arms.get(reference_arm, []) if reference_arm else []
        plot_targets(with_fits.targets_file, domains, statics, dcol, acol.get(reference_arm, "black"),
                     out_dir / "targets.png")
        written["targets.png"] = (f"Target fits from `{with_fits.name}`/targets.json: proxy points, each domain's "
                                  f"fitted law (solid) and its prediction to the budget (dashed), predicted target"
                                  + (", static run's actual final loss" if statics else ""))
    # Per arm its first seed that refits its targets (seeds of one arm share the config: the first one, as a rule).
    firsts = {arm: next((r for r in rs if refits_targets(r)), None) for arm, rs in arms.items()}
    online = [(arm, run) for arm, run in firsts.items() if run is not None]
    if online:
        plot_online_targets(online, domains, acol, out_dir / "online_targets.png")
        written["online_targets.png"] = ("Online targets per domain at each weight update (solid; each arm's first "
                                         "seed) and that run's final validation loss (dashed)")
    for name in PLOT_FILES:
        if name not in written:
            (out_dir / name).unlink(missing_ok=True)  # a stale plot from an earlier report would mislead
    return written


def run_plots(run_dir: Path, out_dir: Path) -> dict[str, str]:
    """The report's plots of one finished run (weights, validation loss, velocity and target fits where the run
    has them) into out_dir; {file name: caption}. `upload_plots` logs them to W&B at the end of training."""
    run = load_run(Path(run_dir))
    return make_plots([run], {run.arm: [run]}, run.domains, None, Path(out_dir))


def upload_plots(run_dir: Path, logger: Any, step: int) -> None:
    """The end-of-run hook of `velocitune train` (log.wandb): the report's plots of the finished run at
    `run_dir`, logged as images at `step` through `logger` (a `loggers.WandbLogger`: `images({tag: (PNG,
    caption)}, step)`). A plot that fails only warns: the run is complete and saved, a plot is not worth
    failing it."""
    with tempfile.TemporaryDirectory(prefix="velocitune-plots-") as tmp:
        try:
            written = run_plots(run_dir, Path(tmp))
        except Exception as exc:  # noqa: BLE001 - see the docstring
            print(f"warning: the report's plots were not logged to W&B ({exc}); "
                  f"draw them with `velocitune report {run_dir}`")
            return
        logger.images({f"plots/{Path(n).stem}": (Path(tmp) / n, caption) for n, caption in written.items()},
                      step=step)
