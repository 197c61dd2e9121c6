"""The error types velocitune raises for user mistakes: each message says what went wrong and what to do.

The CLI prints these without a traceback (exit code 2); anything else is a bug and keeps its traceback.
"""


class VelocituneError(Exception):
    """Base class: a problem the user can fix, with a message that says how."""


class ConfigError(VelocituneError):
    """A config key, type or value is wrong."""


class DataError(VelocituneError):
    """A corpus, prepared-data directory or shard is missing, malformed or inconsistent."""


class DataExhausted(DataError):
    """Every domain has used its `max_repetition` allowance: training cannot continue."""


class CheckpointError(VelocituneError):
    """A checkpoint is missing, corrupted or does not match the run."""


class TrainingError(VelocituneError):
    """Training cannot continue (a NaN loss, a model/data mismatch, ...)."""


class FitError(VelocituneError):
    """A scaling-law fit cannot be made from the points given."""


# EX_TEMPFAIL of sysexits.h, "a temporary failure; the user is invited to retry": distinct from success (0),
# a failure (1), a usage or config error (2), Ctrl-C (130) and death by a signal (128+n in a shell, 143 for
# SIGTERM), so a job script or a Kubernetes podFailurePolicy can requeue on it alone (docs/usage.md).
PREEMPTED_EXIT = 75


class Preempted(Exception):
    """Training stopped at a step boundary on SIGTERM/SIGUSR1 after writing a checkpoint; `--resume` continues.

    Not a VelocituneError: nothing is wrong, and the CLI exits with PREEMPTED_EXIT, not 2."""

    def __init__(self, signame: str, step: int):
        self.signame, self.step = signame, step
        super().__init__(f"preempted by {signame} at step {step}")
