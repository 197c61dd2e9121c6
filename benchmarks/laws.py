"""Benchmark: wall time of one single-domain scaling-law fit (10 points, default bootstrap).

Times fit_data_law, fit_cpt_law and fit_chinchilla with their defaults (bootstrap=200,
holdout=2) against the 2 s target, and, side by side in the same run, the data-law fit's
optimiser against the literal alternative it replaces (scipy L-BFGS-B run separately from each
of the 150 grid points), both without bootstrap or holdout, reporting the time ratio and the
objective each reaches. Prints the figures and saves benchmarks/results/laws.json.

Usage: PYTHONPATH=. python benchmarks/laws.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import time

import numpy as np
from results_file import save
from scipy.optimize import minimize

from velocitune import laws

TARGET_S = 2.0


def data_points(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """docs/design.md §4.1 curve: L = 1.6 + 120/D^0.3, 10 points over 2–20 % of 2e9, 0.2 % noise."""
    rng = np.random.default_rng(seed)
    D = np.linspace(0.02, 0.2, 10) * 2e9
    return D, (1.6 + 120.0 / D**0.3) * (1 + 2e-3 * rng.standard_normal(10))


def cpt_points(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 200-step proxy (10 warm-up, last 20 % annealed), evaluated 10 times, 0.1 % noise."""
    s = np.arange(1, 201)
    lrs = np.where(s <= 10, s / 10 * 1e-3, np.where(s <= 160, 1e-3, 1e-3 - (s - 160) / 40 * 9e-4))
    S1, S2 = laws.lr_areas(lrs, 10)
    steps = np.linspace(20, 200, 10).astype(int) - 1
    s1, s2 = S1[steps], S2[steps]
    clean = 2.5 - 0.6 * (1 - (1 + 30 * s1) ** -0.5) - 1.0 * s2
    return s1, s2, clean * (1 + 1e-3 * np.random.default_rng(seed).standard_normal(10))


def chinchilla_points(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """10 (N, D) points from Hoffmann et al.'s law, 0.1 % noise."""
    N = np.repeat(np.geomspace(1e7, 1e9, 5), 2)
    D = np.tile([2e9, 2e10], 5)
    L = 1.69 + 406.4 / N**0.34 + 410.7 / D**0.28
    return N, D, L * (1 + 1e-3 * np.random.default_rng(seed).standard_normal(10))


def literal_grid_lbfgsb(D: np.ndarray, L: np.ndarray, delta: float = 1e-3) -> float:
    """Σ Huber from scipy L-BFGS-B run from each of the 150 grid points of docs/design.md §4.1 (natural θ)."""
    x, y = np.log(D), np.log(L)

    def objective(theta):
        e, b, beta = theta
        t = b - beta * x
        lse = np.logaddexp(e, t)
        r = lse - y
        a = np.abs(r)
        value = np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta)).sum() / delta**2
        psi = np.clip(r, -delta, delta) / delta**2
        w_e, w_t = np.exp(e - lse), np.exp(t - lse)
        return value, np.array([psi @ w_e, psi @ w_t, -(psi * w_t) @ x])

    bounds = [(None, y.min()), (None, None), (0.0, 3.0)]
    best = math.inf
    for e in np.arange(-1, 1.01, 0.5):
        for b in np.arange(0, 25.1, 5):
            for beta in np.arange(0, 2.01, 0.5):
                res = minimize(objective, [min(e, y.min()), b, beta], jac=True,
                               method="L-BFGS-B", bounds=bounds,
                               options={"ftol": 1e-13, "gtol": 1e-10})  # fmt: skip
                best = min(best, float(res.fun))
    return best * delta**2


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def summary(seconds: list[float]) -> dict:
    return {
        "median_s": float(np.median(seconds)),
        "max_s": float(np.max(seconds)),
        "runs": len(seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    fits = {
        "fit_data_law": lambda seed: laws.fit_data_law(*data_points(seed)),
        "fit_cpt_law": lambda seed: laws.fit_cpt_law(*cpt_points(seed), 2.5),
        "fit_chinchilla": lambda seed: laws.fit_chinchilla(*chinchilla_points(seed)),
    }
    for fn in fits.values():  # warm imports and caches outside the timings
        fn(0)
    results: dict = {"target_s": TARGET_S, "points": 10, "bootstrap": 200, "holdout": 2}
    for name, fn in fits.items():
        results[name] = summary(
            [timed(lambda fn=fn, seed=seed: fn(seed))[0] for seed in range(args.repeats)]
        )

    ours_s, literal_s, gaps = [], [], []
    for seed in range(args.repeats):
        D, L = data_points(seed)
        t_ours, fit = timed(lambda D=D, L=L: laws.fit_data_law(D, L, bootstrap=0, holdout=0))
        t_lit, literal = timed(lambda D=D, L=L: literal_grid_lbfgsb(D, L))
        ours_s.append(t_ours)
        literal_s.append(t_lit)
        gaps.append((fit.loss - literal) / literal)
    results["data_law_optimizer_vs_literal_grid_lbfgsb"] = {
        "ours": summary(ours_s),
        "literal": summary(literal_s),
        "speedup_median": float(np.median(np.array(literal_s) / np.array(ours_s))),
        "max_relative_objective_gap": float(np.max(gaps)),
    }
    results["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_1min": os.getloadavg()[0],
    }

    for name in fits:
        r = results[name]
        verdict = "ok" if r["median_s"] <= TARGET_S else "OVER TARGET"
        print(f"{name:16s} median {r['median_s']:.3f} s  max {r['max_s']:.3f} s  "
              f"(target {TARGET_S} s: {verdict})")  # fmt: skip
    cmp = results["data_law_optimizer_vs_literal_grid_lbfgsb"]
    print(f"data-law optimiser: ours {cmp['ours']['median_s']:.3f} s vs literal 150x L-BFGS-B "
          f"{cmp['literal']['median_s']:.3f} s (x{cmp['speedup_median']:.1f}); objective gap "
          f"{cmp['max_relative_objective_gap']:+.2e} (negative: ours lower)")  # fmt: skip
    print(f"1-min load average during the run: {results['machine']['load_1min']:.2f}")

    out = save("laws", results)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
