"""The settings of a prepare run that shape its token streams, their defaults, and the val-size floor.

Its own module so that every step of `velocitune.prepare` (split, pipeline, merge, command) reads one
definition without importing the orchestration in `pipeline`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from velocitune.errors import ConfigError

DEFAULT_VAL_FRACTION = 0.01
DEFAULT_VAL_TOKENS = 1_000_000
DEFAULT_SHARD_TOKENS = 100_000_000

# A domain's validation split must hold at least MIN_VAL_WINDOWS whole windows of seq_len + 1 tokens
# (evaluation reads whole windows only: with none, targets and train stop later on data.seq_len); below
# USEFUL_VAL_WINDOWS its val loss is the noise of a few sequences, and prepare warns.
MIN_VAL_WINDOWS = 1
USEFUL_VAL_WINDOWS = 8


@dataclass(frozen=True)
class Settings:
    """Everything besides the files and the tokenizer that shapes the token streams."""

    val_fraction: float
    val_tokens: int
    text_field: str
    extensions: tuple[str, ...]  # extra text-file extensions, normalised (".c"), sorted
    strict: bool
    shard_tokens: int

    def to_json(self) -> dict:
        """The settings as the manifest's `settings` object (part of every domain's inputs hash)."""
        d = asdict(self)
        d["extensions"] = list(self.extensions)
        return d


def _normalize_extensions(extensions: Iterable[str] | None) -> tuple[str, ...]:
    out = set()
    for raw in extensions or ():
        for ext in str(raw).split(","):
            ext = ext.strip().lower()
            if not ext:
                continue
            out.add(ext if ext.startswith(".") else "." + ext)
    return tuple(sorted(out))


def make_settings(val_fraction: float = DEFAULT_VAL_FRACTION, val_tokens: int = DEFAULT_VAL_TOKENS,
                  text_field: str = "text", extensions: Iterable[str] | None = None, strict: bool = False,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS) -> Settings:
    """Validated `Settings` (ConfigError naming the option on a bad value)."""
    if not 0.0 < float(val_fraction) < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction} (--val-fraction)")
    if int(val_tokens) < 1:
        raise ConfigError(f"val_tokens must be >= 1, got {val_tokens} (--val-tokens)")
    if int(shard_tokens) < 1:
        raise ConfigError(f"shard_tokens must be >= 1, got {shard_tokens} (--shard-tokens)")
    if not text_field:
        raise ConfigError("text_field must be a non-empty field name (--text-field)")
    return Settings(float(val_fraction), int(val_tokens), str(text_field),
                    _normalize_extensions(extensions), bool(strict), int(shard_tokens))
