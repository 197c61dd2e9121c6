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
