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
