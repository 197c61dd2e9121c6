"""Preemption: SIGTERM or SIGUSR1 (what SLURM and Kubernetes send before they kill a job) stops a training run
cleanly at the next optimizer-step boundary, with a checkpoint, and exit status `PREEMPTED_EXIT`.

The handler only records the signal; `Trainer.fit` reads the record at a step boundary, after the step's log,
evaluation, mixture update and periodic checkpoint, so a signal that arrives during any of them lets it finish
(a checkpoint write is never cut short by the signal itself). Under torchrun the ranks agree on whether to stop
with one all-reduce of the flag every `checkpoint.preempt_check_interval` steps, on a CPU (gloo) group so that
it never waits for the GPU: every rank stops at the same step, which the collective checkpoint needs.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch

from velocitune import dist
from velocitune.errors import PREEMPTED_EXIT, Preempted

__all__ = ["PREEMPTED_EXIT", "SIGNALS", "Preempted", "PreemptionGuard", "StopAgreement"]

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionGuard:
    """SIGTERM and SIGUSR1 handlers for the duration of a `with` block; the previous handlers come back after.

    Only the main thread can install handlers: elsewhere (training run from a worker thread) the guard does
    nothing and the signals keep whatever the process does with them. The first signal is recorded; later ones
    are ignored on purpose: torchrun forwards the SIGTERM it gets to every worker while SLURM's `scancel` also
    signals the workers directly, so a worker commonly receives the same request twice, and a second signal
    forcing an exit would lose the checkpoint the first one asked for. To stop at once, send SIGKILL (or press
    Ctrl-C): checkpoints are atomic, so `--resume` then continues from the previous one.
    """

    def __init__(self) -> None:
        self.signum = 0  # the first signal received; 0: none
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs between two bytecodes of the main thread: set a flag, nothing else (no I/O, no locks).
        if not self.signum:
            self.signum = signum

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class StopAgreement:
    """Whether to stop at a step boundary, the same answer on every rank.

    One process reads its own flag at every boundary (free). Under torchrun the ranks may receive the signal
    at different steps (or only some of them at all), and a rank that stopped alone would leave the others
    waiting in the checkpoint's collectives, so they all-reduce (MAX) the signal number every `interval` steps
    and act only on the agreed value: a signal is acted on within `interval` steps of the one it arrived in.
    The all-reduce runs on a gloo group with a CPU tensor, so it does not wait for queued GPU work.
    """

    def __init__(self, guard: PreemptionGuard, env: dist.DistEnv, interval: int):
        self.guard, self.env, self.interval = guard, env, interval
        self.group = dist.control_group(env)  # collective: every rank creates it, here at set-up

    def agreed(self, done: int) -> int:
        """The signal to stop on after `done` optimizer steps (0: go on); collective under torchrun."""
        if not self.env.distributed:
            return self.guard.signum
        if done % self.interval:
            return 0
        flag = torch.tensor([self.guard.signum], dtype=torch.int64)
        return int(dist.all_reduce_max(flag, self.env, self.group)[0])
