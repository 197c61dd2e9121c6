"""Loading a config: YAML files (a key given twice is refused), dotted CLI overrides, type coercion, dumping.

A YAML file only overrides defaults; `--section.key=value` overrides the file. Unknown keys are errors
that name the closest valid key; wrong types say which key and what is allowed. Every loaded config is
validated (velocitune/config/validation.py).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from velocitune.config.schema import Config, to_dict
from velocitune.config.validation import validate
from velocitune.errors import ConfigError

# A config file may say which format it is written in; files without the key are version 1.
CONFIG_VERSION = 1


def valid_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key the config accepts, e.g. 'train.lr'."""
    keys = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_type(cls, f.name)
        if sub is not None:
            keys += valid_keys(sub, prefix + f.name + ".")
        else:
            keys.append(prefix + f.name)
    return keys


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_type(cls: type, name: str) -> type | None:
    t = _hints(cls)[name]
    return t if dataclasses.is_dataclass(t) else None


def _unknown_key(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
    if not close:  # try the last component alone: `--lr` -> train.lr
        tail = key.split(".")[-1]
        close = [k for k in valid_keys() if k.split(".")[-1] == tail][:1] or difflib.get_close_matches(
            tail, [k.split(".")[-1] for k in valid_keys()], n=1, cutoff=0.6
        )
        close = [k for k in valid_keys() if close and k.split(".")[-1] == close[0].split(".")[-1]][:1]
    hint = f" Did you mean '{close[0]}'?" if close else " Run `velocitune train --help-config` for all keys."
    return ConfigError(f"unknown config key '{key}'.{hint}")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type `tp`, converting int->float where lossless."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(key, value, a)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and value.strip().lower() in ("inf", "+inf", ".inf", "infinity"):
            return float("inf")  # YAML reads `inf` as text; validation refuses it where a finite number is needed
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping like {{name: value}}, got {value!r}")
        _, vt = typing.get_args(tp)
        return {str(k): _coerce(f"{key}.{k}", v, vt) for k, v in value.items()}
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (vt,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, vt) for i, v in enumerate(value)]
    raise TypeError(f"unsupported config type {tp} for {key}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{prefix.rstrip('.') or '<root>'}' must be a mapping, got {data!r}")
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = prefix + str(key)
        if key not in names:
            if isinstance(value, dict) and len(value) == 1:  # `trian: {lr: ..}` -> report 'trian.lr'
                dotted += "." + str(next(iter(value)))
            raise _unknown_key(dotted)
        sub = _dataclass_type(cls, key)
        if sub is not None:
            kwargs[key] = _build(sub, value or {}, dotted + ".")
        else:
            kwargs[key] = _coerce(dotted, value, hints[key])
    return cls(**kwargs)



def from_dict(data: dict) -> Config:
    """A validated Config from a nested mapping (a YAML file's content); `version` may say its format."""
    data = dict(data or {})
    version = data.pop("version", CONFIG_VERSION)
    if version != CONFIG_VERSION:
        raise ConfigError(
            f"config 'version' is {version!r}, but this velocitune reads config version {CONFIG_VERSION}; "
            "drop the key or write the config for this version"
        )
    cfg = _build(Config, data)
    validate(cfg)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """'--train.lr=3e-4' or 'train.lr=3e-4' -> ('train.lr', 0.0003) (the value is parsed as YAML)."""
    body = text[2:] if text.startswith("--") else text
    if "=" not in body:
        raise ConfigError(f"override '{text}' must look like --section.key=value (e.g. --train.steps=200)")
    key, raw = body.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-3 as a string (no dot): accept plain float syntax too.
    if isinstance(value, str):
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    return key.strip(), value


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) < 2 or parts[0] not in {f.name for f in dataclasses.fields(Config)}:
        raise _unknown_key(key)
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{key}': '{p}' is not a section")
    node[parts[-1]] = value


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Defaults <- YAML file <- dotted overrides, type-checked and validated."""
    data: dict = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"config file '{p}' is a directory, not a YAML file")
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            data = _load_yaml_unique(p) or {}
        except _DuplicateKey as e:
            raise ConfigError(
                f"config file '{p}', line {e.line}: the key {e.key!r} is given twice (YAML would silently keep "
                f"the last one); give each key once (a domain's inputs as a list: `{e.key}: [path1, path2]`)"
            ) from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file '{p}' is not UTF-8 text ({e}); save it as UTF-8") from None
        except OSError as e:
            raise ConfigError(f"config file '{p}' cannot be read ({e})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file '{p}' is not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file '{p}' must hold a mapping of sections (train:, data:, ...)")
    for ov in overrides:
        key, value = parse_override(ov)
        set_dotted(data, key, value)
    return from_dict(data)


class _DuplicateKey(Exception):
    def __init__(self, key: Any, line: int):
        super().__init__(key, line)
        self.key, self.line = key, line


def _load_yaml_unique(path: Path) -> Any:
    """Parse YAML, refusing a mapping key given twice (PyYAML would silently keep the last)."""

    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = loader.construct_object(key_node, deep=deep)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark.line + 1)
            seen.add(key)
        return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    with open(path, encoding="utf-8") as f:
        return yaml.load(f, Loader=Loader)


def dump_yaml(cfg: Config) -> str:
    """The resolved config as YAML, loadable with `load_config` (it starts with its format version)."""
    return yaml.safe_dump({"version": CONFIG_VERSION, **to_dict(cfg)}, sort_keys=False, default_flow_style=None)

