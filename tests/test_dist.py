"""Distributed training on CPU with gloo: torchrun DDP/FSDP2 runs against one process, kill and resume at
the same and at another world size, sharded (DCP) and full checkpoint states, multi-node rendezvous on
localhost, `accelerate launch`, and the token stream's independence of the world size.

The default suite launches four commands (DDP reference, FSDP2 killed and resumed, accelerate) plus two
spawned gloo ranks; `-m dist` adds an exact DDP kill/resume and two "nodes" meeting by rendezvous."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from velocitune import dist, dist_checkpoint
from velocitune.config import dump_yaml
from velocitune.errors import CheckpointError, ConfigError, TrainingError
from velocitune.fileio import read_jsonl
from velocitune.sampler import MixtureSampler, rank_slice
from velocitune.train import train

REPO = Path(__file__).resolve().parents[1]
NAMES = ["prose", "code", "math"]
STEPS = 16
# Updates at 2, 4, …, 14 (eval signal: the val sets are sharded across ranks); checkpoints at 4, 8, 12.
RUN_SECTIONS = {
    "train": {"steps": STEPS},
    "mixing": {"interval": 2},
    "eval": {"max_tokens": 128},
    "log": {"interval": 1},
    "checkpoint": {"interval": 4, "keep": 4},
}
LAUNCH_TIMEOUT = 180  # seconds; a hung collective fails the test instead of the suite


# --------------------------------------------------------------------------- launching


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """The test's environment minus any launcher variables, with one thread per process and no hub."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]), **extra)
    return env


