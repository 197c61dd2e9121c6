"""ADO, Adaptive Data Optimization (Jiang et al. 2024), as its authors ran it: per-domain scaling laws fitted online.

yidingjiang/ado @ 731863d, src/data_selectors/ado.py (AdoSelector.update / curr_dist / compute_scaling_law_params,
fit_scaling_law and its loss_fn), called after every optimizer step by src/dataloader/adaptive_loader.py with the
per-domain training loss of that step (y_axis "train_loss", the default none of their configs changes).

After every optimizer step s (their itr = s - 1; the rule asks for every step, docs/design.md §3):
  history  <- the step's per-domain training loss ℓ (k,), at x = n = s · samples_per_step;
  p_hist   <- γ·p_hist + (1-γ)·ŵ, γ = 0.9 (their EMA of each step's realised domain proportions);
  refit, at every itr >= start with itr % refit == 0 (start: mixing.warmup, their start_step = ignore_steps):
    per domain i, the law ℓ_i(n) = E_i + A_i / n^α_i (params (a, e, α) = (log A, log E, α)) is fitted to the
    Savitzky-Golay-filtered history (window 101, order 3), rows itr = start, start + 10, ..., by L-BFGS
    (`lbfgs`, all 512 starts of their 8 × 8 × 8 grid at once) on Σ huber_δ(log ℓ - log ℓ̂) + penalties,
    δ = 1e-3; per domain the final iterate of least objective is kept (a non-finite fit keeps the previous laws);
  from itr = start on, once a fit is valid:
  dist_i   ∝ max(α_i, 0.05) · (ℓ̂_i(n) - E_i) / n · w0_i · sqrt(p_hist_i (1 - p_hist_i)), clipped to >= 1e-2;
  w        <- 0.9·p_avg + 0.1·dist;  p_avg <- (1 - 1/s)·p_avg + dist/s (p_avg starts at w0).
w0 is their `empirical_dist` (the corpus's token shares, our default w0). The differences from their code are
listed in the README's rule table and docs/design.md §3.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from scipy.signal import savgol_filter

from velocitune.errors import CheckpointError, ConfigError
from velocitune.mixing import Rule, Update, normalize

__all__ = ["ADORule", "DEFAULTS", "GRID", "clip_min_probability", "fit_laws", "fit_objective", "law", "lbfgs", "make_ado",
           "smoothed", "target_distribution"]

# The authors' constants (ado.py at 731863d).
SAVGOL_WINDOW, SAVGOL_ORDER = 101, 3  # savgol_filter(task_loss, 101, 3) before every train-loss fit
FIT_STRIDE = 10  # one history point in ten enters the fit ([ignore_steps::10])
GAMMA = 0.9  # EMA of the realised proportions (p_history)
MIX = 0.1  # p = 0.9·p_avg + 0.1·dist
MIN_EXPONENT = 0.05  # "arbitrarily bound exponent to be >= 0.05" in curr_dist
HUBER_DELTA = 1e-3
MAX_ITER, GTOL = 200, 1e-5  # their LBFGS(maxiter=200, tol=1e-5)
HISTORY, MAX_LS = 10, 15  # jaxopt.LBFGS's defaults (history_size, maxls)
# The starting grid of every fit, (512, 3) columns (a, e, α), in their meshgrid order (indexing "ij").
GRID = np.stack(np.meshgrid(np.arange(-2.0, 6.0, 1.0), np.arange(-2.0, 2.0, 0.5), np.arange(0.0, 0.8, 0.1),
                            indexing="ij"), axis=-1).reshape(-1, 3)
# Parameters (mixing.params.<name>) and their defaults; bounds are checked by make_ado.
DEFAULTS: dict[str, Any] = {"refit": 0, "min_prob": 1e-2, "samples_per_step": 1.0, "starts": len(GRID)}


# ------------------------------------------------------------------------------------------------- the law


def law(params: np.ndarray, n: float | np.ndarray) -> np.ndarray:
    """ℓ̂(n) = exp(e) + exp(a) / n^α, params (k, 3) -> (k,) (their scaling_law)."""
    a, e, alpha = params[:, 0], params[:, 1], params[:, 2]
    return np.exp(e) + np.exp(a) / np.power(n, alpha)


def fit_objective(theta: np.ndarray, log_n: np.ndarray, log_loss: np.ndarray,
                  grad: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Their loss_fn and its gradient for N fits at once: theta (N, 3), log_n (T,), log_loss (N, T) -> (N,), (N, 3)
    (the gradient None when `grad` is False).

    Σ_t huber_δ(log ℓ_t - log(exp(a - α log n_t) + exp(e))) + max(α - 0.8, 0) - min(α, 0.001) + max(a - 6.5, 0)
    - min(e - 0.5, 0): the penalties keep α in [0, 0.8], a <= 6.5 and the irreducible loss exp(e) >= e^0.5.
    """
    a, e, alpha = theta[:, 0], theta[:, 1], theta[:, 2]
    gap = a[:, None] - alpha[:, None] * log_n - e[:, None]  # log(reducible / irreducible), (N, T)
    z = np.exp(-np.abs(gap))  # one exp: log(e^u + e^e) = max(u, e) + log(1 + z)
    r = log_loss - (np.maximum(gap, 0.0) + e[:, None] + np.log(1.0 + z))  # (N, T); z in (0, 1]
    ar = np.abs(r)
    f = np.where(ar > HUBER_DELTA, HUBER_DELTA * (ar - 0.5 * HUBER_DELTA), 0.5 * r * r).sum(axis=1)
    f += np.maximum(alpha - 0.8, 0) - np.minimum(alpha, 0.001) + np.maximum(a - 6.5, 0) - np.minimum(e - 0.5, 0)
    if not grad:
        return f, None
    dr = np.clip(r, -HUBER_DELTA, HUBER_DELTA)  # d huber / d r, (N, T)
    share = np.where(gap > 0, 1.0, z) / (1.0 + z)  # d pred / d u = sigmoid(gap), (N, T)
    ds = (dr * share).sum(axis=1)  # row sums only (no matmul): a fit does not depend on the batch it is in
    kink = lambda v, c: (v > c) + 0.5 * (v == c)  # noqa: E731 (d max(v - c, 0)/dv, jax's 1/2 at the tie)
    g = np.stack([-ds + kink(a, 6.5), -(dr.sum(axis=1) - ds) - kink(-e, -0.5),
                  (dr * share * log_n).sum(axis=1) + kink(alpha, 0.8) - kink(-alpha, -0.001)], axis=1)
    return f, g


