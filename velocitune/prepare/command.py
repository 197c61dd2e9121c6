"""The `velocitune prepare` command line: its flags on top of the project's one config system, and its summary.

`velocitune prepare [CONFIG.yaml] [flags] [--section.key=value ...]` reads the same typed config as every
other command: the `prepare` section (tokenizer, domains, split and sharding settings), `data.path` (the
output directory, which `train` then reads) and `log.progress`. The flags are short names for those keys
and win over the file and the dotted overrides; `--domain NAME=PATH` replaces that domain's inputs from
the file, and repeats add inputs.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import yaml

from velocitune.config import Config, load_config, validate
from velocitune.errors import ConfigError
from velocitune.fileio import output_dir
from velocitune.prepare.merge import merge_prepared
from velocitune.prepare.pipeline import prepare_corpus
from velocitune.prepare.settings import DEFAULT_SHARD_TOKENS, DEFAULT_VAL_FRACTION, DEFAULT_VAL_TOKENS

# Top-level keys of the flat prepare files of velocitune 0.1, to say how to move them into the config.
_OLD_KEYS = {"tokenizer", "out", "domains", "val_tokens", "val_fraction", "workers", "text_field", "ext", "strict",
             "shard_tokens", "num_shards", "shard_index", "merge", "progress"}

DESCRIPTION = """\
Tokenize per-domain corpora into token shards with a fixed held-out validation set per domain.

Inputs per domain: files, directories (read recursively) or glob patterns of
  text files (.txt .md .rst .py .tex, more with --ext): one file = one document;
  JSON Lines (.jsonl .jsonl.gz .jsonl.zst): one line = one document, text in field "text";
  Parquet (.parquet): one row = one document, text in column "text";
  or a local dataset, hf:PATH[:SPLIT][:FIELD] (a save_to_disk directory, a directory of data
  files or .arrow files, read offline through `datasets`): one row = one document; SPLIT
  defaults to train (or the only split), FIELD to --text-field; hf:PATH::FIELD skips the split.
Each document is encoded without special tokens and followed by the tokenizer's EOS token.

Validation split: the documents with the lowest text hashes, i.e. those whose hash falls under
--val-fraction, in hash order until --val-tokens is reached (and at least one document when a
domain has 2 or more). It does not move when documents are added or when --num-shards changes.
It must hold one whole window of data.seq_len + 1 tokens (the config's; else an error says what to
change) and should hold 8 (a warning says so).

Reruns skip domains already finished with the same inputs and redo interrupted ones.
Sharded over N machines: run `... --num-shards N --shard-index I --out PART_I` on each, then
`velocitune prepare --merge PART_0 ... PART_N-1 --out DIR`.

The config file is the same one `targets` and `train` read: the `prepare:` section, `data.path` (the output
directory) and `log.progress`. Relative paths are relative to the working directory, as in every config.
"""

EPILOG = """\
examples:
  velocitune prepare --tokenizer tok/ --out data/ --domain code=src/ --domain math=math.jsonl.zst
  velocitune prepare --tokenizer tok/ --out data/ --domain web=hf:datasets/web:train:text
  velocitune prepare cpt.yaml --workers 8