def descendants(pid: int) -> list[int]:
    """Process ids below `pid` (torchrun starts its workers in their own sessions, so a process-group
    kill would miss them)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        found += kids
        todo += kids
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process it started, workers first (a machine failing mid-step)."""
    for pid in reversed(descendants(proc.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.kill()
    proc.wait()


def start(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env or launch_env(),
                            cwd=log.parent)


def finish(procs: list[subprocess.Popen], logs: list[Path], timeout: float = LAUNCH_TIMEOUT) -> None:
    """Wait for launched commands; on a failure or timeout, kill them all and fail showing their output."""
    deadline = time.monotonic() + timeout
    failed = None
    for p in procs:
        try:
            if p.wait(timeout=max(1.0, deadline - time.monotonic())) != 0:
                failed = f"exit status {p.returncode}"
        except subprocess.TimeoutExpired:
            failed = f"timed out after {timeout:.0f}s"
        if failed:
            break
    if failed:
        for p in procs:
            if p.poll() is None:
                kill_tree(p)
        tails = "\n".join(f"==== {log.name}\n{log.read_text()[-6000:]}" for log in logs)
        pytest.fail(f"{' '.join(map(str, procs[0].args))}: {failed}\n{tails}")


def run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    finish([start(cmd, log, env)], [log])


def torchrun(n: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "velocitune", *args]


def train_args(yaml: Path, out: Path, *overrides: str) -> list[str]:
    return ["train", str(yaml), f"--run.out_dir={out}", *overrides]


# --------------------------------------------------------------------------- reading runs


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_jsonl(out / "metrics.jsonl")]


def weights(out: Path) -> list[tuple[int, list[float]]]:
    return [(r["step"], [r["weights"][n] for n in NAMES]) for r in read_jsonl(out / "mixture.jsonl")]


def summary(out: Path) -> dict:
    return json.loads((out / "summary.json").read_text())


def assert_same_run(got: Path, ref: Path, loss_tol: float, weight_tol: float) -> None:
    """Same per-step losses and mixture weights, every step logged once, the same updates."""
    a, b = losses(got), losses(ref)
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([x for _, x in a], [x for _, x in b], rtol=0, atol=loss_tol)
    wa, wb = weights(got), weights(ref)
    assert [s for s, _ in wa] == [s for s, _ in wb] == [0, 2, 4, 6, 8, 10, 12, 14]
    np.testing.assert_allclose([w for _, w in wa], [w for _, w in wb], rtol=0, atol=weight_tol)
    # The weights did move: equal weights would also be equal if the rule never ran.
    assert not np.allclose(wb[0][1], wb[-1][1], atol=1e-3)


def jsonl_steps(path: Path) -> list[int]:
    """Steps of the complete records of a JSONL file another process is appending to."""
    if not path.is_file():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            break  # a line being written
    return steps


# --------------------------------------------------------------------------- shared runs (module scope)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_prepared) -> Path:
    root = tmp_path_factory.mktemp("dist_runs")
    (root / "run.yaml").write_text(dump_yaml(tiny_config(tiny_prepared, root / "unused", **RUN_SECTIONS)))
    return root


@pytest.fixture(scope="module")
def ddp2(runs) -> Path:
    """The reference: two processes, DDP, one micro-batch of 4 each, weights checked on every rank."""
    out = runs / "ddp2"
    run(torchrun(2, *train_args(runs / "run.yaml", out, "--dist.check_weights=true")), runs / "ddp2.log")
    return out


def kill_after_update(runs: Path, name: str, *overrides: str) -> Path:
    """A two-process run SIGKILLed (workers, then the launcher) once a weight update past its first
    checkpoint is on disk, as a machine failure would leave it."""
    out = runs / name
    log = runs / f"{name}.log"
    proc = start(torchrun(2, *train_args(runs / "run.yaml", out, *overrides)), log)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (out / "checkpoints" / "step_00000004").is_dir() and max(jsonl_steps(out / "mixture.jsonl"), default=0) >= 6:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
        else:
            pytest.fail(f"the run ended (status {proc.returncode}) before it could be killed:\n{log.read_text()[-6000:]}")
    assert not (out / "summary.json").exists()
    assert max(jsonl_steps(out / "mixture.jsonl")) < STEPS - 2, "killed too late to test a resume"
    return out


@pytest.fixture(scope="module")
def fsdp2_killed(runs) -> Path:
    """FSDP2 with two micro-batches of 2 per rank (exercises set_requires_gradient_sync), killed at ~step 6."""
    return kill_after_update(runs, "fsdp2_killed", "--dist.strategy=fsdp2", "--train.micro_batch_size=2")


@pytest.fixture(scope="module")
def fsdp2_resumed(runs, fsdp2_killed) -> Path:
    out = runs / "fsdp2_resumed"
    shutil.copytree(fsdp2_killed, out)
    run(torchrun(2, *train_args(runs / "run.yaml", out, "--resume", "--dist.strategy=fsdp2", "--train.micro_batch_size=2")),
        runs / "fsdp2_resumed.log")
    assert "resumed from step" in (runs / "fsdp2_resumed.log").read_text()
    return out


# --------------------------------------------------------------------------- end-to-end runs


def in_process(prepared: Path, out: Path, resume: bool = False, **train_keys) -> Path:
    """One process, run inside pytest (the code path of `velocitune train`, without paying its imports again)."""
    sections = {**RUN_SECTIONS, "train": {**RUN_SECTIONS["train"], **train_keys}}
    with pytest.MonkeyPatch.context() as mp:
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            mp.delenv(var, raising=False)
        train(tiny_config(prepared, out, **sections), resume=resume)
    return out


def test_two_processes_equal_one_process_with_accumulation(tiny_prepared, ddp2, tmp_path, capsys):
    # dist.check_weights=true made every rank compare its float64 weights with rank 0's at each update.
    one = in_process(tiny_prepared, tmp_path / "accum1", micro_batch_size=4)
    assert "1 process(es), 2 micro-batch(es) of 4" in capsys.readouterr().out
    assert "2 process(es), 1 micro-batch(es) of 4" in (ddp2.parent / "ddp2.log").read_text()
    assert summary(ddp2)["world_size"] == 2 and summary(one)["world_size"] == 1
    assert_same_run(one, ddp2, loss_tol=1e-6, weight_tol=1e-9)
    assert summary(one)["tokens_per_domain"] == summary(ddp2)["tokens_per_domain"]
    # Evaluation is sharded across ranks and all-reduced: the same val losses as one process.
    ev1, ev2 = read_jsonl(one / "eval.jsonl"), read_jsonl(ddp2 / "eval.jsonl")
    assert [r["step"] for r in ev1] == [r["step"] for r in ev2]
    np.testing.assert_allclose([[r["losses"][n] for n in NAMES] for r in ev1],
                               [[r["losses"][n] for n in NAMES] for r in ev2], rtol=0, atol=1e-6)


def test_killed_fsdp2_run_resumes_to_the_ddp_result(fsdp2_resumed, ddp2):
    # fully_shard runs on CPU/gloo in torch 2.13. Reduce-scatter sums in another order than DDP's
    # all-reduce, so FSDP2 agrees with DDP to fp32 rounding, not bitwise; a resume that lost anything
    # (Adam moments or step, LR position, sampler or rule state) would miss by orders of magnitude more.
    assert summary(fsdp2_resumed)["world_size"] == 2
    assert_same_run(fsdp2_resumed, ddp2, loss_tol=1e-5, weight_tol=1e-6)
    from transformers import AutoModelForCausalLM

    a = AutoModelForCausalLM.from_pretrained(fsdp2_resumed / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(ddp2 / "final").state_dict()
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


def test_two_process_checkpoint_resumes_in_one_process(tiny_prepared, fsdp2_killed, ddp2, tmp_path, capsys):
    out = tmp_path / "resumed1"
    shutil.copytree(fsdp2_killed, out)
    in_process(tiny_prepared, out, resume=True, micro_batch_size=4)
    assert "resumed from step" in capsys.readouterr().out
    assert summary(out)["world_size"] == 1
    assert_same_run(out, ddp2, loss_tol=1e-5, weight_tol=1e-6)


def test_fsdp2_run_writes_sharded_dcp_checkpoints(fsdp2_resumed):
    ckpts = fsdp2_resumed / "checkpoints"
    assert sorted(p.name for p in (ckpts / dist_checkpoint.SHARDED_DIR).iterdir()) == ["step_00000004", "step_00000008", "step_00000012"]
    assert not (ckpts / "step_00000008" / "model.pt").exists()


@pytest.mark.dist
def test_killed_ddp_run_resumes_exactly(runs, ddp2, tmp_path):
    out = tmp_path / "ddp_resumed"
    shutil.copytree(kill_after_update(runs, "ddp_killed"), out)
    run(torchrun(2, *train_args(runs / "run.yaml", out, "--resume")), tmp_path / "resume.log")
    assert "resumed from step" in (tmp_path / "resume.log").read_text()
    assert_same_run(out, ddp2, loss_tol=1e-6, weight_tol=1e-9)


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of torchrun's worker of `rank` (read from the workers' environments)."""
    for pid in descendants(launcher.pid):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
            return pid
    raise AssertionError(f"no worker of rank {rank} under torchrun (pid {launcher.pid})")


@pytest.mark.dist
@pytest.mark.parametrize("target", ["rank1", "launcher"])
def test_preempted_ranks_stop_at_the_same_step_and_resume_exactly(runs, ddp2, tmp_path, target):
    """SIGTERM to one worker only (rank 1: rank 0, which writes the checkpoint, never sees a signal and must
    stop by the ranks' agreement), or to torchrun, which forwards it to every worker: both ranks stop at the
    same step with a complete checkpoint there, and `--resume` ends equal to the uninterrupted run."""
    out, log = tmp_path / "preempted", tmp_path / "preempted.log"
    proc = start(torchrun(2, *train_args(runs / "run.yaml", out)), log)
    try:
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while max(jsonl_steps(out / "metrics.jsonl"), default=0) < 3 and proc.poll() is None:
            assert time.monotonic() < deadline, log.read_text()[-6000:]
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before the signal:\n{log.read_text()[-6000:]}"
        os.kill(worker_pid(proc, 1) if target == "rank1" else proc.pid, signal.SIGTERM)
        rc = proc.wait(timeout=LAUNCH_TIMEOUT)
    finally:
        if proc.poll() is None:
            kill_tree(proc)
    text = log.read_text()
    # torchrun reports a worker's non-zero status (or its own signal) with status 1; the workers' own is 75.
    assert rc == 1, text[-6000:]
    if target == "rank1":
        assert "exitcode  : 75" in text, text[-6000:]
    stops = re.findall(r"preempted by SIGTERM at step (\d+): checkpoint written; continue with the same command "
                       r"and --resume \(exit status 75\)", text)
    assert len(stops) == 1, text[-6000:]  # rank 0 says it, once
    step = int(stops[0])
    assert 3 <= step < STEPS
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts[-1] == f"step_{step:08d}", ckpts  # written collectively: both ranks reached it
    assert max(jsonl_steps(out / "metrics.jsonl")) == step and not (out / "summary.json").exists()

    run(torchrun(2, *train_args(runs / "run.yaml", out, "--resume")), tmp_path / "resume.log")
    assert f"resumed from step {step}" in (tmp_path / "resume.log").read_text()
    assert_same_run(out, ddp2, loss_tol=0, weight_tol=0)
    from safetensors.torch import load_file

    got, ref = load_file(out / "final" / "model.safetensors"), load_file(ddp2 / "final" / "model.safetensors")
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


@pytest.mark.dist
def test_fsdp2_with_cpu_offload_trains_like_ddp(runs, ddp2, tmp_path):
    # CPUOffloadPolicy keeps the shards, gradients and AdamW state on the host; on CPU/gloo the arithmetic is
    # FSDP2's own, so it agrees with DDP to fp32 rounding, as the plain FSDP2 run does.
    out = tmp_path / "offload"
    run(torchrun(2, *train_args(runs / "run.yaml", out, "--dist.strategy=fsdp2", "--dist.fsdp_cpu_offload=true")),
        tmp_path / "offload.log")
    assert_same_run(out, ddp2, loss_tol=1e-5, weight_tol=1e-6)


@pytest.mark.dist
@pytest.mark.parametrize("strategy, tol", [("ddp", (1e-6, 1e-9)), ("fsdp2", (1e-5, 1e-6))])
def test_activation_checkpointing_under_torchrun_trains_like_ddp(runs, ddp2, tmp_path, strategy, tol):
    # Per-block recompute inside DDP's and FSDP2's hooks: the same training as the plain DDP reference (DDP to
    # its own tolerance, FSDP2 to fp32 rounding as without checkpointing).
    out = tmp_path / f"ckpt_{strategy}"
    run(torchrun(2, *train_args(runs / "run.yaml", out, f"--dist.strategy={strategy}",
                                "--train.activation_checkpointing=block")), tmp_path / "ckpt.log")
    assert_same_run(out, ddp2, loss_tol=tol[0], weight_tol=tol[1])


@pytest.mark.dist
def test_fsdp2_in_a_group_of_one_under_torchrun(runs, ddp2, tmp_path):
    # torchrun --nproc_per_node=1 with FSDP2 joins a process group of one and shards over it (the single-GPU
    # path of dist.fsdp_cpu_offload, and gpu_check's FSDP2 part): the same training as the DDP reference.
    out = tmp_path / "fsdp2_one"
    run(torchrun(1, *train_args(runs / "run.yaml", out, "--dist.strategy=fsdp2", "--train.activation_checkpointing=block")),
        tmp_path / "one.log")
    assert summary(out)["world_size"] == 1
    assert (out / "checkpoints" / dist_checkpoint.SHARDED_DIR).is_dir()  # FSDP2 wrote sharded (DCP) checkpoints
    assert_same_run(out, ddp2, loss_tol=1e-5, weight_tol=1e-6)


@pytest.mark.dist
def test_fsdp2_with_val_windows_uneven_across_ranks(runs, tmp_path):
    # 17 val windows per domain: rank 0 evaluates 9 (two batches of 8), rank 1 evaluates 8 (one batch).
    out, log = tmp_path / "uneven", tmp_path / "uneven.log"
    cmd = torchrun(2, *train_args(runs / "run.yaml", out, "--dist.strategy=fsdp2", "--eval.max_tokens=544",
                                  "--train.steps=4", "--checkpoint.interval=2"))
    finish([start(cmd, log)], [log], timeout=60)
    assert summary(out)["complete"]


@pytest.mark.dist
def test_two_nodes_on_localhost(runs, ddp2, tmp_path):
    """Two torchrun agents, one process each, meeting through the c10d rendezvous (as on two machines)."""
    out = tmp_path / "nodes"
    endpoint = f"127.0.0.1:{free_port()}"
    cmds = [[sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={i}", "--nproc_per_node=1",
             "--rdzv_backend=c10d", f"--rdzv_endpoint={endpoint}", "--rdzv_id=velocitune-test",
             "-m", "velocitune", *train_args(runs / "run.yaml", out)] for i in range(2)]
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    finish([start(c, log) for c, log in zip(cmds, logs)], logs)
    assert summary(out)["world_size"] == 2
    assert_same_run(out, ddp2, loss_tol=1e-6, weight_tol=1e-9)


def test_accelerate_launch_single_cpu_process(runs, ddp2, tmp_path):
    pytest.importorskip("accelerate")
    out = tmp_path / "accel"
    # HF_HOME in tmp_path: no user accelerate config is read, and the flags leave nothing to prompt for.
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--cpu",
           "-m", "velocitune", *train_args(runs / "run.yaml", out, "--train.micro_batch_size=4")]
    run(cmd, tmp_path / "accel.log", launch_env(HF_HOME=str(tmp_path / "hf")))
    assert summary(out)["world_size"] == 1
    assert_same_run(out, ddp2, loss_tol=1e-6, weight_tol=1e-9)


# --------------------------------------------------------------------------- token stream vs world size


def test_global_token_stream_is_independent_of_world_size():
    """Every rank builds its own sampler, applies the same weight updates and takes its rank_slice of
    every micro-batch; laid side by side, the ranks' rows are the one-process stream, for 1, 2 and 4 ranks."""
    B, steps = 8, 12
    updates = {3: [0.6, 0.3, 0.1], 7: [0.1, 0.2, 0.7], 8: [0.34, 0.33, 0.33]}

    def sampler():
        return MixtureSampler(seed=7, global_batch=B, windows_per_domain=[50, 120, 400],
                              initial_weights=[0.2, 0.3, 0.5], names=NAMES)

    def stream(world: int, n_micro: int) -> np.ndarray:
        ranks = [sampler() for _ in range(world)]
        rows = []  # (steps, B, 2): (domain, window) of every row of every global batch
        for t in range(steps):
            parts = []
            for r, s in enumerate(ranks):
                if t in updates:
                    s.set_weights(t, updates[t])
                plan = s.plan(t)
                for j in range(n_micro):
                    sl = rank_slice(B, r, world, j, n_micro)
                    assert sl.stop - sl.start == B // (world * n_micro)
                    parts.append(np.stack([plan.domains[sl], plan.windows[sl]], axis=1))
            rows.append(np.concatenate(parts))
        return np.stack(rows)

    ref = stream(1, 1)
    assert ref.shape == (steps, B, 2)
    assert len(np.unique(ref[:, :, 0])) == 3  # all domains drawn: the comparison is not vacuous
    for world in (1, 2, 4):
        for n_micro in (1, 2):
            np.testing.assert_array_equal(stream(world, n_micro), ref, err_msg=f"world {world}, {n_micro} micro")
    with pytest.raises(ConfigError, match="multiple of world size"):
        rank_slice(B, 0, 3)


# --------------------------------------------------------------------------- dist.py in one process


def _tiny_model_and_optimizer(env: dist.DistEnv | None = None, strategy: str = "ddp"):
    """A small Llama and its AdamW (two groups, as train.py builds it); wrapped before the optimizer
    exists, since fully_shard replaces the parameters."""
    from velocitune.model import build_model

    model = build_model(vocab_size=64, hidden_size=16, n_layers=2, n_heads=2, intermediate_size=32, max_seq_len=32)
    net = dist.wrap_model(model, strategy, env or dist.DistEnv(), bf16=False)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}], lr=1e-2)
    return model, net, opt