def fit_laws(n: np.ndarray, losses: np.ndarray, starts: int = len(GRID)) -> np.ndarray:
    """Fit every domain's law to its points: n (T,) sample counts, losses (T, k) -> params (k, 3).

    Their fit: jaxopt's LBFGS from every point of the 8x8x8 grid (vmapped), the final iterate of least objective
    kept (nanargmin). Here `lbfgs` runs all starts × k domains at once; `starts` < 512 keeps the grid points of
    least initial objective (a cheaper fit; theirs: all 512). A domain whose points are not all finite and > 0
    gets NaN parameters (the rule then keeps its previous laws, as their check_valid does).
    """
    n = np.asarray(n, dtype=np.float64)
    losses = np.asarray(losses, dtype=np.float64).reshape(n.size, -1)
    k = losses.shape[1]
    out = np.full((k, 3), np.nan)
    ok = [i for i in range(k) if np.all(np.isfinite(losses[:, i])) and np.all(losses[:, i] > 0)]
    if not ok:
        return out
    log_n = np.log(n)
    log_loss = np.log(losses[:, ok].T)  # (k', T)
    if starts < len(GRID):  # per domain, the grid points of least initial objective, (k', starts)
        score = np.stack([fit_objective(GRID, log_n, np.broadcast_to(y, (len(GRID), n.size)))[0] for y in log_loss])
        pick = np.argsort(score, axis=1, kind="stable")[:, :starts]
    else:
        pick = np.broadcast_to(np.arange(len(GRID)), (len(ok), len(GRID)))
    x0 = GRID[pick].reshape(-1, 3)  # (k'·S, 3), domain-major
    ys = np.repeat(log_loss, pick.shape[1], axis=0)  # (k'·S, T)
    x, f = lbfgs(lambda th, rows, grad: fit_objective(th, log_n, ys[rows], grad), x0)
    f = np.where(np.isfinite(f), f, np.inf).reshape(len(ok), -1)
    best = np.argmin(f, axis=1)  # their nanargmin: the first of least objective; NaN never wins
    x = x.reshape(len(ok), -1, 3)[np.arange(len(ok)), best]
    out[ok] = np.where(np.isfinite(f[np.arange(len(ok)), best])[:, None], x, np.nan)
    return out


