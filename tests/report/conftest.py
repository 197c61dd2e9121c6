"""Reports over fabricated runs, written once per module: one seed per arm (`single`) and several (`multi`)."""

from __future__ import annotations

import numpy as np
import pytest
from report.rundirs import DOMAINS, fabricate_run

from velocitune.report import make_report


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    runs = [
        # a static run without targets of its own: its progress borrows the velocitune run's targets
        fabricate_run(root, "static-s0", arm="static", rule="static", final={"math": 2.9, "code": 2.5, "prose": 2.55},
                      wall=250.0, t_eval=30.0, t_update=0.0, targets=None),
        fabricate_run(root, "velo-s0", arm="velocitune", rule="velocitune",
                      final={"math": 2.7, "code": 2.45, "prose": 2.6}, wall=320.0, t_eval=45.0, t_update=1.5),
        fabricate_run(root, "velo-train-s0", arm="velocitune-train", rule="velocitune", signal="train",
                      final={"math": 2.75, "code": 2.4, "prose": 2.58}, wall=260.0, t_eval=30.0, t_update=1.2),
    ]
    out = root / "report"
    path = make_report(runs, out)
    return runs, out, path.read_text()


def noisy_final(base: dict[str, float], seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return {d: base[d] + float(rng.normal(0, 0.02)) for d in DOMAINS}


@pytest.fixture(scope="module")
def multi(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi")
    runs = []
    arms = {  # arm -> (rule, seeds, base losses)
        "static": ("static", [0, 1, 2], {"math": 2.9, "code": 2.5, "prose": 2.55}),
        "velocitune": ("velocitune", [0, 1, 2], {"math": 2.7, "code": 2.45, "prose": 2.6}),
        "dbl": ("dbl", [5, 6], {"math": 2.8, "code": 2.35, "prose": 2.57}),
    }
    for arm, (rule, seeds, base) in arms.items():
        for seed in seeds:
            # dbl's seeds evaluate at different points: its curves cannot be averaged, only drawn per seed
            runs.append(fabricate_run(root, f"{arm}-s{seed}", arm=arm, rule=rule, seed=seed,
                                      final=noisy_final(base, 100 * seed + len(arm)), wall=200.0 + 10 * seed,
                                      n_evals=seed + 2 if arm == "dbl" else 7))
    out = root / "report"
    md = make_report(runs, out, title="Three arms").read_text()
    return runs, out, md