def _train_step(net, opt, seed: int) -> None:
    x = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(seed))
    net(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _assert_same_state(a: tuple[dict, dict], b: tuple[dict, dict]) -> None:
    (ma, oa), (mb, ob) = a, b
    assert ma.keys() == mb.keys() and len(ma) > 0
    for key in ma:
        torch.testing.assert_close(ma[key], mb[key], rtol=0, atol=0)
    assert oa["state"].keys() == ob["state"].keys() and len(oa["state"]) > 0
    for name, s in oa["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(torch.as_tensor(s[key]), torch.as_tensor(ob["state"][name][key]), rtol=0, atol=0)
    assert [g["weight_decay"] for g in oa["param_groups"]] == [g["weight_decay"] for g in ob["param_groups"]]


def test_single_process_environment(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = dist.init("cpu")
    assert (env.rank, env.world_size, env.is_main, env.distributed) == (0, 1, True, False)
    model, net, _ = _tiny_model_and_optimizer(env)
    assert net is model
    assert dist.transformer_blocks(model) == list(model.model.layers) and len(model.model.layers) == 2
    t = torch.tensor([1.0, 2.0])
    assert dist.all_reduce_sum(t, env) is t and t.tolist() == [1.0, 2.0]
    assert dist.broadcast_object({"a": 1}, env) == {"a": 1}
    with dist.grad_sync(net, enabled=False):
        pass
    if not torch.cuda.is_available():
        assert dist.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            dist.resolve_device("cuda")
        monkeypatch.setenv("WORLD_SIZE", "2")
        with pytest.raises(ConfigError, match="nccl needs GPUs"):
            dist.init("cpu", "nccl")


def test_positional_optimizer_checkpoint_is_rekeyed_by_name():
    """Checkpoints from before name-keyed optimizer states still load, and training continues identically."""
    torch.manual_seed(0)
    model, net, opt = _tiny_model_and_optimizer()
    _train_step(net, opt, 1)
    legacy_model, legacy_optim = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    assert all(isinstance(i, int) for i in legacy_optim["state"])

    by_name = dist_checkpoint.optim_state_by_name(legacy_optim, model, opt)
    order = [n for n, p in model.named_parameters() if p.dim() >= 2] + [n for n, p in model.named_parameters() if p.dim() < 2]
    assert [n for g in by_name["param_groups"] for n in g["params"]] == order
    _, named_optim = dist_checkpoint.full_state(model, opt)
    assert by_name["state"].keys() == named_optim["state"].keys()
    assert dist_checkpoint.optim_state_by_name(named_optim, model, opt) is named_optim  # already by name: untouched

    model2, net2, opt2 = _tiny_model_and_optimizer()
    dist_checkpoint.load_full_state(model2, opt2, legacy_model, legacy_optim)
    _assert_same_state(dist_checkpoint.full_state(model2, opt2), dist_checkpoint.full_state(model, opt))
    _train_step(net, opt, 2)
    _train_step(net2, opt2, 2)
    for p, q in zip(model.parameters(), model2.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)

    short = {**legacy_optim, "param_groups": [{**legacy_optim["param_groups"][0], "params": [0, 1]}]}
    with pytest.raises(CheckpointError, match="holds 2 parameters"):
        dist_checkpoint.optim_state_by_name(short, model2, opt2)


def test_sharded_state_round_trip_damage_and_pruning(tmp_path):
    env = dist.DistEnv()
    model, net, opt = _tiny_model_and_optimizer()
    _train_step(net, opt, 3)
    ref = dist_checkpoint.full_state(model, opt)
    root = tmp_path / "checkpoints"
    ref_doc = dist_checkpoint.save_sharded(root / dist_checkpoint.SHARDED_DIR / "step_00000004", model, opt, env)
    part = {"sharded": {"path": f"{dist_checkpoint.SHARDED_DIR}/step_00000004", **ref_doc}}
    assert ".metadata" in ref_doc["files"] and all(size > 0 for size in ref_doc["files"].values())

    model2, _, opt2 = _tiny_model_and_optimizer()
    dist_checkpoint.restore_model_state(root, part, model2, opt2, env)
    _assert_same_state(dist_checkpoint.full_state(model2, opt2), ref)
    # the full form goes through the same entry point
    model3, _, opt3 = _tiny_model_and_optimizer()
    full_part = dist_checkpoint.checkpoint_model_state(root, 4, model, opt, env, "ddp")
    assert set(full_part) == {"model", "optimizer"}
    dist_checkpoint.restore_model_state(root, full_part, model3, opt3, env)
    _assert_same_state(dist_checkpoint.full_state(model3, opt3), ref)

    shard = next(f for f in ref_doc["files"] if f.endswith(".distcp"))
    path = root / dist_checkpoint.SHARDED_DIR / "step_00000004" / shard
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"{shard} is .* bytes, expected"):
        dist_checkpoint.restore_model_state(root, part, model2, opt2, env)
    with pytest.raises(CheckpointError, match="missing or incomplete"):
        dist_checkpoint.load_sharded(root / dist_checkpoint.SHARDED_DIR / "step_00000099", model2, opt2, env)

    # Shards are kept while their checkpoint directory exists; orphans and temporaries go.
    (root / "step_00000004").mkdir()
    for name in ("step_00000008", ".tmp-step_00000012"):
        (root / dist_checkpoint.SHARDED_DIR / name).mkdir()
    gone = dist_checkpoint.prune_sharded(root)
    assert sorted(p.name for p in gone) == [".tmp-step_00000012", "step_00000008"]
    assert [p.name for p in (root / dist_checkpoint.SHARDED_DIR).iterdir()] == ["step_00000004"]


# --------------------------------------------------------------------------- dist.py under gloo, 2 ranks


def _gloo_worker(rank: int, port: int, root: str) -> None:
    from velocitune.train import check_same_on_all_ranks

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = dist.init("cpu")
    root = Path(root)
    try:
        out: dict = {"rank": env.rank, "world": env.world_size}
        out["sum"] = dist.all_reduce_sum(torch.tensor([1.0 + rank, 10.0 * rank], dtype=torch.float64), env).tolist()
        out["bcast"] = dist.broadcast_object({"from": rank}, env)
        w = np.array([0.2, 0.3, 0.5])
        check_same_on_all_ranks(w, env)
        try:  # rank 1's weights differ from rank 0's by one ulp
            check_same_on_all_ranks(np.nextafter(w, 1.0) if rank == 1 else w, env)
            out["mismatch"] = None
        except TrainingError as exc:
            out["mismatch"] = str(exc)

        # FSDP2: a step on rank-specific data, sharded save, load into a fresh sharded model.
        torch.manual_seed(0)
        model, net, opt = _tiny_model_and_optimizer(env, "fsdp2")
        _train_step(net, opt, 10 + rank)
        part = dist_checkpoint.checkpoint_model_state(root, 4, model, opt, env, "fsdp2")
        ref = dist_checkpoint.full_state(model, opt)  # gathered on rank 0 only
        model2, _, opt2 = _tiny_model_and_optimizer(env, "fsdp2")
        dist_checkpoint.restore_model_state(root, part, model2, opt2, env)
        reloaded = dist_checkpoint.full_state(model2, opt2)
        out["local_numel"] = sum(p.to_local().numel() for p in model.parameters())
        out["full_numel"] = sum(p.numel() for p in model.parameters())
        if env.is_main:
            torch.save({"part": part, "ref": ref, "reloaded": reloaded}, root / "fsdp2.pt")
        (root / f"rank{rank}.json").write_text(json.dumps(out))
    finally:
        dist.shutdown(env)


def test_two_ranks_gloo_collectives_weight_check_and_fsdp2_states(tmp_path):
    ctx = torch.multiprocessing.spawn(_gloo_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=False)
    deadline = time.monotonic() + LAUNCH_TIMEOUT
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the two gloo ranks did not finish in time (a collective hung)")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["rank"], r1["rank"], r0["world"]) == (0, 1, 2)
    assert r0["sum"] == r1["sum"] == [3.0, 10.0]
    assert r0["bcast"] == r1["bcast"] == {"from": 0}
    assert r0["mismatch"] is None and "rank 1 computed weights" in r1["mismatch"]
    # FSDP2 really shards: each rank holds about half of the parameters.
    assert r0["local_numel"] + r1["local_numel"] == r0["full_numel"] and r0["local_numel"] < r0["full_numel"]

    saved = torch.load(tmp_path / "fsdp2.pt", weights_only=False)
    _assert_same_state(saved["reloaded"], saved["ref"])
    shard_dir = tmp_path / saved["part"]["sharded"]["path"]
    assert sorted(p.name for p in shard_dir.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    # Both forms written at world size 2 load in one process (DCP reshards; the full form is by name).
    env = dist.DistEnv()
    for part in (saved["part"], {"model": saved["ref"][0], "optimizer": saved["ref"][1]}):
        model, _, opt = _tiny_model_and_optimizer()
        dist_checkpoint.restore_model_state(tmp_path, part, model, opt, env)
        _assert_same_state(dist_checkpoint.full_state(model, opt), saved["ref"])