def _two_loop(g: np.ndarray, s: np.ndarray, y: np.ndarray, rho: np.ndarray) -> np.ndarray:
    """The L-BFGS direction -H·g for B problems: g (B, d), history s, y (B, m, d) newest last, rho (B, m); unused
    slots are zero (they leave q unchanged), and H0 = (s·y / y·y)·I from the newest pair (jaxopt's use_gamma)."""
    q = g.copy()
    alphas = np.zeros(rho.shape)
    for j in range(s.shape[1] - 1, -1, -1):  # newest to oldest
        alphas[:, j] = rho[:, j] * np.einsum("bd,bd->b", s[:, j], q)
        q -= alphas[:, j, None] * y[:, j]
    yy = np.einsum("bd,bd->b", y[:, -1], y[:, -1])
    q *= np.divide(1.0, rho[:, -1] * yy, out=np.ones_like(yy), where=yy > 0)[:, None]  # s·y / y·y, 1 when empty
    for j in range(s.shape[1]):  # oldest to newest
        b = rho[:, j] * np.einsum("bd,bd->b", y[:, j], q)
        q += (alphas[:, j] - b)[:, None] * s[:, j]
    return -q


def _armijo(fun, x: np.ndarray, f: np.ndarray, p: np.ndarray, slope: np.ndarray, t0: np.ndarray, rows: np.ndarray,
            maxls: int) -> np.ndarray:
    """The first of t0, t0/2, ..., t0/2^(maxls-1) with f(x + t·p) <= f + 1e-4·t·slope, per problem (NaN: none).

    Shapes (n, d), (n,), (n, d), (n,), (n,), (n,); each trial scores only the problems still searching."""
    out, t = np.full(t0.shape, np.nan), t0.copy()
    todo = np.arange(t0.size)
    for _ in range(maxls):
        ft, _ = fun(x[todo] + t[todo, None] * p[todo], rows[todo], False)
        ok = np.isfinite(ft) & (ft <= f[todo] + 1e-4 * t[todo] * slope[todo])
        out[todo[ok]] = t[todo[ok]]
        todo = todo[~ok]
        if todo.size == 0:
            break
        t[todo] *= 0.5
    return out


def lbfgs(fun: Callable[[np.ndarray, np.ndarray, bool], tuple[np.ndarray, Any]], x0: np.ndarray, *, maxiter: int = MAX_ITER,
          tol: float = GTOL, history: int = HISTORY, maxls: int = MAX_LS) -> tuple[np.ndarray, np.ndarray]:
    """Minimise B independent problems at once; returns the final (x (B, d), f (B,)). fun(x (n, d), rows (n,), grad) -> (f (n,),
    grad (n, d) or None) evaluates problems `rows` at x.

    jaxopt.LBFGS's defaults as ADO calls it: stop when ||grad|| <= tol or after maxiter iterations, history 10,
    H0 scaled by s·y / y·y, first trial step min(1.5 × the last accepted step, 1) (linesearch_init "increase").
    The line search backtracks by half (at most maxls trials) to the Armijo condition (c1 = 1e-4) rather than
    jaxopt's zoom; a pair with s·y <= 0 is not stored. A problem whose search fails keeps its point and stops.
    """
    x = np.array(x0, dtype=np.float64)
    b, d = x.shape
    f, g = fun(x, np.arange(b), True)
    s, y, rho = np.zeros((b, history, d)), np.zeros((b, history, d)), np.zeros((b, history))
    step = np.ones(b)
    live = np.isfinite(f) & (np.linalg.norm(g, axis=1) > tol)
    for _ in range(maxiter):
        if not live.any():
            break
        idx = np.flatnonzero(live)
        gi = g[idx]
        p = _two_loop(gi, s[idx], y[idx], rho[idx])  # the unused (zero) slots of a short history do nothing
        slope = np.einsum("bd,bd->b", p, gi)
        bad = ~(slope < 0)  # not a descent direction: steepest descent
        p[bad], slope[bad] = -gi[bad], -np.einsum("bd,bd->b", gi[bad], gi[bad])
        # The first trial step with the gradient (it is usually taken); halve the others' (value only).
        t = np.minimum(step[idx] * 1.5, 1.0)
        ft, gt = fun(x[idx] + t[:, None] * p, idx, True)
        first = np.isfinite(ft) & (ft <= f[idx] + 1e-4 * t * slope)
        rest = np.flatnonzero(~first)
        if rest.size:
            t[rest] = _armijo(fun, x[idx[rest]], f[idx[rest]], p[rest], slope[rest], t[rest] * 0.5, idx[rest],
                              maxls - 1)
            again = rest[np.isfinite(t[rest])]
            ft[again], gt[again] = fun(x[idx[again]] + t[again, None] * p[again], idx[again], True)
        accepted = first | np.isfinite(t)
        fn, gn = ft[accepted], gt[accepted]
        new = idx[accepted]
        sk, yk = t[accepted, None] * p[accepted], gn - g[new]
        sy = np.einsum("bd,bd->b", sk, yk)
        keep = sy > 1e-12
        kn = new[keep]
        s[kn], y[kn], rho[kn] = np.roll(s[kn], -1, axis=1), np.roll(y[kn], -1, axis=1), np.roll(rho[kn], -1, axis=1)
        s[kn, -1], y[kn, -1], rho[kn, -1] = sk[keep], yk[keep], 1.0 / sy[keep]
        x[new] += sk
        f[new], g[new], step[new] = fn, gn, t[accepted]
        live[idx[~accepted]] = False
        live[new] = np.linalg.norm(g[new], axis=1) > tol
    return x, f