where cpt.yaml holds, besides the training sections,
  data: {path: data/}
  prepare:
    tokenizer: tok/
    domains: {code: src/, math: [math/a.jsonl, math/b.parquet]}
    val_tokens: 500000
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `prepare` flags (the config file and dotted overrides come with every config command)."""
    parser.add_argument("--tokenizer", metavar="DIR",
                        help="local Hugging Face tokenizer directory, nothing is downloaded (prepare.tokenizer; "
                             "default: model.tokenizer, else model.path)")
    parser.add_argument("--out", metavar="DIR", help="output directory, created if needed (data.path)")
    parser.add_argument("--domain", action="append", metavar="NAME=PATH",
                        help="a domain and one input (file, directory, glob, or hf:PATH[:SPLIT][:FIELD] for a local "
                             "dataset); repeat the flag for more "
                             "domains, or with the same NAME to add inputs to a domain (prepare.domains)")
    parser.add_argument("--val-tokens", type=int, metavar="N",
                        help=f"cap on val tokens per domain (prepare.val_tokens, default {DEFAULT_VAL_TOKENS:,})")
    parser.add_argument("--val-fraction", type=float, metavar="F",
                        help=f"share of documents eligible for val (prepare.val_fraction, default {DEFAULT_VAL_FRACTION})")
    parser.add_argument("--workers", type=int, metavar="N",
                        help="tokenizer processes (prepare.workers; default: number of CPUs; 1 = in this process)")
    parser.add_argument("--text-field", metavar="NAME",
                        help='JSON field / Parquet or dataset column holding the text (prepare.text_field, default "text")')
    parser.add_argument("--ext", action="append", metavar="EXT",
                        help="extra extension(s) to read as plain text, e.g. --ext .c --ext .h or --ext c,h "
                             "(prepare.extensions)")
    parser.add_argument("--strict", action="store_true", default=None,
                        help="fail on a file that is not UTF-8 instead of skipping it with a warning (prepare.strict)")
    parser.add_argument("--shard-tokens", type=int, metavar="N",
                        help=f"tokens per output shard file (prepare.shard_tokens, default {DEFAULT_SHARD_TOKENS:,})")
    parser.add_argument("--num-shards", type=int, metavar="N",
                        help="split the work over N machines: this run writes part --shard-index (prepare.num_shards)")
    parser.add_argument("--shard-index", type=int, metavar="I", help="which part to write, 0..N-1 (prepare.shard_index)")
    parser.add_argument("--merge", nargs="+", metavar="PART_DIR",
                        help="merge the part directories of a sharded prepare into --out, then stop (prepare.merge)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                        help="no progress bars (log.progress=false)")


# flag attribute -> (section, key)
_FLAGS = {"tokenizer": ("prepare", "tokenizer"), "out": ("data", "path"), "val_tokens": ("prepare", "val_tokens"),
          "val_fraction": ("prepare", "val_fraction"), "workers": ("prepare", "workers"),
          "text_field": ("prepare", "text_field"), "ext": ("prepare", "extensions"), "strict": ("prepare", "strict"),
          "shard_tokens": ("prepare", "shard_tokens"), "num_shards": ("prepare", "num_shards"),
          "shard_index": ("prepare", "shard_index"), "merge": ("prepare", "merge"), "progress": ("log", "progress")}


def prepare_config(args: argparse.Namespace, overrides: list[str]) -> Config:
    """The config of a `prepare` run: file <- dotted overrides <- flags."""
    cfg = _load(args.config, overrides)
    for flag, (section, key) in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is not None:
            setattr(getattr(cfg, section), key, value)
    if args.domain:
        # A --domain flag replaces that domain's inputs from the config file; repeats add inputs.
        cfg.prepare.domains = {**cfg.prepare.domains, **_cli_domains(args.domain)}
    validate(cfg)
    return cfg


def _load(path: str | None, overrides: list[str]) -> Config:
    try:
        return load_config(path, overrides)
    except ConfigError:
        raw = _top_level_keys(path)
        if raw and raw <= _OLD_KEYS:
            raise ConfigError(
                f"config file '{path}' is a velocitune 0.1 prepare file (top-level keys {', '.join(sorted(raw))}). "
                f"prepare now reads the same config as the other commands: put the keys under `prepare:`, the "
                f"output directory as `data: {{path: ...}}`, `ext` as `prepare.extensions` and `progress` as "
                f"`log.progress`; relative paths are relative to the working directory"
            ) from None
        raise


def _top_level_keys(path: str | None) -> set[str]:
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, TypeError, UnicodeDecodeError, yaml.YAMLError):
        return set()
    return {str(k) for k in doc} if isinstance(doc, dict) else set()


def _cli_domains(specs: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--domain {spec!r}: expected NAME=PATH, e.g. --domain code=src/")
        out.setdefault(name, []).append(path)
    return out


def _print_summary(manifest: dict, seconds: float) -> None:
    rows = manifest["domains"]
    w0 = manifest.get("w0") or {}
    print(f"{'domain':<20} {'train tokens':>14} {'val tokens':>11} {'docs':>9} {'w0':>7}  skipped")
    for e in rows:
        docs = e["train"]["documents"] + e["val"]["documents"]
        share = f"{w0[e['name']]:.4f}" if e["name"] in w0 else "-"
        print(f"{e['name']:<20} {e['train']['tokens']:>14,} {e['val']['tokens']:>11,} {docs:>9,} "
              f"{share:>7}  {e.get('skipped_files', 0)}")
    total = sum(e["train"]["tokens"] + e["val"]["tokens"] for e in rows)
    print(f"{total:,} tokens ({manifest['dtype']}) in {seconds:.1f} s")


def run(cfg: Config) -> int:
    """Run `velocitune prepare` (or its --merge) from a resolved config."""
    pc = cfg.prepare
    out = cfg.data.path
    if not out:
        raise ConfigError("no output directory: pass --out DIR (or data.path in the config file)")
    output_dir(out, "the output directory (--out / data.path)", create=False)
    progress = cfg.log.progress
    start = time.perf_counter()
    if pc.merge:
        if pc.domains:
            raise ConfigError("--merge combines finished parts; it takes no --domain (drop one of them)")
        manifest = merge_prepared(pc.merge, out, progress=progress, seq_len=cfg.data.seq_len)
        print(f"merged {len(pc.merge)} parts into {out}")
        _print_summary(manifest, time.perf_counter() - start)
        return 0
    tokenizer = pc.tokenizer or cfg.model.tokenizer or cfg.model.path
    if tokenizer is None:
        raise ConfigError("no tokenizer: pass --tokenizer DIR (a local Hugging Face tokenizer directory), "
                          "or set prepare.tokenizer, model.tokenizer or model.path")
    if not pc.domains:
        raise ConfigError("no domains: pass --domain NAME=PATH (repeat it for each domain), or set prepare.domains")
    manifest = prepare_corpus(
        tokenizer, out, pc.domains, val_fraction=pc.val_fraction, val_tokens=pc.val_tokens, workers=pc.workers,
        text_field=pc.text_field, extensions=pc.extensions or None, strict=pc.strict, num_shards=pc.num_shards,
        shard_index=pc.shard_index, progress=progress, shard_tokens=pc.shard_tokens, seq_len=cfg.data.seq_len,
    )
    part = manifest.get("part")
    if part:
        print(f"wrote part {part['index']} of {part['count']} to {out}; merge all parts with "
              f"`velocitune prepare --merge PART_DIR ... --out DIR`")
    else:
        print(f"prepared {out}")
    _print_summary(manifest, time.perf_counter() - start)
    return 0


def main(args: argparse.Namespace, overrides: Any = ()) -> int:
    """`velocitune prepare` from parsed arguments and dotted overrides."""
    return run(prepare_config(args, list(overrides)))
