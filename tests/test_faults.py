"""Crash safety proven by fault injection: real processes are SIGKILLed mid-step, mid-evaluation,
mid-update, mid-checkpoint, mid-log-line and mid-prepare, resumed, and must end bit-identical to an
uninterrupted run (final weights, mixture history, per-step losses, val losses).

How processes are run and killed:
- A *fork server* (this file run as `python tests/test_faults.py --serve`) imports torch, transformers and
  velocitune once, then forks one child per command; the child runs `velocitune.cli.main(argv)` exactly as
  `python -m velocitune ...` would, with its output in a log file. Importing transformers' Llama costs
  3-10 s per process on the shared 2-core machine, which would allow only a handful of kills per minute;
  a forked child starts in milliseconds. The children are ordinary processes and die by a real SIGKILL:
  no cleanup, no flush, no `finally`. One test also runs and kills a plain `python -m velocitune train`
  subprocess, and compares it with the same reference.
- Kill points: *targeted* (the child wraps one function, e.g. `checkpoint._write_part`, and SIGKILLs
  itself on its n-th call, after printing `FAULT <point> #n`), *random* (the test SIGKILLs the child after
  a delay drawn from a seeded RNG over the run's measured duration) and *watched* (the test polls the run
  directory and SIGKILLs the child as soon as, e.g., `checkpoints/.tmp-*` appears).
A child that exits is not reaped until the test asks, so its pid cannot be reused before a late kill.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if __name__ != "__main__":  # the fork server needs none of the test-side imports
    import pytest

REPO = Path(__file__).resolve().parents[1]
KILLED = -int(signal.SIGKILL)  # the exit status of a SIGKILLed process, as subprocess reports it

# Where a targeted fault can strike: point -> (module, attribute, when). `when` is "before" (die instead
# of calling it), "after" (die once it returned) or "torn" (JsonlWriter.write: write half the line, die).
FAULT_POINTS: dict[str, tuple[str, str, str]] = {
    "step.forward": ("velocitune.train", "forward_losses", "before"),  # mid-step, before backward
    "step.clipped": ("torch.nn.utils", "clip_grad_norm_", "after"),  # grads done, optimizer not stepped
    "eval.forward": ("velocitune.evaluate", "forward_losses", "before"),  # mid-evaluation
    "update.rule": ("velocitune.mixing", "update_weights", "after"),  # new weights computed, not applied
    "update.sampler": ("velocitune.sampler", "MixtureSampler.set_weights", "after"),  # applied, not logged
    "log.record": ("velocitune.fileio", "JsonlWriter.write", "after"),  # a record written (needs "file")
    "log.torn": ("velocitune.fileio", "JsonlWriter.write", "torn"),  # half a record written (needs "file")
    "checkpoint.part": ("velocitune.checkpoint", "_write_part", "after"),  # mid checkpoint write
    "checkpoint.rename": ("velocitune.fileio", "install_dir", "before"),  # complete temp dir, not renamed
    "checkpoint.prune": ("velocitune.checkpoint", "_prune", "before"),  # installed, older not pruned
    "final.save": ("velocitune.train", "save_final", "before"),  # neither final/ nor summary.json written
    "final.saved": ("velocitune.train", "save_final", "after"),  # final/ written, summary.json (written last) not
    "prepare.shard": ("velocitune.shards", "ShardWriter.close", "after"),  # a shard complete, domain not
    "prepare.done": ("velocitune.manifest", "write_done_marker", "before"),  # all shards, no .done marker
    "prepare.manifest": ("velocitune.manifest", "build_manifest", "after"),  # every domain done, no manifest
}


# ============================================================================ child side (fork server)


def _die(point: str, n: int) -> None:
    os.write(2, f"FAULT {point} #{n}\n".encode())
    os.kill(os.getpid(), signal.SIGKILL)


def _arm(fault: dict) -> None:
    """Wrap the function of `fault["point"]` so that its `fault["call"]`-th call kills this process."""
    module, qualname, when = FAULT_POINTS[fault["point"]]
    owner = importlib.import_module(module)
    *path, attr = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    real = getattr(owner, attr)
    calls = 0

    def wrapper(*args, **kwargs):
        nonlocal calls
        if "file" in fault and Path(args[0].path).name != fault["file"]:
            return real(*args, **kwargs)
        calls += 1
        if calls != fault["call"]:
            return real(*args, **kwargs)
        if "signal" in fault:  # a preemption: the signal arrives as the call starts, and the call goes on
            os.write(2, f"SIGNAL {fault['signal']} {fault['point']} #{calls}\n".encode())
            os.kill(os.getpid(), getattr(signal, fault["signal"]))
            return real(*args, **kwargs)
        if when == "before":
            _die(fault["point"], calls)
        if when == "torn":
            from velocitune.fileio import json_default

            writer, record = args
            line = json.dumps(record, default=json_default) + "\n"
            writer._f.write(line[: len(line) // 2])
            writer._f.flush()
            _die(fault["point"], calls)
        result = real(*args, **kwargs)
        _die(fault["point"], calls)
        return result

    setattr(owner, attr, wrapper)


def _child(req: dict) -> None:
    """Run one velocitune command in this forked process; never returns."""
    rc = 1
    try:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.stdout.reconfigure(line_buffering=True)
        for fault in req["faults"]:
            _arm(fault)
        from velocitune.cli import main

        rc = main(req["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _serve() -> None:
    """Fork server: preload the heavy imports, then fork a child per request (protocol: JSON lines)."""
    import torch

    torch.set_num_threads(1)
    import safetensors.torch  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM  # noqa: F401

    import velocitune.cli  # noqa: F401
    import velocitune.prepare  # noqa: F401
    import velocitune.train  # noqa: F401

    while line := sys.stdin.readline():
        req = json.loads(line)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(req)
        print(json.dumps({"pid": pid}), flush=True)
        sys.stdin.readline()  # "wait": the child stays unreaped (its pid reserved) until the test asks
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--serve"]:
        _serve()
    sys.exit(0)


# ============================================================================ test side

pytestmark = pytest.mark.skipif(
    not hasattr(os, "fork") or not Path("/proc/self/stat").exists(), reason="needs fork and /proc (Linux)"
)


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path)


class ForkServer:
    """The test's handle on the fork server: spawn a child, kill it when it likes, then reap it."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=_env(), cwd=REPO)

    def _ask(self, msg: str) -> dict:
        self.proc.stdin.write(msg + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit status {self.proc.wait()})")
        return json.loads(line)

    def spawn(self, argv: list[str], log: Path, faults: tuple[dict, ...] = ()) -> int:
        return self._ask(json.dumps({"argv": [str(a) for a in argv], "log": str(log), "faults": list(faults)}))["pid"]

    def wait(self) -> int:
        return self._ask("wait")["rc"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _exited(pid: int) -> bool:
    """True once the (unreaped) child has exited: a zombie, or gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def _wait_for(cond: Callable[[], bool], pid: int, timeout: float = 300.0) -> bool:
    """Poll `cond` every ~0.2 ms until it holds (True) or the process `pid` exits (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if _exited(pid):
            return cond()
        time.sleep(0.0002)
    raise TimeoutError(f"process {pid} neither met the condition nor exited in {timeout} s")


@dataclass
class Attempt:
    """One process of a chain and how it ended."""

    how: str  # "fault step.forward#3", "random 1.234s", "watch ckpt-tmp", "complete"
    rc: int
    log: str
    hit: bool = True  # for watched kills: the condition still held after death (e.g. a temp dir was left)
    seconds: float = 0.0

    @property
    def killed(self) -> bool:
        return self.rc == KILLED

    @property
    def resumed_from(self) -> int | None:
        for line in self.log.splitlines():
            if line.startswith("resumed from step "):
                return int(line.split()[-1])
        return 0 if "starting from step 0" in self.log else None


def _attempt(server: ForkServer, argv: list, log: Path, *, fault: dict | None = None,
             delay: float | None = None, watch: tuple[str, Callable[[], bool]] | None = None,
             expect: tuple[int, ...] = (0, KILLED)) -> Attempt:
    log.unlink(missing_ok=True)
    pid = server.spawn(argv, log, (fault,) if fault else ())
    t0 = time.perf_counter()  # after the spawn: the first one waits for the server's imports
    how, hit = "complete", True
    if fault:
        how = f"fault {fault['point']}#{fault['call']}" + (f" {fault['file']}" if "file" in fault else "")
    if delay is not None:
        how = f"random {delay:.3f}s"
        time.sleep(delay)
        os.kill(pid, signal.SIGKILL)  # harmless if it has already exited: it is a zombie until reaped
    if watch is not None:
        how = f"watch {watch[0]}"
        if _wait_for(watch[1], pid):
            os.kill(pid, signal.SIGKILL)
    rc = server.wait()
    if watch is not None:
        hit = watch[1]()
    text = log.read_text(errors="replace") if log.exists() else ""
    if fault and rc == KILLED:
        assert f"FAULT {fault['point']} #{fault['call']}" in text, f"{how}: killed, not by the fault:\n{text[-3000:]}"
    if fault and "signal" in fault:
        how = f"{fault['signal']} at {how[len('fault '):]}"
        assert f"SIGNAL {fault['signal']} {fault['point']} #{fault['call']}" in text, f"{how}: not sent:\n{text[-3000:]}"
    assert rc in expect, f"{how}: exit status {rc}, expected one of {expect}:\n{text[-3000:]}"
    return Attempt(how, rc, text, hit, time.perf_counter() - t0)


# ---------------------------------------------------------------- runs, configs and their artifacts

FAULT_SECTIONS = dict(log={"interval": 1, "progress": False}, checkpoint={"interval": 3, "keep": 2})


def _write_config(prepared: Path, run_dir: Path, path: Path, **sections) -> Path:
    from conftest import tiny_config

    from velocitune.config import dump_yaml

    merged = {**FAULT_SECTIONS, **sections}
    path.write_text(dump_yaml(tiny_config(prepared, run_dir, **merged)))
    return path


def _strict_jsonl(path: Path) -> list[dict]:
    """Every line a complete JSON object (no torn tail tolerated)."""
    text = path.read_text()
    assert text.endswith("\n"), f"{path} ends in a partial line"
    return [json.loads(line) for line in text.splitlines()]


def artifacts(run: Path) -> dict:
    """What an uninterrupted run and a killed-and-resumed one must share, exactly."""
    from safetensors.torch import load_file

    summary = json.loads((run / "summary.json").read_text())
    assert summary["complete"]
    return {
        "weights": load_file(run / "final" / "model.safetensors"),
        "metrics": [(r["step"], r["tokens"], r["loss"], r["lr"], r["grad_norm"], r["domain_loss"], r["skipped_steps"])
                    for r in _strict_jsonl(run / "metrics.jsonl")],
        "mixture": [(r["step"], r["tokens"], r["losses"], r["velocity"], r["weights"], r["sampling_weights"],
                     r["tokens_per_domain"], r["guarded"]) for r in _strict_jsonl(run / "mixture.jsonl")],
        "eval": [(r["step"], r["losses"]) for r in _strict_jsonl(run / "eval.jsonl")],
        "summary": (summary["steps"], summary["final_val_loss"], summary["tokens_per_domain"],
                    summary["epochs_per_domain"], summary["init_loss"], summary["skipped_steps"]),
    }


def assert_same_run(got: dict, ref: dict, what: str) -> None:
    import torch

    assert got["weights"].keys() == ref["weights"].keys()
    differ = [k for k in ref["weights"] if not torch.equal(got["weights"][k], ref["weights"][k])]
    assert not differ, f"{what}: final weights differ in {differ}"
    for key in ("metrics", "mixture", "eval", "summary"):
        if got[key] != ref[key]:
            first = next((i for i, (a, b) in enumerate(zip(got[key], ref[key])) if a != b),
                         min(len(got[key]), len(ref[key])))
            raise AssertionError(f"{what}: {key} differs from the uninterrupted run at record {first}: "
                                 f"{got[key][first:first + 1]} vs {ref[key][first:first + 1]}")


@dataclass
class Reference:
    config: dict  # sections given to tiny_config
    run: Path
    seconds: float  # wall time of the uninterrupted child, start to exit
    art: dict


class Harness:
    """A fork server plus the uninterrupted reference run of each config it was asked about."""

    def __init__(self, server: ForkServer, prepared: Path, root: Path):
        self.server, self.prepared, self.root = server, prepared, root
        self._refs: dict[str, Reference] = {}
        self._n = 0

    def config(self, run: Path, **sections) -> Path:
        self._n += 1
        return _write_config(self.prepared, run, self.root / f"cfg{self._n}.yaml", **sections)

    def reference(self, **sections) -> Reference:
        key = json.dumps(sections, sort_keys=True)
        if key not in self._refs:
            run = self.root / f"ref{len(self._refs)}"
            cfg = self.config(run, **sections)
            a = _attempt(self.server, ["train", cfg], self.root / f"ref{len(self._refs)}.log")
            assert a.rc == 0, a.log[-3000:]
            self._refs[key] = Reference(sections, run, a.seconds, artifacts(run))
        return self._refs[key]


@pytest.fixture(scope="module")
def server():
    srv = ForkServer()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def harness(server, tiny_prepared, tmp_path_factory):
    return Harness(server, tiny_prepared, tmp_path_factory.mktemp("faults"))


def _lock_holder(run: Path) -> int | None:
    """The pid in the run directory's lock file (written by the process that holds it), if any."""
    try:
        return int((run / ".lock").read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def _checkpoint_tmp(run: Path) -> Callable[[], bool]:
    def cond() -> bool:
        try:
            return any(e.name.startswith(".tmp-") for e in os.scandir(run / "checkpoints"))
        except FileNotFoundError:
            return False

    return cond


def _grows(path: Path) -> Callable[[], bool]:
    """True once `path` has more lines than it has now (a resumed run first truncates it, then writes on)."""

    def lines() -> int:
        try:
            with open(path, "rb") as f:
                return f.read().count(b"\n")
        except FileNotFoundError:
            return 0

    start = lines()
    return lambda: lines() > start


def _chain(h: Harness, ref: Reference, name: str,
           next_kill: Callable[[list[Attempt]], dict | None]) -> list[Attempt]:
    """One run of `ref`'s config: while `next_kill(attempts so far)` gives an entry ({"fault": ..} |
    {"delay": s} | {"watch": name}), start a process (with --resume after the first) and kill it as the
    entry says; then finish the run with --resume and compare it with the reference. Returns every
    process's Attempt, the finishing one last."""
    run = h.root / name
    cfg = h.config(run, **ref.config)
    watches = {
        "checkpoint-write": lambda: _checkpoint_tmp(run),
        "mixture-grows": lambda: _grows(run / "mixture.jsonl"),
        "eval-grows": lambda: _grows(run / "eval.jsonl"),
        "metrics-grows": lambda: _grows(run / "metrics.jsonl"),
    }
    attempts: list[Attempt] = []
    while (entry := next_kill(attempts)) is not None:
        argv = ["train", cfg] + (["--resume"] if attempts else [])
        watch = (entry["watch"], watches[entry["watch"]]()) if "watch" in entry else None
        attempts.append(_attempt(h.server, argv, h.root / f"{name}-{len(attempts)}.log", fault=entry.get("fault"),
                                 delay=entry.get("delay"), watch=watch, expect=entry.get("expect", (0, KILLED))))
    attempts.append(_attempt(h.server, ["train", cfg, "--resume"], h.root / f"{name}-end.log"))
    assert attempts[-1].rc == 0
    assert_same_run(artifacts(run), ref.art, f"{name} ({', '.join(a.how for a in attempts[:-1])})")
    return attempts


def _plan(entries: list[dict]) -> Callable[[list[Attempt]], dict | None]:
    """A fixed kill plan: one process per entry."""
    return lambda done: entries[len(done)] if len(done) < len(entries) else None


WATCHES = ("checkpoint-write", "mixture-grows", "eval-grows", "metrics-grows")


def _random_kills(h: Harness, ref: Reference, name: str, n_kills: int, rng: random.Random) -> list[Attempt]:
    """Kill runs of `ref`'s config until `n_kills` kills landed: at delays drawn from `rng` over the first
    60 % of a whole run's duration, every fourth kill a watched one instead. A run that finishes before
    its next kill is compared with the reference and a fresh run starts, so kills spread over all phases."""
    total: list[Attempt] = []

    def next_kill(done: list[Attempt]) -> dict | None:
        if (done and done[-1].rc == 0) or sum(a.killed for a in total + done) >= n_kills:
            return None
        i = len(total) + len(done) + 1
        if i % 4 == 0:
            return {"watch": WATCHES[(i // 4) % len(WATCHES)]}
        return {"delay": rng.uniform(0.0, 0.6 * ref.seconds)}

    while sum(a.killed for a in total) < n_kills:
        total += _chain(h, ref, f"{name}-{len(total)}", next_kill)
    return total


def _report(title: str, attempts: list[Attempt]) -> tuple[int, int]:
    kills = [a for a in attempts if a.killed]
    print(f"\n{title}: {len(kills)} kill points tried, {len(kills)} survived (resumed bit-identical)")
    for a in attempts:
        resumed = "" if a.resumed_from is None else f"resumed from {a.resumed_from}"
        print(f"  {a.how:<36} exit {a.rc:>3}  {a.seconds:5.2f}s  {resumed}"
              + ("" if a.hit else "  (condition gone by the time it died)"))
    return len(kills), len(kills)


# ---------------------------------------------------------------- the tests

# Targeted kills, one process each, in order; call numbers count from each process's start (resumed
# processes start at their checkpoint). With the tiny config (24 steps, warm-up 2, eval signal, update every
# 4 steps at 2, 6, 10, ...; checkpoint every 3 steps, keep 2) they fall as the comments say. Every eval-signal
# process first runs overhead.probe_overhead: one evaluation (3 forwards, one per domain) after the ℓ_init one,
# so eval.forward kills count past them. Its micro-batches call velocitune.overhead's forward_losses, not
# velocitune.train's, so step.forward counts the loop's forwards only.
PROBE_STEP_FORWARDS = 0  # the probe's forwards seen by the step.forward fault point
TARGETED = [
    {"point": "step.forward", "call": PROBE_STEP_FORWARDS + 2},  # step 1, no checkpoint yet: resume starts over
    {"point": "eval.forward", "call": 8},  # 1-3 ℓ_init, 4-6 the probe, 8: mid-evaluation for the update at step 2
    {"point": "checkpoint.part", "call": 4},  # inside the first checkpoint (step 3): a partial temp dir
    {"point": "log.torn", "call": 5, "file": "metrics.jsonl"},  # half of step 5's record; ckpt 3 exists
    {"point": "update.rule", "call": 2},  # from 3: the update at step 10 computed, not applied
    {"point": "step.clipped", "call": 2},  # from 9: step 10 backward done, optimizer not stepped
    {"point": "checkpoint.rename", "call": 2},  # from 9: checkpoint 15 complete but not renamed in
    {"point": "log.record", "call": 1, "file": "mixture.jsonl"},  # from 12: the update at 14 logged
    {"point": "checkpoint.prune", "call": 2},  # from 12: 18 installed, 12 not pruned yet
    {"point": "update.sampler", "call": 1},  # from 18: the update at 22 applied, not logged
    {"point": "final.save", "call": 1},  # from 21: neither final/ nor summary.json written
    {"point": "final.saved", "call": 1},  # from 21: final/ written, summary.json not: the run is not complete
]


def test_targeted_kills_resume_bit_identical(harness):
    ref = harness.reference()
    attempts = _chain(harness, ref, "targeted", _plan([{"fault": f} for f in TARGETED]))
    assert all(a.killed for a in attempts[:-1]), [a.how for a in attempts[:-1] if not a.killed]  # all fired
    # The kills landed where the comments of TARGETED say: the resume points prove it.
    assert [a.resumed_from for a in attempts[1:]] == [0, 0, 0, 3, 9, 9, 12, 12, 18, 21, 21, 21]
    assert "dropped a partial last line" in attempts[4].log  # the torn metrics record, dropped on resume
    assert "unfinished checkpoint write" in attempts[3].log  # the partial temp dir of checkpoint 3, ignored
    _report("targeted kills", attempts)


def test_random_and_watched_kills_resume_bit_identical(harness):
    ref = harness.reference()
    # Watched kills first, while there is still a checkpoint to write and a mixture to update; then
    # random ones, at delays drawn from a seeded RNG (a fresh run starts if one finishes first).
    attempts = _chain(harness, ref, "watched", _plan([{"watch": w} for w in WATCHES[:3]]))
    attempts += _random_kills(harness, ref, "random", 4, random.Random(1234))
    tried, _ = _report("watched and random kills", attempts)
    assert tried >= 6  # the three watched ones may only miss if a process outruns the poll

def test_the_comparison_sees_a_one_ulp_difference(harness):
    """Negative control: `assert_same_run` is not blind; one ulp in one weight, or in one logged loss, fails it."""
    import copy

    import numpy as np
    import torch

    ref = harness.reference().art
    assert_same_run(copy.deepcopy(ref), ref, "itself")
    weights = dict(ref["weights"])
    name = sorted(weights)[0]
    bumped = weights[name].clone()
    bumped.view(-1)[0] = torch.nextafter(bumped.view(-1)[0], torch.tensor(math.inf))
    weights[name] = bumped
    with pytest.raises(AssertionError, match="final weights differ"):
        assert_same_run({**ref, "weights": weights}, ref, "one ulp in a weight")
    metrics = list(ref["metrics"])
    step, tokens, loss, *rest = metrics[5]
    metrics[5] = (step, tokens, float(np.nextafter(loss, np.inf)), *rest)
    with pytest.raises(AssertionError, match="metrics differs from the uninterrupted run at record 5"):
        assert_same_run({**ref, "metrics": metrics}, ref, "one ulp in a loss")


def test_train_signal_run_survives_kills(harness):
    ref = harness.reference(mixing={"signal": "train"})
    plan = [{"fault": {"point": "step.forward", "call": 9}}, {"fault": {"point": "update.rule", "call": 1}},
            {"watch": "checkpoint-write"}, {"delay": 0.5 * ref.seconds}]
    attempts = _chain(harness, ref, "train-signal", _plan(plan))
    assert sum(a.killed for a in attempts) >= 3
    _report("train-signal kills", attempts)


# ---------------------------------------------------------------- preemption (SIGTERM / SIGUSR1)

PREEMPTED = 75  # the documented exit status of a preempted run (velocitune.errors.PREEMPTED_EXIT), written out

# One process per entry, each resumed from the checkpoint its predecessor wrote when it stopped. The process
# sends the signal to itself as the named call starts, and the call goes on (a signal is not a kill). Call
# numbers count from each process's start; a resumed process first runs the overhead probe (eval.forward
# 1-3, PROBE_STEP_FORWARDS step forwards). With the tiny config (updates at 2, 6, 10, ..., curve evaluations
# at 4, 8, 12, ..., checkpoints every 3 steps): (point, call, signal, the step the run must stop at).
PREEMPTIONS = [
    ("eval.forward", 1, "SIGTERM", 1),  # set-up (the ℓ_init evaluation): the first step runs, then it stops
    ("eval.forward", 5, "SIGUSR1", 2),  # the update's evaluation at step 2 (the eval signal)
    ("eval.forward", 5, "SIGTERM", 4),  # the curve evaluation at step 4
    ("update.rule", 1, "SIGTERM", 6),  # the weight update at step 6, also a periodic checkpoint (written once)
    ("checkpoint.part", 1, "SIGTERM", 9),  # the periodic checkpoint write at step 9: it completes
    ("step.forward", PROBE_STEP_FORWARDS + 2, "SIGUSR1", 11),  # a plain step (10 -> 11)
]


def _preempted_line(sig: str, step: int) -> str:
    return (f"preempted by {sig} at step {step}: checkpoint written; continue with the same command and --resume "
            f"(exit status {PREEMPTED})")


def test_preemption_stops_at_a_step_boundary_and_resumes_bit_identical(harness):
    ref = harness.reference()
    plan = [{"fault": {"point": p, "call": c, "signal": sig}, "expect": (PREEMPTED,)} for p, c, sig, _ in PREEMPTIONS]
    attempts = _chain(harness, ref, "preempt", _plan(plan))
    for a, (*_, sig, step) in zip(attempts, PREEMPTIONS):
        assert a.rc == PREEMPTED, a.how
        assert _preempted_line(sig, step) in a.log, f"{a.how}:\n{a.log[-3000:]}"
        assert "Traceback" not in a.log and "error:" not in a.log
    # Each process resumed from the checkpoint of the step its predecessor stopped at: the checkpoint was
    # written there (the one interrupted at step 9 completed), and the whole chain ended bit-identical.
    assert [a.resumed_from for a in attempts[1:]] == [step for *_, step in PREEMPTIONS]
    print(f"\npreemption: {len(PREEMPTIONS)} signals sent (SIGTERM and SIGUSR1 during set-up, evaluation, "
          f"update, checkpoint write and a step), each stopped at the next step boundary with status {PREEMPTED}")
    for a in attempts:
        print(f"  {a.how:<44} exit {a.rc:>3}  {a.seconds:5.2f}s  resumed from {a.resumed_from}")


def test_preemption_guard_keeps_the_first_signal_and_restores_the_handlers():
    import threading

    from velocitune.preempt import PreemptionGuard

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGUSR1)  # handled before os.kill returns to this (main) thread
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal while stopping: ignored, not fatal
        assert guard.signum == signal.SIGUSR1
    assert {sig: signal.getsignal(sig) for sig in before} == before
    # Off the main thread Python cannot install handlers: the guard leaves them alone instead of failing.
    seen = []
    worker = threading.Thread(target=lambda: seen.append(PreemptionGuard().__enter__()._previous))
    worker.start()
    worker.join()
    assert seen == [{}]


def _corrupt_truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_corrupted_newest_checkpoint_falls_back_and_still_matches(harness):
    ref = harness.reference()
    base = harness.root / "corrupt-base"
    cfg = harness.config(base, **ref.config)
    first = _attempt(harness.server, ["train", cfg], harness.root / "corrupt-base.log",
                     fault={"point": "step.forward", "call": PROBE_STEP_FORWARDS + 23})  # dies in step 22: ckpts 18, 21
    assert first.killed
    assert sorted(p.name for p in (base / "checkpoints").iterdir()) == ["step_00000018", "step_00000021"]
    cases = [("model.pt", _corrupt_truncate, "truncated or overwritten"),
             ("optimizer.pt", _corrupt_flip, "(corrupted)")]
    for part, damage, why in cases:
        run = harness.root / f"corrupt-{part}"
        shutil.copytree(base, run)
        damage(run / "checkpoints" / "step_00000021" / part)
        cfg = harness.config(run, **ref.config)
        a = _attempt(harness.server, ["train", cfg, "--resume"], harness.root / f"{run.name}.log")
        assert a.rc == 0 and a.resumed_from == 18
        assert f"checkpoint {run / 'checkpoints' / 'step_00000021'} is damaged: {part} " in a.log
        assert why in a.log and "falling back to the previous checkpoint" in a.log
        assert_same_run(artifacts(run), ref.art, f"resume past a damaged {part}")

    # Every checkpoint damaged: refused with a clear message, never a silent restart from step 0.
    run = harness.root / "corrupt-all"
    shutil.copytree(base, run)
    for step in ("step_00000018", "step_00000021"):
        _corrupt_flip(run / "checkpoints" / step / "model.pt")
    cfg = harness.config(run, **ref.config)
    a = _attempt(harness.server, ["train", cfg, "--resume"], harness.root / "corrupt-all.log", expect=(2,))
    assert a.rc == 2
    assert f"error: none of the 2 checkpoints under {run / 'checkpoints'} is usable" in a.log
    assert "Restore one from a backup, or delete the directory to start the run over." in a.log
    assert "Traceback" not in a.log
    assert len(_strict_jsonl(run / "metrics.jsonl")) == 22  # the logs were left alone
    print("\ncorrupted checkpoints: 1 kill point tried, 1 survived; resumed past a truncated and a bit-flipped "
          "newest checkpoint bit-identical; all damaged refused")


def test_python_m_subprocess_lock_then_kill_during_checkpoint_write(harness):
    """A plain `python -m velocitune train` process: a second run on its directory is refused while it
    holds the lock; then it is SIGKILLed as soon as a checkpoint write starts, resumed, and compared."""
    ref = harness.reference()
    run = harness.root / "python-m"
    cfg = harness.config(run, **ref.config)
    log = harness.root / "python-m.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "velocitune", "train", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT, env=_env(), cwd=REPO)
    try:
        # config.yaml is written under the lock, after the lock file got the holder's pid.
        holds = lambda: (run / "config.yaml").exists() and _lock_holder(run) == proc.pid  # noqa: E731
        assert _wait_for(holds, proc.pid), log.read_text()[-3000:]
        os.kill(proc.pid, signal.SIGSTOP)  # keep it holding the lock while the second run tries
        try:
            second = _attempt(harness.server, ["train", cfg, "--resume"], harness.root / "python-m-second.log",
                              expect=(2,))
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert second.rc == 2
        assert (f"error: another velocitune process (pid {proc.pid}) is using {run}: wait for it to finish, "
                "stop it, or use a different run directory") in second.log
        assert "Traceback" not in second.log

        # Kill it as soon as its second checkpoint write (step 6) starts, so that resuming uses the first.
        assert _wait_for(lambda: (run / "checkpoints" / "step_00000003").is_dir(), proc.pid), log.read_text()[-3000:]
        assert _wait_for(_checkpoint_tmp(run), proc.pid), log.read_text()[-3000:]
        proc.kill()
        assert proc.wait(timeout=60) == KILLED
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    mid_write = _checkpoint_tmp(run)()
    end = _attempt(harness.server, ["train", cfg, "--resume"], harness.root / "python-m-end.log")
    assert end.rc == 0
    assert_same_run(artifacts(run), ref.art, "python -m velocitune killed at a checkpoint write")
    print(f"\npython -m subprocess: 1 kill point tried (checkpoint write; temp dir left behind: {mid_write}), "
          f"1 survived; resumed from step {end.resumed_from}")


# ---------------------------------------------------------------- prepare


def _prepare_corpus(root: Path) -> dict[str, Path]:
    """Three domains large enough that `prepare` takes a second or two and writes several shards each."""
    from conftest import GENERATORS, write_jsonl

    rng = random.Random(7)
    sizes = {"prose": 1200, "code": 1500, "math": 6000}
    return {n: write_jsonl(root / f"{n}.jsonl", gen(rng, sizes[n])) for n, gen in GENERATORS.items()}


def _prepare_argv(tok: Path, corpus: dict[str, Path], out: Path) -> list:
    argv = ["prepare", "--tokenizer", tok, "--out", out, "--workers", "1", "--no-progress",
            "--shard-tokens", "40000", "--val-tokens", "3000", "--val-fraction", "0.05"]
    for name, path in corpus.items():
        argv += ["--domain", f"{name}={path}"]
    return argv


def _files(out: Path) -> dict[str, bytes]:
    """Every file under `out` except hidden temp files, by relative path."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and not (p.name.startswith(".") and p.name.endswith(".tmp"))}


def _check_nothing_half_written(out: Path) -> None:
    """After a kill: every visible shard is complete (header and size agree), every marker parses, and
    the directory is either refused by PreparedData with a message saying to (re-)run prepare (no
    manifest.json yet, or no directory at all when the kill came first) or loads whole (a manifest is only
    written once every domain is finished)."""
    from velocitune.errors import DataError
    from velocitune.shards import PreparedData, read_header

    for p in out.rglob("*"):
        if p.is_file() and not p.name.startswith("."):
            if p.suffix == ".bin":
                read_header(p)  # DataError for a short or garbled shard
            elif p.suffix == ".json":
                json.loads(p.read_text())
        elif p.name == ".done":
            json.loads(p.read_text())
    if (out / "manifest.json").exists():
        PreparedData(out)
    elif not out.exists():  # killed before prepare created its output directory
        with pytest.raises(DataError, match=r"does not exist; run `velocitune prepare"):
            PreparedData(out)
    else:
        with pytest.raises(DataError, match="re-run|a rerun resumes where it stopped"):
            PreparedData(out)


def _prepare_reference(server, tokenizer, tmp_path: Path) -> tuple[Path, float, Path, list[str]]:
    """An uninterrupted prepare into tmp_path/ref: (its output, its seconds, tmp_path/killed, the argv into it)."""
    corpus = _prepare_corpus(tmp_path)
    ref_out, out = tmp_path / "ref", tmp_path / "killed"
    first = _attempt(server, _prepare_argv(tokenizer, corpus, ref_out), tmp_path / "ref.log")
    assert first.rc == 0, first.log[-3000:]
    return ref_out, first.seconds, out, _prepare_argv(tokenizer, corpus, out)


def test_prepare_killed_mid_domain_reruns_byte_identical(server, tiny_tokenizer, tmp_path):
    ref_out, seconds, out, argv = _prepare_reference(server, tiny_tokenizer, tmp_path)
    reference = _files(ref_out)
    assert sum(n.endswith(".bin") for n in reference) >= 9, "several shards per domain"

    rng = random.Random(99)
    plan = [
        dict(fault={"point": "prepare.shard", "call": 2}),  # prose: 2 shards complete, more to come
        dict(fault={"point": "prepare.done", "call": 2}),  # code complete but for its .done marker
        dict(watch=("math shard being written", lambda: any(
            e.name.endswith(".tmp") for e in os.scandir(out / "math")) if (out / "math").is_dir() else False)),
        dict(delay=rng.uniform(0.0, 0.9 * seconds)),
        dict(fault={"point": "prepare.manifest", "call": 1}),  # every domain done, no manifest
    ]
    attempts = []
    for i, kw in enumerate(plan):
        attempts.append(_attempt(server, argv, tmp_path / f"killed-{i}.log", **kw))
        if attempts[-1].killed:
            _check_nothing_half_written(out)
    attempts.append(_attempt(server, argv, tmp_path / "killed-end.log"))
    assert attempts[-1].rc == 0
    _check_nothing_half_written(out)
    got = _files(out)
    assert got.keys() == reference.keys()
    assert [n for n in reference if got[n] != reference[n]] == []
    assert sum(a.killed for a in attempts) >= 4
    _report("prepare kills", attempts)


# ---------------------------------------------------------------- slow: many random kills


@pytest.mark.slow
@pytest.mark.parametrize("sections", [
    {},
    {"mixing": {"signal": "train"}},
    {"mixing": {"rule": "odm"}},
    {"mixing": {"rule": "dbl"}, "checkpoint": {"interval": 2, "keep": 1}},
], ids=["velocitune-eval", "velocitune-train", "odm", "dbl-ckpt2"])
def test_many_random_kills_slow(harness, sections):
    """13 kills per config, 52 over the four: random times from a seeded RNG, every fourth a watched write."""
    ref = harness.reference(**sections)
    rng = random.Random(json.dumps(sections, sort_keys=True))
    attempts = _random_kills(harness, ref, f"slow-{harness._n}", 13, rng)
    tried, _ = _report(f"slow random kills {sections or 'default'}", attempts)
    assert tried == 13


@pytest.mark.slow
def test_python_m_subprocess_random_kills_slow(harness):
    """Plain `python -m velocitune train` processes, SIGKILLed at random times, five times in a row."""
    ref = harness.reference()
    run = harness.root / "python-m-slow"
    cfg = harness.config(run, **ref.config)
    rng = random.Random(5)
    kills = 0
    for i in range(5):
        if (run / "summary.json").is_file():
            break  # a process finished before its kill: --resume of a finished run now trains nothing (no lock)
        with open(harness.root / f"python-m-slow-{i}.log", "wb") as out:
            argv = ["train", str(cfg)] + (["--resume"] if i else [])
            proc = subprocess.Popen([sys.executable, "-m", "velocitune", *argv], stdout=out, stderr=subprocess.STDOUT,
                                    env=_env(), cwd=REPO)
        # Wait for the imports (the lock file holds its pid), then kill at a random point of the work.
        assert _wait_for(lambda proc=proc: _lock_holder(run) == proc.pid, proc.pid)
        time.sleep(rng.uniform(0.0, 0.9 * ref.seconds))
        proc.kill()
        kills += proc.wait() == KILLED
    assert _attempt(harness.server, ["train", cfg, "--resume"], harness.root / "python-m-slow-end.log").rc == 0
    assert_same_run(artifacts(run), ref.art, "python -m, random kills")
    print(f"\npython -m random kills: {kills} kill points tried, {kills} survived")


@pytest.mark.slow
def test_prepare_many_random_kills_slow(server, tiny_tokenizer, tmp_path):
    ref_out, seconds, out, argv = _prepare_reference(server, tiny_tokenizer, tmp_path)
    rng = random.Random(2024)
    kills = 0
    for i in range(15):
        a = _attempt(server, argv, tmp_path / f"k{i}.log", delay=rng.uniform(0.0, seconds))
        if a.killed:
            kills += 1
            _check_nothing_half_written(out)
        if a.rc == 0:  # finished before the kill: start a fresh output directory
            assert _files(out) == _files(ref_out)
            shutil.rmtree(out)
    assert _attempt(server, argv, tmp_path / "end.log").rc == 0
    assert _files(out) == _files(ref_out)
    print(f"\nprepare random kills: {kills} kill points tried, {kills} survived")
