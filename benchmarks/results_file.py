"""Where a benchmark saves its figures: benchmarks/results/NAME.json, written atomically.

`VELOCITUNE_BENCH_RESULTS=DIR` sends them to DIR instead (the docs test runs `make bench` that way, so a
test never overwrites the figures a person measured).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from velocitune.fileio import atomic_write_json  # noqa: E402


def results_dir() -> Path:
    d = Path(os.environ.get("VELOCITUNE_BENCH_RESULTS") or ROOT / "benchmarks" / "results")
    d.mkdir(parents=True, exist_ok=True)
    return d


def save(name: str, record: Any) -> Path:
    """Write `record` as results_dir()/NAME.json (atomically) and return the path."""
    path = results_dir() / f"{name}.json"
    atomic_write_json(path, record)
    return path
