"""velocitune: continual pre-training on a mixture of domains, re-weighted by learning velocity.

The public maths API (docs/design.md §5) is importable from here; it pulls in numpy/scipy only, never torch.
"""

from velocitune.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DataExhausted,
    FitError,
    TrainingError,
    VelocituneError,
)

__version__ = "0.3.0"  # keep equal to pyproject.toml (read without an install, as on the bare GPU image)


def __getattr__(name):
    # Lazy so that `import velocitune` stays cheap and mixing/laws can be written in parallel.
    if name in ("velocity", "update_weights"):
        from velocitune import mixing

        return getattr(mixing, name)
    if name in ("fit_data_law", "lr_areas"):
        from velocitune import laws

        return getattr(laws, name)
    raise AttributeError(f"module 'velocitune' has no attribute {name!r}")


__all__ = [
    "velocity",
    "update_weights",
    "fit_data_law",
    "lr_areas",
    "VelocituneError",
    "ConfigError",
    "DataError",
    "DataExhausted",
    "CheckpointError",
    "TrainingError",
    "FitError",
    "__version__",
]