def smoothed(losses: np.ndarray) -> np.ndarray:
    """Their Savitzky-Golay filter (window 101, order 3, along time) of the history (T, k); the window shrinks to
    the largest odd length <= T while the history is shorter (theirs would raise), and a history of fewer than
    SAVGOL_ORDER + 2 rows is fitted unfiltered."""
    t = losses.shape[0]
    window = min(SAVGOL_WINDOW, t if t % 2 else t - 1)
    if window <= SAVGOL_ORDER:
        return losses.copy()
    return savgol_filter(losses, window, SAVGOL_ORDER, axis=0)


# ------------------------------------------------------------------------------------------- the weights


def clip_min_probability(p: np.ndarray, floor: float) -> np.ndarray:
    """Their clip_min_probability: scale p to leave room for the floor, lift every entry to it, renormalise (k,)."""
    deficit = max(floor * p.size - p.sum(), 0.0)
    clipped = np.maximum(p * ((1.0 - deficit) / p.sum()), floor)
    return clipped / clipped.sum()


def target_distribution(params: np.ndarray, n: float, prior: np.ndarray, p_hist: np.ndarray,
                        floor: float) -> np.ndarray:
    """Their curr_dist before the averaging: dist_i ∝ max(α_i, 0.05)·(ℓ̂_i(n) - E_i)/n · w0_i·sqrt(p_i(1 - p_i)),
    clipped to >= floor. Shapes (k, 3), (k,), (k,) -> (k,). When every entry is 0 (one domain, or p_hist
    one-hot) or the slope overflows, dist is w0 before the clip."""
    reducible = law(params, n) - np.exp(params[:, 1])  # ℓ̂_i(n) - E_i, (k,)
    with np.errstate(over="ignore", invalid="ignore"):
        slope = np.maximum(params[:, 2], MIN_EXPONENT) * reducible / n
        weighted = slope * prior * np.sqrt(p_hist * (1.0 - p_hist))
    total = weighted.sum()
    dist = weighted / total if np.isfinite(total) and total > 0 else prior.copy()
    return clip_min_probability(dist, floor)


# ---------------------------------------------------------------------------------------------- the rule


