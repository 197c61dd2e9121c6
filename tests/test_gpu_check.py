"""benchmarks/gpu_check.py, the one-shot GPU verification: what it does without a GPU, and its part runner
(time limits, failures recorded rather than raised). The GPU parts themselves run only on a CUDA machine."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(REPO / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_without_cuda_nothing_is_checked_or_written(gpu_check, monkeypatch, tmp_path, capsys):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("VELOCITUNE_BENCH_RESULTS", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    assert gpu_check.main() == 0
    assert "no CUDA device here" in capsys.readouterr().out and not list(tmp_path.iterdir())


def test_part_runner_records_status_time_limit_and_output(gpu_check, tmp_path):
    ok = gpu_check.run_part([sys.executable, "-c", "print('fine')"], limit=30, cwd=tmp_path)
    assert ok["status"] == "passed" and ok["returncode"] == 0 and "fine" in ok["output_tail"]
    bad = gpu_check.run_part([sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"], limit=30, cwd=tmp_path)
    assert bad["status"] == "failed" and bad["returncode"] == 3 and "boom" in bad["output_tail"]
    slow = gpu_check.run_part([sys.executable, "-c", "import time; time.sleep(30)"], limit=1, cwd=tmp_path)
    assert slow["status"] == "timed_out" and slow["returncode"] is None and 1 <= slow["seconds"] < 20


def test_the_parts_fit_the_eight_minute_budget(gpu_check):
    assert set(gpu_check.LIMITS) == set(gpu_check.PARTS)
    assert sum(gpu_check.LIMITS.values()) <= 8 * 60 - 30  # start-up and data preparation need the rest
