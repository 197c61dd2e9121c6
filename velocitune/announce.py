"""What a run says about itself on the terminal before it starts: one compact line of its resolved config, and
`warning:` lines.

The whole config goes to the run directory's config.yaml (and to the terminal with `--verbose`); the terminal
gets one line: the keys a reader checks first, then every key that differs from its default. Warnings go to
stderr, from rank 0 only under torchrun, so that they are not lost in (or multiplied by) the progress output.
"""

from __future__ import annotations

import os
import sys

from velocitune.config import Config, to_dict

# Keys the line always shows, in front (so the list of changed keys leaves them out).
SHOWN = ("mixing.rule", "mixing.signal", "train.steps", "train.batch_size", "data.seq_len", "train.lr",
         "model.path", "data.path", "run.out_dir")
LIST_ITEMS = 4  # a longer list is shown by its first and last items and its length


def _value(v: object) -> str:
    """A config value, short: numbers in %g, a long list abbreviated, a dict as {key: value, ...}."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "null"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        items = [_value(x) for x in v]
        if len(items) > LIST_ITEMS:
            items = [*items[:2], "…", items[-1]]
            return f"[{', '.join(items)}] ({len(v)})"
        return f"[{', '.join(items)}]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_value(x)}" for k, x in v.items()) + "}"
    return str(v)


def changed_keys(cfg: Config) -> dict[str, object]:
    """Every dotted key whose value differs from the schema's default, in config order."""
    now, default = to_dict(cfg), to_dict(Config())
    return {f"{sec}.{key}": val for sec, body in now.items() for key, val in body.items()
            if val != default.get(sec, {}).get(key)}


def config_line(cfg: Config, steps: int, signal: str | None) -> str:
    """One line for the terminal: rule (and the signal it updates from, None for a rule that never updates),
    the resolved steps, batch, LR, model, data and run directory, then the other keys set away from their
    defaults. `--verbose` prints the whole config instead; config.yaml always holds it."""
    m, t = cfg.mixing, cfg.train
    head = [f"rule={m.rule}"] + ([f"signal={signal}"] if signal else [])
    head += [f"steps={steps}", f"batch={t.batch_size}×{cfg.data.seq_len}", f"lr={t.lr:g}",
             f"model={cfg.model.path or 'fresh'}", f"data={cfg.data.path}", f"out={cfg.run.out_dir}"]
    rest = [f"{k}={_value(v)}" for k, v in changed_keys(cfg).items() if k not in SHOWN]
    return "config: " + " ".join(head) + ("; set: " + " ".join(rest) if rest else "") + " (all keys: --verbose)"


def warn(text: str) -> None:
    """Print `warning: text` to stderr, once: on rank 0 under torchrun (RANK unset: a single process)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"warning: {text}", file=sys.stderr)