class ADORule(Rule):
    """ADO as a mixing rule (module docstring): called after every optimizer step on the train signal.

    Step s (steps done) is their itr = s - 1. `schedule` asks the controller for every step from 1 on, so the
    history starts at the first step as theirs does, and takes `first` (mixing.warmup, by default 1/60 of the
    run: their 1000 of 60000 steps) as their start_step = ignore_steps. The laws are refitted at every itr >= start
    with itr % refit == 0 (refit 0: start, their update_interval 1000); the weights move from the first valid fit
    on (before it, their curr_dist is None: the update is skipped and nothing is recorded). The history holds one
    row (k floats) per step, so the state grows with the run.
    """

    def __init__(self, name: str, weights: np.ndarray, names: Sequence[str], *, refit: int, min_prob: float,
                 samples_per_step: float, starts: int):
        super().__init__(name, weights, names)
        self.refit, self.min_prob, self.samples_per_step, self.starts = refit, min_prob, samples_per_step, starts
        self.prior = self._initial.copy()  # their empirical_dist, (k,)
        self._start: int | None = None  # their start_step = ignore_steps (itr); None: the first update's itr
        self._reset()

    def schedule(self, first: int, steps: int) -> range:
        """The controller's hook (controller.rule_schedule): every step from 1; `first` is their start_step."""
        self._start = int(first)
        return range(1, int(steps))

    def _reset(self) -> None:
        self._steps: list[int] = []  # the step of every history row
        self._history: list[list[float]] = []  # per-domain training loss of every update, (T, k)
        self._params: np.ndarray | None = None  # the laws in force, (k, 3) columns (a, e, α)
        self._p_hist = self._initial.copy()  # EMA of ŵ, (k,)
        self._p_avg = self._initial.copy()  # running average of dist, (k,)

    def _fit(self, start: int) -> None:
        """Their compute_scaling_law_params: the filtered history's rows at itr = start, start + 10, ... ."""
        itr = np.array(self._steps) - 1
        take = (itr >= start) & ((itr - start) % FIT_STRIDE == 0)
        rows = smoothed(np.array(self._history))[take]  # (T', k)
        n = (itr[take] + 1).astype(np.float64) * self.samples_per_step  # their cumulative sample count
        with np.errstate(all="ignore"):
            params = fit_laws(n, rows, self.starts)
        if np.all(np.isfinite(params)):  # their check_valid: a fit with a NaN or inf keeps the previous laws
            self._params = params

    def _step(self, losses, init, targets, sampling_weights, *, step, observed) -> Update:
        itr = int(step) - 1
        if self._start is None:  # not run through the controller's schedule: the first update starts it
            self._start = itr
        self._steps.append(int(step))
        self._history.append(losses.tolist())
        realised = self._w if sampling_weights is None else sampling_weights
        self._p_hist = GAMMA * self._p_hist + (1.0 - GAMMA) * realised
        if itr >= self._start and itr % (self.refit or max(self._start, 1)) == 0:
            self._fit(self._start)
        if itr < self._start or self._params is None:  # their curr_dist returns None: the mixture stays
            return Update(self._w.copy(), skipped=True)
        dist = target_distribution(self._params, step * self.samples_per_step, self.prior, self._p_hist,
                                   self.min_prob)
        w = (1.0 - MIX) * self._p_avg + MIX * dist
        self._p_avg = (1.0 - 1.0 / step) * self._p_avg + dist / step  # their 1/(itr + 1)
        return Update(normalize(w), dist)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps": list(self._steps), "history": [list(r) for r in self._history],
                "params": None if self._params is None else self._params.tolist(), "start": self._start,
                "p_hist": self._p_hist.tolist(), "p_avg": self._p_avg.tolist()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        try:
            self._steps = [int(s) for s in state["steps"]]
            self._history = [[float(x) for x in row] for row in state["history"]]
            self._params = None if state["params"] is None else np.array(state["params"], dtype=np.float64)
            self._start = None if state["start"] is None else int(state["start"])
            self._p_hist = np.array(state["p_hist"], dtype=np.float64)
            self._p_avg = np.array(state["p_avg"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the checkpoint's ado state is incomplete or malformed ({e!r}); resume with the "
                                  "run's original checkpoint") from None


def _bounded(key: str, value: Any, lo: float, hi: float, integer: bool = False) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        v = math.nan
    if not (lo <= v <= hi) or (integer and v != int(v)):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"mixing.params.{key} (rule 'ado') must be {kind} in [{lo:g}, {hi:g}], got {value!r}")
    return int(v) if integer else v


def make_ado(name: str, w0: Mapping[str, float] | np.ndarray, names: Sequence[str], **params: Any) -> ADORule:
    """The `ado` rule over `names` from w0 (the registry's builder); params: DEFAULTS' keys (None: the default)."""
    unknown = sorted(set(params) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"rule 'ado' has no parameter {unknown[0]!r} (valid: {sorted(DEFAULTS)})")
    p = {key: DEFAULTS[key] if params.get(key) is None else params[key] for key in DEFAULTS}
    if len(set(names)) != len(names) or not names:
        raise ConfigError(f"domain names must be non-empty and distinct, got {list(names)}")
    w = np.array([w0[n] for n in names], dtype=np.float64) if isinstance(w0, Mapping) else np.asarray(w0, float)
    return ADORule(name, normalize(w), names,
                   refit=_bounded("refit", p["refit"], 0, math.inf, integer=True),
                   min_prob=_bounded("min_prob", p["min_prob"], 0.0, 1.0 / len(names)),
                   samples_per_step=_bounded("samples_per_step", p["samples_per_step"], 1e-12, math.inf),
                   starts=_bounded("starts", p["starts"], 1, len(GRID), integer=True))
