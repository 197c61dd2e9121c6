"""examples/: the launch recipes. Their configs load with every key checked, their scripts parse, and the
memory figures written in the configs' comments are what examples/estimate_memory.py computes today."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from velocitune.config import load_config
from velocitune.memory import shape_from_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CONFIGS = sorted(EXAMPLES.glob("*.yaml"))
# config -> (model config.json, the world sizes its comment gives figures for)
ESTIMATED = {"llama3-8b-fsdp2-8gpu.yaml": ("llama3-8b.json", (8, 64)), "smollm2-135m-1gpu.yaml": ("smollm2-135m.json", (1,))}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_example_configs_load(path):
    cfg = load_config(path)
    assert cfg.train.precision == "bf16" and cfg.mixing.rule == "velocitune"


def test_the_8b_recipe_is_fsdp2_with_checkpointing():
    cfg = load_config(EXAMPLES / "llama3-8b-fsdp2-8gpu.yaml")
    assert cfg.dist.strategy == "fsdp2" and cfg.train.activation_checkpointing == "block"
    assert cfg.train.batch_size % (8 * cfg.train.micro_batch_size) == 0  # 8 GPUs: whole accumulation steps
    assert cfg.train.batch_size % (64 * cfg.train.micro_batch_size) == 0  # and 64


@pytest.mark.parametrize("script", ["torchrun_1node.sh", "slurm_multinode.sbatch"])
def test_launch_scripts_parse_and_resume(script):
    path = EXAMPLES / script
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    assert "--resume" in path.read_text()  # a restart after preemption continues the run


def test_slurm_script_requeues_on_the_preemption_status():
    from velocitune.errors import PREEMPTED_EXIT

    text = (EXAMPLES / "slurm_multinode.sbatch").read_text()
    assert f"PREEMPTED_STATUS={PREEMPTED_EXIT}" in text and "scontrol requeue" in text


def test_model_shapes_from_config_json_count_the_published_parameters():
    assert round(shape_from_config(str(EXAMPLES / "model_configs" / "llama3-8b.json")).n_params / 1e9, 2) == 8.03
    assert round(shape_from_config(str(EXAMPLES / "model_configs" / "smollm2-135m.json")).n_params / 1e6, 1) == 134.5


@pytest.mark.parametrize("name", sorted(ESTIMATED))
def test_memory_figures_in_the_comments_are_current(name):
    model, worlds = ESTIMATED[name]
    out = subprocess.run([sys.executable, str(EXAMPLES / "estimate_memory.py"), str(EXAMPLES / name), "--model-config",
                          str(EXAMPLES / "model_configs" / model), "--world-size", *map(str, worlds)],
                         capture_output=True, text=True, check=True).stdout
    computed = [float(x) for x in re.findall(r": (\d+\.\d+) GiB \(", out)]
    assert len(computed) == len(worlds)
    comment = "\n".join(line for line in (EXAMPLES / name).read_text().splitlines() if line.startswith("#"))
    written = [float(x) for x in re.findall(r"(\d+\.\d+) GiB \(params", comment)]
    assert written == pytest.approx(computed, abs=0.05), (written, computed)


# ------------------------------------------------------------------------------------------ launchers


def _fake_repo(tmp_path: Path, script: str, venv_tool: str | None) -> tuple[Path, Path]:
    """A copy of `script` in REPO/examples/, REPO/.venv/bin/`venv_tool` (when given) echoing its arguments, and a
    bin/ directory of only the tools the scripts call, so that neither torchrun nor velocitune is on PATH."""
    import shutil

    repo, bin_dir = tmp_path / "repo", tmp_path / "bin"
    (repo / "examples").mkdir(parents=True)
    shutil.copy(EXAMPLES / script, repo / "examples" / script)
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "wc", "head", "env"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    fakes = {"srun": 'while [[ $1 == --* ]]; do shift; done\nexport SLURM_PROCID=0 SLURM_NTASKS=1 SLURM_LOCALID=0\n'
                     'exec "$@"', "scontrol": "echo node1"}
    for name, body in fakes.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    if venv_tool:
        (repo / ".venv" / "bin").mkdir(parents=True)
        fake = repo / ".venv" / "bin" / venv_tool
        fake.write_text(f'#!/bin/bash\necho "{venv_tool} $*"\necho "RANK=${{RANK:-}}"\n')
        fake.chmod(0o755)
    return repo, bin_dir


def _run_script(repo: Path, bin_dir: Path, script: str, *args: str, cwd: Path | None = None):
    env = {"PATH": str(bin_dir), "HOME": str(repo)}
    return subprocess.run([str(bin_dir / "bash"), str(repo / "examples" / script), *args], env=env,
                          capture_output=True, text=True, cwd=cwd or repo.parent)


def test_torchrun_script_finds_the_repositorys_venv_torchrun(tmp_path):
    repo, bin_dir = _fake_repo(tmp_path, "torchrun_1node.sh", "torchrun")
    out = _run_script(repo, bin_dir, "torchrun_1node.sh", "cfg.yaml", "2", "--train.steps=5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[0] == ("torchrun --standalone --nproc_per_node=2 -m velocitune train cfg.yaml "
                                          "--resume --train.steps=5")


def test_torchrun_script_without_torchrun_says_where_it_looked(tmp_path):
    repo, bin_dir = _fake_repo(tmp_path, "torchrun_1node.sh", None)
    out = _run_script(repo, bin_dir, "torchrun_1node.sh", "cfg.yaml", "2")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("error: torchrun not found") and f"{repo}/.venv/bin/torchrun" in out.stderr


def test_slurm_script_finds_the_repositorys_venv_python(tmp_path):
    repo, bin_dir = _fake_repo(tmp_path, "slurm_multinode.sbatch", "python")
    out = _run_script(repo, bin_dir, "slurm_multinode.sbatch", "cfg.yaml", "--train.steps=5")
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[:2] == ["python -m velocitune train cfg.yaml --resume --train.steps=5", "RANK=0"]


def test_slurm_script_without_python_says_where_it_looked(tmp_path):
    repo, bin_dir = _fake_repo(tmp_path, "slurm_multinode.sbatch", None)
    out = _run_script(repo, bin_dir, "slurm_multinode.sbatch", "cfg.yaml")
    assert out.returncode == 2
    assert out.stderr.startswith("error: no Python with velocitune found") and f"{repo}/.venv/bin/python" in out.stderr
