"""The bad-input catalogue: every user mistake we know of and the exact message the user gets for it,
through the CLI (`velocitune.cli.main`, stderr captured): exit status 2, one `error: ...` line, no
traceback. Plus property tests (hypothesis) that random configs and random mixing inputs only ever give a
valid result or one of velocitune's error types, and numerical robustness of the weights under long
random loss sequences, exhausted domains and the δ_min guard.

Mistakes that once gave a traceback or were silently ignored are covered by the last group of tests;
docs/reliability.md lists them with the message each gives now.
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_config, write_jsonl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from velocitune import mixing
from velocitune.cli import main
from velocitune.config import Config, dump_yaml, from_dict, load_config, valid_keys
from velocitune.errors import ConfigError, DataExhausted, VelocituneError
from velocitune.fileio import read_jsonl
from velocitune.sampler import MixtureSampler

NAMES = ["prose", "code", "math"]


# ============================================================================ helpers


@dataclass
class Ctx:
    """Paths a row may use: a scratch directory, the tiny prepared data, its tokenizer and corpus."""

    tmp: Path
    prepared: Path
    tokenizer: Path
    corpus: dict[str, Path]

    def config(self, name: str = "run", data: Path | None = None, **sections) -> Path:
        """A YAML config for a seconds-long static run (4 steps, no checkpoints) of `data` (default: the
        tiny prepared data) into tmp/name."""
        base = dict(train={"steps": 4}, mixing={"rule": "static"}, checkpoint={"interval": 0},
                    log={"progress": False})
        for sec, body in sections.items():
            base[sec] = {**base.get(sec, {}), **body}
        path = self.tmp / f"{name}.yaml"
        path.write_text(dump_yaml(tiny_config(data or self.prepared, self.tmp / name, **base)))
        return path

    def run(self, name: str = "run") -> Path:
        return self.tmp / name

    def file(self, name: str, data: str | bytes) -> Path:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data.encode() if isinstance(data, str) else data)
        return path

    def prepare(self, *domains: str, out: str = "prep", extra: tuple = ()) -> list:
        """argv of `velocitune prepare` with the tiny tokenizer; domains as NAME=PATH."""
        # data.seq_len of the tiny config (conftest): prepare checks every val split against it.
        argv = ["prepare", "--tokenizer", self.tokenizer, "--out", self.tmp / out, "--workers", "1", "--no-progress",
                "--data.seq_len=32"]
        for d in domains:
            argv += ["--domain", d]
        return argv + list(extra)


@pytest.fixture
def ctx(tmp_path, tiny_prepared, tiny_tokenizer, tiny_corpus) -> Ctx:
    return Ctx(tmp_path, tiny_prepared, tiny_tokenizer, tiny_corpus)


def cli(argv: list, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def expect_error(argv: list, capsys, message: str) -> str:
    """The command fails with exit status 2 and `message` in one `error: ...` message, no traceback."""
    rc, _, err = cli(argv, capsys)
    assert "Traceback" not in err
    assert rc == 2, f"exit status {rc}, stderr:\n{err}"
    assert "error: " in err
    assert message in err, f"expected {message!r} in:\n{err}"
    return err


def expect_ok(argv: list, capsys) -> str:
    rc, out, err = cli(argv, capsys)
    assert rc == 0, f"exit status {rc}, stderr:\n{err}"
    return out + err


# ============================================================================ the catalogue
# Each row: (id, what the user did wrong, build(ctx) -> (argv, exact message or a precise part of it)).

Row = tuple[str, str, Callable[[Ctx], tuple[list, str]]]


def _missing_corpus(c: Ctx):
    p = c.tmp / "nowhere.jsonl"
    return c.prepare(f"web={p}"), (f"error: domain 'web': input path {p} does not exist; give an existing file, "
                                   f"directory or glob pattern (--domain web=PATH)")


def _glob_matches_nothing(c: Ctx):
    p = c.tmp / "shards" / "*.jsonl"
    return c.prepare(f"web={p}"), f"error: domain 'web': the pattern {p} matches no files; check the path"


def _no_supported_files(c: Ctx):
    c.file("csvs/a.csv", "x,y\n")
    d = c.tmp / "csvs"
    return c.prepare(f"web={d}"), (f"error: domain 'web': no input files with a supported extension under ['{d}'] "
                                   "(ignored 1 .csv files; to read them as plain text pass --ext .csv)")


def _unsupported_extension(c: Ctx):
    p = c.file("table.csv", "x,y\n")
    return c.prepare(f"web={p}"), (f"error: domain 'web': {p} has an unsupported extension .csv; supported: .txt, "
                                   ".md, .rst, .py, .tex, .jsonl, .jsonl.gz, .jsonl.zst, .parquet. To read it as "
                                   "plain text (one file = one document), pass --ext .csv")


def _dangling_symlink(c: Ctx):
    d = c.tmp / "linked"
    d.mkdir()
    (d / "a.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    os.symlink(c.tmp / "gone.jsonl", d / "b.jsonl")
    return c.prepare(f"web={d}"), (f"error: domain 'web': cannot read {d / 'b.jsonl'} ([Errno 2] No such file or "
                                   f"directory: '{d / 'b.jsonl'}'); fix or remove it")


def _missing_tokenizer(c: Ctx):
    argv = c.prepare(f"math={c.corpus['math']}")
    argv[argv.index("--tokenizer") + 1] = c.tmp / "tok"
    return argv, f"error: tokenizer directory '{c.tmp / 'tok'}' does not exist; pass --tokenizer a local Hugging Face"


def _bad_domain_name(c: Ctx):
    return c.prepare(f"my domain={c.corpus['math']}"), (
        "error: domain name 'my domain' is not allowed: use letters, digits, '.', '_' or '-', starting with a "
        "letter or digit (it becomes a directory name)")


def _empty_domain(c: Ctx):
    p = c.file("empty.jsonl", "")
    return c.prepare(f"math={c.corpus['math']}", f"empty={p}"), (
        "error: domain 'empty' yields no documents: its 1 input file(s) are empty; check its paths and "
        "--text-field ('text')")


def _single_document(c: Ctx):
    p = c.file("one.jsonl", '{"text": "just one document"}\n')
    return c.prepare(f"math={c.corpus['math']}", f"one={p}"), (
        "error: domain 'one' has a single document, so a held-out val set would take all of it; give it at "
        "least 2 documents (a text file is one document: split it into several files)")


def _val_split_without_a_window(c: Ctx):
    # The tiny math domain's val split is one document of 80 tokens: no whole window of 1001 tokens.
    return c.prepare(f"math={c.corpus['math']}", extra=("--data.seq_len=1000",)), (
        "error: domain 'math': its validation split holds 80 tokens, 0 whole window(s) of data.seq_len + 1 = "
        "1001 tokens, fewer than the 1 needed to measure a val loss; raise --val-fraction (now 0.01), lower "
        "data.seq_len (now 1000) or give the domain more data")


def _val_tokens_below_a_window(c: Ctx):
    return c.prepare(f"math={c.corpus['math']}", extra=("--val-tokens", "20")), (
        "error: val_tokens 20 caps every domain's validation split below 1 window(s) of data.seq_len + 1 = 33 "
        "tokens; raise --val-tokens to at least 33 or lower data.seq_len")


def _malformed_jsonl(c: Ctx):
    p = c.file("bad.jsonl", '{"text": "fine"}\n{"text": "unterminated\n{"text": "fine"}\n')
    return c.prepare(f"web={p}"), f"error: domain 'web': {p}, line 2: malformed JSON ("


def _jsonl_not_object(c: Ctx):
    p = c.file("list.jsonl", '{"text": "fine"}\n["a", "list"]\n')
    return c.prepare(f"web={p}"), (f"error: domain 'web': {p}, line 2: a JSON list, expected an object with a "
                                   "'text' field")


def _wrong_text_field(c: Ctx):
    p = c.file("content.jsonl", '{"content": "a b c", "id": 1}\n')
    return c.prepare(f"web={p}"), (f"error: domain 'web': {p}, line 1: no field 'text'; the line has fields "
                                   "['content', 'id']. Pass --text-field NAME to read another field")


def _text_not_string(c: Ctx):
    p = c.file("num.jsonl", '{"text": 42}\n')
    return c.prepare(f"web={p}"), (f"error: domain 'web': {p}, line 1: field 'text' is a int, expected a string; "
                                   "pass --text-field NAME to read another field")


def _not_utf8_strict(c: Ctx):
    p = c.file("latin1.jsonl", b'{"text": "caf\xe9"}\n{"text": "ol\xe9"}\n')
    return c.prepare(f"math={c.corpus['math']}", f"web={p}", extra=("--strict",)), (
        f"error: domain 'web': {p} is not valid UTF-8; re-encode it (e.g. `iconv -f latin1 -t utf-8`) or remove "
        "it, or drop --strict to skip such files with a warning")


def _not_utf8_only_file(c: Ctx):
    p = c.file("latin1.jsonl", b'{"text": "caf\xe9"}\n{"text": "ol\xe9"}\n')
    return c.prepare(f"web={p}"), ("error: domain 'web' yields no documents: its 1 input file(s) are empty or not "
                                   "UTF-8 (1 skipped); check its paths and --text-field ('text')")


def _parquet_garbage(c: Ctx):
    p = c.file("bad.parquet", b"PAR1 this is not parquet")
    return c.prepare(f"web={p}"), f"error: domain 'web': {p} is not a readable Parquet file ("


def _parquet_truncated(c: Ctx):
    import pyarrow as pa
    import pyarrow.parquet as pq

    whole = c.tmp / "whole.parquet"
    pq.write_table(pa.table({"text": [f"document {i} " * 20 for i in range(2000)]}), whole, row_group_size=200)
    p = c.file("cut.parquet", whole.read_bytes()[: whole.stat().st_size // 2])
    return c.prepare(f"web={p}"), f"error: domain 'web': {p} is not a readable Parquet file ("


def _parquet_wrong_column(c: Ctx):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = c.tmp / "body.parquet"
    pq.write_table(pa.table({"body": ["a b c", "d e f"]}), p)
    return c.prepare(f"web={p}"), (f"error: domain 'web': {p} has no column 'text'; its columns are ['body']. "
                                   "Pass --text-field NAME to read another column")


def _hf_dataset(c: Ctx, name: str, **splits) -> Path:
    """A `save_to_disk` directory: a DatasetDict of `splits`, or a Dataset when only `data` is given."""
    import datasets

    path = c.tmp / name
    if list(splits) == ["data"]:
        datasets.Dataset.from_dict(splits["data"]).save_to_disk(path)
    else:
        datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(path)
    return path


def _hf_missing(c: Ctx):
    p = c.tmp / "code-ds"
    return c.prepare(f"web=hf:{p}"), (
        f"error: domain 'web': dataset path {p} does not exist. hf: reads local datasets only: on a machine with "
        "access run `datasets.load_dataset(...).save_to_disk(DIR)`, copy DIR here and pass hf:DIR")


def _hf_hub_id(c: Ctx):
    return c.prepare("web=hf:bigcode/the-stack"), (
        f"error: domain 'web': dataset path {Path.cwd() / 'bigcode/the-stack'} does not exist. It looks like a "
        "Hugging Face Hub id, not a local path. hf: reads local datasets only: on a machine with access run "
        "`datasets.load_dataset(...).save_to_disk(DIR)`, copy DIR here and pass hf:DIR")


def _hf_not_a_dataset(c: Ctx):
    c.file("notes/readme.bin", b"\x00\x01")
    p = c.tmp / "notes"
    return c.prepare(f"web=hf:{p}"), (
        f"error: domain 'web': {p} is not a dataset (neither a save_to_disk directory nor one with data files "
        "`datasets` can read); hf: reads a `save_to_disk` directory, a directory of data files (parquet, jsonl, "
        "arrow, csv) or .arrow files")


def _hf_missing_split(c: Ctx):
    p = _hf_dataset(c, "ds", train={"text": ["a", "b"]}, test={"text": ["c"]})
    return c.prepare(f"web=hf:{p}:validation"), (
        f"error: domain 'web': dataset {p} has no split 'validation'; its splits are ['train', 'test']. Name one of "
        f"them: hf:{p}:SPLIT")


def _hf_no_default_split(c: Ctx):
    p = _hf_dataset(c, "ds", en={"text": ["a", "b"]}, fr={"text": ["c", "d"]})
    return c.prepare(f"web=hf:{p}"), (
        f"error: domain 'web': dataset {p} has splits ['en', 'fr'] and none is 'train'; name the one to read: "
        f"hf:{p}:SPLIT")


def _hf_missing_field(c: Ctx):
    p = _hf_dataset(c, "ds", data={"content": ["a b", "c d"], "id": [0, 1]})
    return c.prepare(f"web=hf:{p}"), (
        f"error: domain 'web': dataset {p} has no column 'text'; its columns are ['content', 'id']. Pass "
        "hf:PATH[:SPLIT][:FIELD] with FIELD (or --text-field NAME) to read another column")


def _hf_field_not_text(c: Ctx):
    p = _hf_dataset(c, "ds", train={"text": ["a b", "c d"], "id": [0, 1]})
    return c.prepare(f"web=hf:{p}::id"), (
        f"error: domain 'web': column 'id' of dataset {p} (split 'train') has type Value('int64'), expected "
        "strings; pass hf:PATH[:SPLIT][:FIELD] with FIELD (or --text-field NAME) to read another column")


def _missing_config(c: Ctx):
    return ["train", c.tmp / "run.yaml"], f"error: config file '{c.tmp / 'run.yaml'}' does not exist"


def _invalid_yaml(c: Ctx):
    p = c.file("broken.yaml", "train: {lr: [\n")
    return ["train", p], f"error: config file '{p}' is not valid YAML: while parsing a flow node"


def _yaml_not_mapping(c: Ctx):
    p = c.file("list.yaml", "- train\n- data\n")
    return ["train", p], f"error: config file '{p}' must hold a mapping of sections (train:, data:, ...)"


def _section_not_mapping(c: Ctx):
    p = c.file("sec.yaml", "train: 5\n")
    return ["train", p], "error: config section 'train' must be a mapping, got 5"


def _missing_prepared(c: Ctx):
    p = c.tmp / "prepared"
    return ["train", c.config(), f"--data.path={p}"], (
        f"error: prepared data directory (data.path) '{p}' does not exist; run `velocitune prepare --tokenizer DIR --out {p} "
        "--domain NAME=PATH ...` first")


def _unfinished_prepared(c: Ctx):
    p = c.tmp / "prepared"
    shutil.copytree(c.prepared, p)
    (p / "manifest.json").unlink()
    return ["train", c.config(), f"--data.path={p}"], (
        f"error: {p} has no manifest.json: it was not prepared, or `velocitune prepare` did not finish; run "
        f"`velocitune prepare --tokenizer DIR --out {p} --domain NAME=PATH ...` first (a rerun resumes where it "
        "stopped)")


def _truncated_shard(c: Ctx):
    p = c.tmp / "prepared"
    shutil.copytree(c.prepared, p)
    shard = p / "code" / "train_00000.bin"
    shard.write_bytes(shard.read_bytes()[:-10])
    return ["train", c.config(), f"--data.path={p}"], (
        f"error: token shard {shard} is {shard.stat().st_size} bytes but its header promises")


def _missing_model(c: Ctx):
    p = c.tmp / "base-model"
    return ["train", c.config(), f"--model.path={p}"], (
        f"error: model path '{p}' does not exist. velocitune loads models from local directories only (it never "
        "downloads).")


def _hub_id_as_model(c: Ctx):
    return ["train", c.config(), "--model.path=HuggingFaceTB/SmolLM2-135M"], (
        "error: model path 'HuggingFaceTB/SmolLM2-135M' does not exist. It looks like a Hugging Face Hub id, not a "
        "local path.")


def _model_dir_without_config(c: Ctx):
    return ["train", c.config(), f"--model.path={c.tokenizer}"], (
        f"error: '{c.tokenizer}' is not a model directory: it has no config.json.")


def _model_dir_without_weights(c: Ctx):
    d = c.tmp / "no-weights"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 384, "hidden_size": 32,
                                               "num_hidden_layers": 1, "num_attention_heads": 2,
                                               "intermediate_size": 64}))
    return ["train", c.config(), f"--model.path={d}"], (
        f"error: could not load a causal language model from '{d}': Error no file named model.safetensors")


def _model_vocab_too_small(c: Ctx):
    from velocitune.model import build_model

    d = c.tmp / "small-vocab"
    build_model(vocab_size=100, hidden_size=32, n_layers=1, n_heads=2, intermediate_size=64,
                max_seq_len=64).save_pretrained(d)
    vocab = json.loads((c.prepared / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    return ["train", c.config(), f"--model.path={d}"], (
        f"error: the data's tokenizer has {vocab} tokens but the model's embedding has only 100 rows. Re-run "
        "`velocitune prepare` with the model's own tokenizer, or train the model the data was prepared for. "
        f"(Or resize the model first: model.resize_token_embeddings({vocab}).)")


def _config_typo(c: Ctx):
    return ["train", c.config(), "--trian.lr=1e-3"], "error: unknown config key 'trian.lr'. Did you mean 'train.lr'?"


def _config_typo_in_file(c: Ctx):
    p = c.file("typo.yaml", "mixing:\n  rul: dbl\n")
    return ["train", p], "error: unknown config key 'mixing.rul'. Did you mean 'mixing.rule'?"


def _override_without_section(c: Ctx):
    return ["train", c.config(), "--lr=1e-3"], (
        "error: unrecognised argument(s) --lr=1e-3; config overrides look like --section.key=value")


def _wrong_type(c: Ctx):
    return ["train", c.config(), "--train.lr=fast"], "error: config key 'train.lr' must be a number, got 'fast'"


def _wrong_type_int(c: Ctx):
    return ["train", c.config(), "--train.steps=2.5"], "error: config key 'train.steps' must be an integer, got 2.5"


def _negative_lr(c: Ctx):
    return ["train", c.config(), "--train.lr=-3e-4"], "error: config key 'train.lr' must be > 0, got -0.0003"


def _unknown_rule(c: Ctx):
    return ["train", c.config(), "--mixing.rule=velocitun"], (
        "error: config key 'mixing.rule' is 'velocitun'; allowed: static, uniform, temperature, velocitune, "
        "velocitune-no-target, dbl, odm, replay, aioli, ado. Did you mean 'velocitune'?")


def _weights_not_summing_to_one(c: Ctx):
    return ["train", c.config(), "--mixing.weights={prose: 0.5, code: 0.3, math: 0.3}"], (
        "error: config key 'mixing.weights' must sum to 1, they sum to 1.1")


def _weights_wrong_domains(c: Ctx):
    return ["train", c.config(), "--mixing.weights={prose: 0.5, code: 0.5}"], (
        "error: mixing.weights must name exactly the domains ['prose', 'code', 'math']; unknown [], missing ['math']")


def _interval_longer_than_run(c: Ctx):
    return ["train", c.config(), "--mixing.rule=velocitune", "--mixing.interval=10"], (
        "error: config key 'mixing.interval' is 10 but the run has only 4 steps, so the weights would never "
        "change; use a smaller interval (default: steps // 100)")


def _targets_unknown_domain(c: Ctx):
    return ["train", c.config(), "--mixing.target_values={prose: 3, code: 2, math: 1.5, poetry: 2}"], (
        "error: targets given for unknown domain(s) ['poetry']; the prepared data has ['prose', 'code', 'math']")


def _target_missing(c: Ctx):
    return ["train", c.config(), "--mixing.rule=velocitune", "--mixing.interval=2",
            "--mixing.target_values={prose: 3, code: 2}"], (
        "error: rule 'velocitune' needs a target loss for every domain; missing for ['math']. Run `velocitune "
        "targets` and set mixing.targets=PATH, or give mixing.target_values")


def _targets_file_missing(c: Ctx):
    p = c.tmp / "targets.json"  # under a rule that reads targets (static, the default here, does not need them)
    return ["train", c.config(), f"--mixing.targets={p}", "--mixing.rule=velocitune"], (
        f"error: mixing.targets: '{p}' does not exist; run `velocitune targets` first")


def _replay_without_source(c: Ctx):
    return ["train", c.config(), "--mixing.rule=replay"], (
        "error: config key 'mixing.replay_from' is required by rule 'replay' (a run directory)")


def _floor_above_one_over_k(c: Ctx):
    return ["train", c.config(), "--mixing.sampling_floor=0.5"], (
        "error: mixing.sampling_floor 0.5 is above 1/k = 0.3333 for 3 domains: the floors alone would exceed the "
        "batch; lower it")


def _micro_batch_not_dividing(c: Ctx):
    return ["train", c.config(), "--train.micro_batch_size=3"], (
        "error: train.micro_batch_size=3 must divide the per-process batch 8")


def _heads_not_dividing(c: Ctx):
    return ["train", c.config(), "--model.hidden_size=30", "--model.n_heads=4"], (
        "error: model.hidden_size=30 must be a multiple of model.n_heads=4")


def _seq_len_longer_than_domain(c: Ctx):
    return ["train", c.config(), "--data.seq_len=100000"], (
        "error: domain(s) ['prose', 'code', 'math'] hold fewer training tokens than one window of data.seq_len + "
        "1 = 100001; lower data.seq_len or add documents")


def _corpus_smaller_than_a_batch(c: Ctx):
    cfg = c.config(train={"steps": None})
    return ["train", cfg, "--train.batch_size=100000"], (
        " training windows of 33 tokens, fewer than one global batch of 100000; lower train.batch_size or "
        "data.seq_len, or add data")


def _already_holds_a_run(c: Ctx):
    cfg = c.config()
    assert main(["train", str(cfg)]) == 0
    return ["train", cfg], (f"error: run directory '{c.run()}' already holds a run; pass --resume to continue it, "
                            "or set run.out_dir")


ROWS: list[Row] = [
    ("corpus-missing", "a corpus path that does not exist", _missing_corpus),
    ("corpus-glob-empty", "a glob that matches no file", _glob_matches_nothing),
    ("corpus-no-supported-files", "a corpus directory without any supported file", _no_supported_files),
    ("corpus-unsupported-extension", "a corpus file with an unsupported extension", _unsupported_extension),
    ("corpus-dangling-symlink", "an unreadable file (dangling symlink) inside a corpus directory", _dangling_symlink),
    ("tokenizer-missing", "a tokenizer directory that does not exist", _missing_tokenizer),
    ("domain-name", "a domain name that cannot be a directory name", _bad_domain_name),
    ("domain-empty", "an empty domain", _empty_domain),
    ("domain-single-document", "a domain with a single document (no room for a val split)", _single_document),
    ("val-split-no-window", "a val split shorter than one window of data.seq_len + 1 tokens",
     _val_split_without_a_window),
    ("val-tokens-below-a-window", "a --val-tokens cap below one window of data.seq_len + 1 tokens",
     _val_tokens_below_a_window),
    ("jsonl-malformed", "malformed JSON on one line of a JSONL file", _malformed_jsonl),
    ("jsonl-not-object", "a JSONL line that is not an object", _jsonl_not_object),
    ("jsonl-wrong-field", "the text under another field name", _wrong_text_field),
    ("jsonl-text-not-string", "a text field that is not a string", _text_not_string),
    ("not-utf8-strict", "a file that is not UTF-8, with --strict", _not_utf8_strict),
    ("not-utf8-only-file", "a domain whose only file is not UTF-8 (skipped)", _not_utf8_only_file),
    ("parquet-garbage", "a .parquet file that is not Parquet", _parquet_garbage),
    ("parquet-truncated", "a truncated Parquet file", _parquet_truncated),
    ("parquet-wrong-column", "a Parquet file without the text column", _parquet_wrong_column),
    ("hf-missing", "an hf: dataset path that does not exist", _hf_missing),
    ("hf-hub-id", "a Hub dataset id as an hf: source", _hf_hub_id),
    ("hf-not-a-dataset", "an hf: directory that holds no dataset", _hf_not_a_dataset),
    ("hf-missing-split", "an hf: split the dataset does not have", _hf_missing_split),
    ("hf-no-default-split", "an hf: dataset with several splits, none of them train, and no split given",
     _hf_no_default_split),
    ("hf-missing-field", "an hf: dataset without the text column", _hf_missing_field),
    ("hf-field-not-text", "an hf: text column that does not hold strings", _hf_field_not_text),
    ("config-missing", "a config file that does not exist", _missing_config),
    ("config-invalid-yaml", "a config file that is not valid YAML", _invalid_yaml),
    ("config-not-mapping", "a config file that is a list", _yaml_not_mapping),
    ("config-section-not-mapping", "a config section that is not a mapping", _section_not_mapping),
    ("prepared-missing", "prepared data that does not exist", _missing_prepared),
    ("prepared-unfinished", "prepared data whose prepare did not finish", _unfinished_prepared),
    ("prepared-shard-truncated", "a truncated token shard", _truncated_shard),
    ("model-missing", "a model directory that does not exist", _missing_model),
    ("model-hub-id", "a Hub id instead of a local model directory", _hub_id_as_model),
    ("model-no-config", "a model directory without config.json", _model_dir_without_config),
    ("model-no-weights", "a model directory without weights", _model_dir_without_weights),
    ("model-vocab-too-small", "a model whose vocabulary is smaller than the data's tokenizer", _model_vocab_too_small),
    ("config-typo", "a typo in a config key (override)", _config_typo),
    ("config-typo-in-file", "a typo in a config key (YAML file)", _config_typo_in_file),
    ("override-no-section", "an override without its section", _override_without_section),
    ("config-wrong-type", "a string where a number is expected", _wrong_type),
    ("config-wrong-type-int", "a fraction where an integer is expected", _wrong_type_int),
    ("config-negative-lr", "a negative learning rate", _negative_lr),
    ("config-unknown-rule", "a misspelt mixing rule", _unknown_rule),
    ("weights-not-normalised", "initial weights that do not sum to 1", _weights_not_summing_to_one),
    ("weights-wrong-domains", "initial weights that miss a domain", _weights_wrong_domains),
    ("interval-longer-than-run", "mixing.interval larger than the run", _interval_longer_than_run),
    ("targets-unknown-domain", "a target for a domain the data does not have", _targets_unknown_domain),
    ("targets-missing-domain", "no target for one domain under a rule that needs targets", _target_missing),
    ("targets-file-missing", "a targets.json that does not exist", _targets_file_missing),
    ("replay-without-source", "the replay rule without a previous run", _replay_without_source),
    ("sampling-floor-too-high", "a sampling floor above 1/k", _floor_above_one_over_k),
    ("micro-batch-not-dividing", "a micro-batch that does not divide the batch", _micro_batch_not_dividing),
    ("heads-not-dividing", "a hidden size that is not a multiple of the heads", _heads_not_dividing),
    ("seq-len-too-long", "sequences longer than every domain", _seq_len_longer_than_domain),
    ("corpus-smaller-than-batch", "a corpus smaller than one global batch (one epoch by default)",
     _corpus_smaller_than_a_batch),
    ("run-dir-taken", "a second run into a directory that holds one, without --resume", _already_holds_a_run),
]


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_catalogue(row: Row, ctx, capsys):
    argv, message = row[2](ctx)
    capsys.readouterr()
    expect_error(argv, capsys, message)


# ---------------------------------------------------------------- tokenizers, and mistakes the catalogue found and that are now fixed


def _tokenizer_like(c: Ctx, out: Path, texts: list[str]) -> Path:
    """A byte-level BPE tokenizer with the same vocabulary size as the data's, trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    size = len(AutoTokenizer.from_pretrained(c.tokenizer, local_files_only=True))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    assert len(fast) == size
    fast.save_pretrained(out)
    return out


def _model_dir(c: Ctx, name: str, tokenizer_from: Path) -> Path:
    """A fresh model sized for the data's vocabulary, saved with the tokenizer files of `tokenizer_from`."""
    from velocitune.model import build_model

    vocab = json.loads((c.prepared / "manifest.json").read_text())["tokenizer"]["vocab_size"]
    d = c.tmp / name
    build_model(vocab_size=vocab, hidden_size=32, n_layers=1, n_heads=2, intermediate_size=64,
                max_seq_len=64).save_pretrained(d)
    for f in tokenizer_from.iterdir():
        shutil.copy(f, d / f.name)
    return d


def test_model_with_the_datas_own_tokenizer_trains(ctx, capsys):
    """Control for the row below: the same vocabulary size and the *same* tokenizer is fine."""
    d = _model_dir(ctx, "same-tok-model", ctx.tokenizer)
    expect_ok(["train", ctx.config(), f"--model.path={d}"], capsys)


def test_model_with_a_different_tokenizer_is_refused(ctx, capsys):
    texts = [json.loads(line)["text"][::-1] for p in ctx.corpus.values() for line in p.read_text().splitlines()]
    other = _tokenizer_like(ctx, ctx.tmp / "other-tok", texts)
    d = _model_dir(ctx, "other-tok-model", other)
    err = expect_error(["train", ctx.config(), f"--model.path={d}"], capsys,
                       "error: the data was prepared with a different tokenizer (hash ")
    assert ("the same ids would mean different tokens. Re-run `velocitune prepare` with the model's own "
            "tokenizer, or train the model the data was prepared for.") in err


def test_fresh_model_with_a_different_tokenizer_is_refused(ctx, capsys):
    texts = [json.loads(line)["text"][::-1] for p in ctx.corpus.values() for line in p.read_text().splitlines()]
    other = _tokenizer_like(ctx, ctx.tmp / "other-tok", texts)
    expect_error(["train", ctx.config(), f"--model.tokenizer={other}"], capsys,
                 "error: the data was prepared with a different tokenizer (hash ")


def test_config_file_not_utf8(ctx, capsys):
    p = ctx.file("latin1.yaml", b"run:\n  arm: caf\xe9\n")
    expect_error(["train", p], capsys, f"error: config file '{p}' is not UTF-8 text (")


def test_config_path_is_a_directory(ctx, capsys):
    expect_error(["train", ctx.tmp], capsys, f"error: config file '{ctx.tmp}' is a directory, not a YAML file")


def test_infinite_warmup(ctx, capsys):
    expect_error(["train", ctx.config(), "--train.warmup_steps=.inf"], capsys,
                 "error: config key 'train.warmup_steps' must be a finite number, got inf")


def test_infinite_lr(ctx, capsys):
    expect_error(["train", ctx.config(), "--train.lr=1e999"], capsys,
                 "error: config key 'train.lr' must be a finite number, got inf")


def test_seed_out_of_range(ctx, capsys):
    expect_error(["train", ctx.config(), f"--train.seed={2**70}"], capsys,
                 f"error: config key 'train.seed' must be an integer in [0, 2**63), got {2**70}")


def test_init_loss_file_missing(ctx, capsys):
    p = ctx.tmp / "init_loss.json"
    expect_error(["train", ctx.config(), f"--mixing.init_loss={p}"], capsys,
                 f"error: mixing.init_loss: '{p}' does not exist; run `velocitune init-loss` first, or drop the key "
                 "to measure it at step 0")


def test_tokenizer_path_missing(ctx, capsys):
    p = ctx.tmp / "tok"
    expect_error(["train", ctx.config(), f"--model.tokenizer={p}"], capsys,
                 f"error: tokenizer path '{p}' does not exist.")


def test_hf_source_without_datasets_installed(ctx, capsys, monkeypatch):
    import sys

    p = _hf_dataset(ctx, "ds", data={"text": ["a", "b"]})
    monkeypatch.setitem(sys.modules, "datasets", None)  # what `import datasets` meets when it is not installed
    expect_error(ctx.prepare(f"web=hf:{p}"), capsys,
                 "error: reading hf: sources needs the `datasets` package; pip install 'velocitune[hf]'")


def test_disk_full_during_a_log_write(ctx, capsys, monkeypatch):
    from velocitune import fileio

    def full(self, record):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))

    monkeypatch.setattr(fileio.JsonlWriter, "write", full)
    expect_error(["train", ctx.config()], capsys, "error: the disk is full ([Errno 28] No space left on device: ")


# ---------------------------------------------------------------- run-time faults through the CLI


def test_nan_loss_stops_naming_the_last_checkpoint(ctx, capsys, monkeypatch):
    import velocitune.train as T

    real, calls = T.forward_losses, {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        return out._replace(loss=out.loss * math.nan) if calls["n"] == 7 else out  # step 6

    monkeypatch.setattr(T, "forward_losses", poisoned)
    cfg = ctx.config(train={"steps": 8}, checkpoint={"interval": 4})
    expect_error(["train", cfg], capsys,
                 f"error: non-finite loss or gradient at step 6 (loss nan, grad norm nan); the last checkpoint is "
                 f"{ctx.run() / 'checkpoints' / 'step_00000004'}. Lower train.lr or raise train.warmup_steps and "
                 "resume with --resume, or set train.nan_policy=skip to skip such batches")
    rc, _, err = cli(["train", cfg, "--resume"], capsys)  # the poison is spent: resume and finish
    assert rc == 0, err
    assert [r["step"] for r in read_jsonl(ctx.run() / "metrics.jsonl")] == [4, 8]


def test_nan_loss_message_in_full(ctx, capsys, monkeypatch):
    import velocitune.train as T

    real = T.forward_losses

    def poisoned(*a, **k):
        out = real(*a, **k)
        return out._replace(loss=out.loss * math.nan)

    monkeypatch.setattr(T, "forward_losses", poisoned)
    expect_error(["train", ctx.config()], capsys,
                 "error: non-finite loss or gradient at step 0 (loss nan, grad norm nan); no checkpoint was written "
                 "yet. Lower train.lr or raise train.warmup_steps and resume with --resume, or set "
                 "train.nan_policy=skip to skip such batches")
    rc, out, err = cli(["train", ctx.config("skip"), "--train.nan_policy=skip"], capsys)
    assert rc == 0, err
    assert "warning: skipped step 3: non-finite loss (train.nan_policy=skip; 4 so far)" in out


def test_disk_full_during_a_checkpoint(ctx, capsys, monkeypatch):
    """ENOSPC in the middle of the second checkpoint: a clear message naming the intact previous one, no
    partial checkpoint left behind, and a resume once space is free ends where an uninterrupted run does."""
    from velocitune import checkpoint

    real, calls = checkpoint._write_part, {"n": 0}

    def fills_up(path, obj):
        calls["n"] += 1
        if calls["n"] == 9:  # the third part of the second checkpoint (each has six: model ... config)
            with open(path, "wb") as f:
                f.write(b"\0" * 64)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real(path, obj)

    sections = dict(train={"steps": 8}, checkpoint={"interval": 2, "keep": 3}, log={"interval": 1, "progress": False})
    cfg = ctx.config(**sections)
    monkeypatch.setattr(checkpoint, "_write_part", fills_up)
    ckpts = ctx.run() / "checkpoints"
    err = expect_error(["train", cfg], capsys,
                       f"error: the disk is full: could not write checkpoint step_00000004 under {ckpts} "
                       f"([Errno 28] No space left on device: '{ckpts}/.tmp-step_00000004-{os.getpid()}/state.json')")
    assert (f"The partial write was removed; the previous checkpoint at step 2 ({ckpts / 'step_00000002'}) is "
            "intact. Free some disk space (or keep fewer checkpoints) and resume.") in err
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]
    monkeypatch.setattr(checkpoint, "_write_part", real)  # space freed
    rc, _, err = cli(["train", cfg, "--resume"], capsys)
    assert rc == 0, err
    assert cli(["train", ctx.config("ref", **sections)], capsys)[0] == 0
    losses = [[r["loss"] for r in read_jsonl(ctx.run(n) / "metrics.jsonl")] for n in ("run", "ref")]
    assert losses[0] == losses[1] and len(losses[0]) == 8


def test_resume_with_a_changed_config(ctx, capsys):
    cfg = ctx.config(train={"steps": 6}, checkpoint={"interval": 2})
    assert cli(["train", cfg], capsys)[0] == 0
    (ctx.run() / "summary.json").unlink()  # as if stopped before the end: a finished run is not resumed
    expect_error(["train", cfg, "--resume", "--train.lr=1e-3", "--mixing.rule=uniform"], capsys,
                 "error: cannot resume: the config differs from the checkpoint's in keys that shape the run:\n"
                 "  train.lr: 0.003 -> 0.001\n"
                 "  mixing.rule: 'static' -> 'uniform'\n"
                 "Revert them, or start a new run.out_dir. Keys that may change on resume: log.*, checkpoint.*, "
                 "train.device, train.threads, train.micro_batch_size, train.compile, train.activation_checkpointing, "
                 "train.loss_kernel, train.memory_check, eval.batch_size, dist.*, run.out_dir, prepare.*, targets.*, "
                 "plan.*")
    # The allowed ones resume.
    out = expect_ok(["train", cfg, "--resume", "--log.interval=2", "--checkpoint.keep=5", "--train.threads=1",
                     "--eval.batch_size=4", "--train.micro_batch_size=4"], capsys)
    assert "resumed from step 4" in out


def test_resume_on_re_prepared_data(ctx, capsys):
    """The same data.path, re-prepared with more documents: the token stream would change, so it is refused."""
    argv = ctx.prepare(*[f"{n}={p}" for n, p in ctx.corpus.items()],
                       extra=("--val-tokens", "4096", "--val-fraction", "0.1"))
    expect_ok(argv, capsys)
    cfg = ctx.config(data=ctx.tmp / "prep", train={"steps": 4}, checkpoint={"interval": 2})
    expect_ok(["train", cfg], capsys)
    (ctx.run() / "summary.json").unlink()  # as if stopped before the end: a finished run is not resumed
    more = ctx.tmp / "more-math.jsonl"
    write_jsonl(more, [f"Q: {i} + {i} = ?\nA: {2 * i}." for i in range(400)])
    expect_ok(argv + ["--domain", f"math={more}"], capsys)
    err = expect_error(["train", cfg, "--resume"], capsys, "error: the checkpoint's sampler was built with "
                       "windows_per_domain=[")
    assert "the token stream would differ. Resume with the checkpoint's data and config" in err


def test_damaged_log_line_mid_file_on_resume(ctx, capsys):
    cfg = ctx.config(train={"steps": 6}, checkpoint={"interval": 2}, log={"interval": 1, "progress": False})
    assert cli(["train", cfg], capsys)[0] == 0
    metrics = ctx.run() / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[1] = lines[1][:20]
    metrics.write_text("\n".join(lines) + "\n")
    (ctx.run() / "summary.json").unlink()  # as if stopped before the end: a finished run is not resumed
    expect_error(["train", cfg, "--resume"], capsys,
                 f"error: {metrics}, line 2: not valid JSON (")


def test_data_exhausted_mid_run(ctx, capsys):
    err = expect_error(["train", ctx.config(), "--train.steps=1000", "--data.max_repetition=0.2"], capsys,
                       "error: data exhausted at step ")
    step = int(err.split("data exhausted at step ")[1].split(":")[0])
    assert f"Lower --train.steps to at most {step}, or raise --data.max_repetition to repeat the data" in err
    assert "max_repetition=0.2 epochs per domain" in err


# ---------------------------------------------------------------- extreme shapes of data that must work


def test_tiny_domain_with_fewer_windows_than_a_batch(ctx, capsys):
    """A domain of two short documents (a window or two, batch 8) is used up exactly once, then capped."""
    texts = [" ".join(f"{w}{i}" for w in ("the", "model", "learns", "data", "slowly") * 6) for i in range(3)]
    tiny = write_jsonl(ctx.tmp / "tiny.jsonl", texts)  # three documents, one held out for val
    domains = [f"{n}={p}" for n, p in ctx.corpus.items()] + [f"tiny={tiny}"]
    expect_ok(ctx.prepare(*domains, extra=("--val-fraction", "0.1", "--val-tokens", "4096")), capsys)
    from velocitune.shards import PreparedData

    windows = PreparedData(ctx.tmp / "prep").train("tiny").n_windows(32)
    assert 1 <= windows < 8
    expect_ok(["train", ctx.config(data=ctx.tmp / "prep", train={"steps": 12}, mixing={"rule": "uniform"})], capsys)
    summary = json.loads((ctx.run() / "summary.json").read_text())
    assert summary["tokens_per_domain"]["tiny"] == windows * 32  # every window once, never more
    assert summary["epochs_per_domain"]["tiny"] == 1.0
    assert sum(summary["tokens_per_domain"].values()) == 12 * 8 * 32  # every batch still full


def test_one_hundred_tiny_domains(ctx, capsys):
    import random

    rng = random.Random(0)
    words = "the a model learns data from every domain while loss falls".split()
    domains = []
    for i in range(100):
        p = write_jsonl(ctx.tmp / f"d{i:03d}.jsonl", [" ".join(rng.choice(words) for _ in range(60)) for _ in range(6)])
        domains.append(f"d{i:03d}={p}")
    expect_ok(ctx.prepare(*domains, extra=("--val-fraction", "0.3")), capsys)
    cfg = ctx.tmp / "hundred.yaml"
    cfg.write_text(dump_yaml(tiny_config(
        ctx.tmp / "prep", ctx.run("hundred"), train={"steps": 6, "warmup_steps": 0},
        model={"n_layers": 1}, mixing={"rule": "velocitune-no-target", "interval": 2, "target_values": None},
        eval={"max_tokens": 32}, log={"interval": 2, "progress": False}, checkpoint={"interval": 3})))
    expect_ok(["train", cfg], capsys)
    mix = read_jsonl(ctx.run("hundred") / "mixture.jsonl")
    assert [r["step"] for r in mix] == [0, 2, 4]
    for rec in mix:
        w = np.array(list(rec["sampling_weights"].values()))
        assert len(w) == 100 and np.all(w >= 0) and abs(w.sum() - 1) < 1e-12


def test_non_utf8_file_is_skipped_with_a_warning(ctx, capsys, caplog):
    bad = ctx.file("web/latin1.jsonl", b'{"text": "caf\xe9"}\n')
    write_jsonl(ctx.tmp / "web" / "good.jsonl", [f"document number {i} " * 10 for i in range(20)])
    expect_ok(ctx.prepare(f"web={ctx.tmp / 'web'}"), capsys)
    assert f"domain 'web': skipping {bad}: not valid UTF-8 (counted in the manifest's skipped_files; --strict makes " \
           "this an error)" in caplog.text
    manifest = json.loads((ctx.tmp / "prep" / "manifest.json").read_text())
    assert manifest["domains"][0]["skipped_files"] == 1


# ============================================================================ property tests (hypothesis)

_SECTIONS = [f.split(".")[0] for f in valid_keys()]
_ANY_VALUE = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
    st.lists(st.integers(-3, 50), max_size=3),
    st.dictionaries(st.sampled_from(NAMES + ["law"]), st.floats(allow_nan=True, allow_infinity=True), max_size=4),
)
_KEYS = st.one_of(st.sampled_from(valid_keys()), st.sampled_from(sorted(set(_SECTIONS))).map(lambda s: s + ".lr"),
                  st.text(min_size=1, max_size=6).map(lambda t: "train." + t))


def _nest(flat: dict) -> dict:
    out: dict = {}
    for key, value in flat.items():
        sec, name = key.split(".", 1)
        out.setdefault(sec, {})[name] = value
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flat=st.dictionaries(_KEYS, _ANY_VALUE, max_size=6),
       garbage=st.one_of(st.none(), st.tuples(st.sampled_from(sorted(set(_SECTIONS)) + ["trian"]), _ANY_VALUE)))
def test_random_configs_give_a_config_or_a_config_error(flat, garbage, tmp_path_factory):
    """Any mapping of (mostly) valid keys and values of any type: a Config, or a ConfigError naming the key.
    An accepted config, written as config.yaml, reads back as the same config."""
    data = _nest(flat)
    if garbage is not None:
        data[garbage[0]] = garbage[1]
    try:
        cfg = from_dict(data)
    except ConfigError as e:
        assert str(e).startswith(("config key '", "unknown config key '", "config section '"))
        return
    assert isinstance(cfg, Config)
    # What is accepted is written as config.yaml and must read back as the same config.
    path = tmp_path_factory.getbasetemp() / "hypothesis-config.yaml"
    path.write_text(dump_yaml(cfg))
    assert dump_yaml(load_config(path)) == dump_yaml(cfg)  # compared as text: a NaN is unequal to itself


_FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0.0, -0.0, 1e-300, 5e-324, 1e300, math.nan, math.inf, -math.inf, 1.0]))


def _vec(k: int):
    return st.lists(_FLOATS, min_size=k, max_size=k)


def _check_simplex(w: np.ndarray) -> None:
    w = np.asarray(w)
    assert np.all(np.isfinite(w)) and np.all(w >= 0), w
    assert abs(w.sum() - 1.0) < 1e-12, w


@settings(max_examples=300, deadline=None)
@given(data=st.data(), k=st.integers(1, 5))
def test_velocity_and_update_weights_never_return_nan(data, k):
    now, init, target = data.draw(_vec(k)), data.draw(_vec(k)), data.draw(_vec(k))
    floor = data.draw(st.one_of(st.just(0.02), _FLOATS))
    try:
        v = mixing.velocity(now, init, target, floor)
    except VelocituneError:
        v = None
    if v is not None:
        assert v.shape == (k,) and np.all((v >= 0) & (v <= 1)), v
    weights = data.draw(_vec(k))
    signal = data.draw(st.one_of(_vec(k), st.just(list(v) if v is not None else [0.0] * k)))
    eta, smoothing = data.draw(st.one_of(st.just(1.0), _FLOATS)), data.draw(st.one_of(st.just(0.0), _FLOATS))
    try:
        w = mixing.update_weights(weights, signal, eta, smoothing)
    except VelocituneError:
        return
    except ValueError as e:
        # The one ValueError update_weights raises: a non-finite signal (a caller's bug; velocity() never
        # returns one).
        assert str(e).startswith("signal must be finite") and not np.all(np.isfinite(signal))
        return
    _check_simplex(w)


_RULE_VALUES = st.one_of(st.none(), _FLOATS, st.sampled_from(["faithful", "robust", "fast"]))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), k=st.integers(1, 4), name=st.sampled_from(sorted(mixing.RULE_PARAMS)))
def test_every_rule_gives_valid_weights_or_a_velocitune_error(data, k, name):
    names = [f"d{i}" for i in range(k)]
    w0 = data.draw(st.one_of(_vec(k), st.just([1.0] * k)))
    keys = data.draw(st.lists(st.sampled_from(sorted(mixing.RULE_PARAMS[name]) + ["etaa"]), max_size=3, unique=True))
    params = {}
    for key in keys:
        if key in ("token_counts", "replay_weights"):
            params[key] = data.draw(_vec(k))
        else:
            params[key] = data.draw(_RULE_VALUES)
    try:
        rule = mixing.make_rule(name, w0, names, **params)
    except VelocituneError:
        return
    _check_simplex(rule.initial_weights())
    init, targets = data.draw(_vec(k)), data.draw(_vec(k))
    for step in range(data.draw(st.integers(0, 6))):
        losses = data.draw(st.one_of(_vec(k), st.lists(st.floats(0, 20), min_size=k, max_size=k)))
        sw = data.draw(st.one_of(st.none(), _vec(k), st.just(list(rule.initial_weights()))))
        try:
            upd = rule.update(step, losses, init, targets, sw)
        except VelocituneError:
            continue
        except ValueError as e:
            # Documented programmer errors only: a sampling distribution that is not one (the trainer's
            # bug, not the user's).
            assert str(e).startswith("sampling_weights must be finite"), e
            continue
        _check_simplex(upd.weights)
        if upd.velocity is not None:
            assert np.all(np.isfinite(upd.velocity)), upd.velocity


# ============================================================================ numerical robustness


def _reference_update(w: np.ndarray, v: np.ndarray, eta: float, c: float) -> np.ndarray:
    """docs/design.md §3 written out independently: normalize(w·exp(ηV)), then (1 − c)·w + c/k."""
    w = w * np.exp(eta * v)
    w = w / w.sum()
    w = (1 - c) * w + c / len(w)
    return w / w.sum()


@pytest.mark.parametrize("preset,c", [("faithful", 0.0), ("robust", mixing.PRESETS["robust"]["smoothing"])])
def test_starved_domain_recovers_as_the_rule_says(preset, c):
    """Phase 1: domain 0 at its target (V=0), the others far behind (V=1): it is starved. Phase 2: it falls
    behind alone (V=1): its weight climbs back by e^η per update relative to the others, exactly as the
    rule written out independently says, and never goes NaN, negative or unnormalised."""
    names = ["a", "b", "c", "d"]
    init, target = np.array([3.0, 3.0, 3.0, 3.0]), np.array([2.0, 2.0, 2.0, 2.0])
    rule = mixing.make_rule("velocitune", [0.25] * 4, names, preset=preset)
    w = np.full(4, 0.25)
    behind, at_target = 3.0, 2.0  # V = 1 and V = 0
    for step in range(1, 41):
        losses = np.array([at_target, behind, behind, behind])
        upd = rule.update(step, losses, init, target)
        w = _reference_update(w, np.array([0.0, 1.0, 1.0, 1.0]), 1.0, c)
        np.testing.assert_allclose(upd.weights, w, rtol=1e-9, atol=1e-300)
        _check_simplex(upd.weights)
    starved = upd.weights[0]
    assert starved < (1e-12 if c == 0 else 2 * c / 4)
    # Smoothing caps any weight below 1: the fixed point of w -> (1-c)·e·w/(e·w + 1 - w) + c/4 (0.77 at c = 0.2).
    top = 0.9 if c == 0 else 0.7
    steps_back = 0
    for step in range(41, 200):
        losses = np.array([behind, at_target, at_target, at_target])
        upd = rule.update(step, losses, init, target)
        before = w
        w = _reference_update(w, np.array([1.0, 0.0, 0.0, 0.0]), 1.0, c)
        np.testing.assert_allclose(upd.weights, w, rtol=1e-9)
        if c == 0:  # the ratio to any other domain grows by exactly e^η per update
            np.testing.assert_allclose(upd.weights[0] / upd.weights[1], before[0] / before[1] * math.e, rtol=1e-9)
        steps_back += 1
        if upd.weights[0] > top:
            break
    assert upd.weights[0] > top
    # The number of updates to recover follows from the ratio alone: from r0 to r > 0.9/(0.1/3).
    r0 = starved / ((1 - starved) / 3)
    if c == 0:
        assert steps_back == math.ceil(math.log((0.9 / (0.1 / 3)) / r0))


def test_guarded_exhausted_domain_interacts_with_the_caps():
    """Domain 'replay' is guarded (ℓ_init <= ℓ_target) and behind its target, so V = 1 and the rule keeps
    raising its state weight w; but its data runs out (max_repetition), so its sampling weight ŵ must drop
    to 0 and the others share the batch in proportion to their w. With η = 20 the others' w underflow to
    exactly 0 within a few dozen updates (faithful: no smoothing lifts them); ŵ must then still be a
    distribution, spread evenly over the domains with data left."""
    names = ["replay", "code", "math"]
    rule = mixing.make_rule("velocitune", [0.2, 0.5, 0.3], names, preset="faithful", eta=20.0)
    init, target = np.array([2.0, 3.0, 3.0]), np.array([2.5, 2.0, 2.0])  # replay: init <= target
    sampler = MixtureSampler(seed=0, global_batch=8, windows_per_domain=[6, 4000, 4000],
                             initial_weights=rule.initial_weights(), max_repetition=1.0, names=names)
    seen_underflow = False
    for step in range(0, 240):
        plan = sampler.plan(step)
        assert plan.counts.sum() == 8 and np.all(plan.consumed_after <= sampler.allowance)
        _check_simplex(plan.sampling_weights)
        if step % 4 == 3:
            losses = np.array([2.6, 2.0, 2.0])  # replay above its target; the others at theirs
            upd = rule.update(step + 1, losses, init, target, plan.sampling_weights)
            assert upd.guarded == ["replay"]
            assert upd.velocity[0] == 1.0 and np.all(upd.velocity[1:] == 0.0)
            w_hat = sampler.set_weights(step + 1, upd.weights)
            _check_simplex(upd.weights)
            _check_simplex(w_hat)
            if step > 40:  # replay's 6 windows are long gone (in draws and in expectation)
                assert w_hat[0] == 0.0
                rest = upd.weights[1:]
                if rest.sum() > 0:
                    np.testing.assert_allclose(w_hat[1:], rest / rest.sum(), rtol=1e-9)
                else:  # the others underflowed to 0: the batch is spread evenly over them
                    seen_underflow = True
                    np.testing.assert_allclose(w_hat[1:], [0.5, 0.5])
    assert seen_underflow and rule.state_dict()["weights"] == [1.0, 0.0, 0.0]
    assert sampler.consumed(240)[0] == 6  # every replay window exactly once


def test_caps_with_subnormal_weights_compute_without_overflow():
    import warnings

    from velocitune.sampler import cap_weights

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        np.testing.assert_allclose(cap_weights([1.0, 1e-320, 3e-320], [0.0, 1.5, 1.5]), [0.0, 0.25, 0.75])


@pytest.mark.parametrize("seed", range(6))
def test_long_random_loss_sequences_keep_weights_valid_until_data_runs_out(seed):
    """Random (often extreme) losses every m steps, through an adaptive rule and a sampler whose domains run
    out at different times: weights stay on the simplex, an exhausted domain gets no draws, and DataExhausted
    comes exactly when fewer than a batch of draws is left."""
    rng = np.random.default_rng(seed)
    k = int(rng.integers(2, 6))
    names = [f"d{i}" for i in range(k)]
    windows = rng.integers(3, 120, size=k)
    init = rng.uniform(1.0, 6.0, size=k)
    target = np.maximum(init + rng.uniform(-2.0, 0.5, size=k), 0.1)  # some guarded (target above init)
    name = ["velocitune", "velocitune", "velocitune-no-target", "dbl", "odm", "velocitune"][seed]
    params = {"eta": float(rng.uniform(0.1, 5.0))} if name != "odm" else {"alpha": float(rng.uniform(0, 0.99))}
    if name.startswith("velocitune"):
        params["preset"] = ["faithful", "robust"][seed % 2]
    rule = mixing.make_rule(name, rng.dirichlet(np.ones(k)), names, **params)
    sampler = MixtureSampler(seed=seed, global_batch=8, windows_per_domain=windows,
                             initial_weights=rule.initial_weights(),
                             max_repetition=float(rng.choice([0.3, 0.5, 1.0])), names=names,
                             floor=float(rng.choice([0.0, 0.5 / k])))
    m = int(rng.integers(1, 5))
    for step in range(10_000):
        try:
            plan = sampler.plan(step)
        except DataExhausted as e:
            left = int((sampler.allowance - sampler.consumed(step)).sum())
            assert left < 8 and f"only {left} remain" in str(e)
            break
        _check_simplex(plan.sampling_weights)
        # An exhausted domain gets no draws (its ŵ caps its *expected* draws, which may trail by < 1).
        assert np.all(plan.counts[plan.consumed_after - plan.counts >= sampler.allowance] == 0)
        assert np.all(plan.consumed_after <= sampler.allowance)
        if step % m == m - 1:
            extreme = rng.choice([0.0, 1e-9, 1e6, float(rng.uniform(0, 10))], size=k)
            losses = np.where(rng.random(k) < 0.3, extreme, rng.uniform(0.5, 8.0, size=k))
            upd = rule.update(step + 1, losses, init, target, plan.sampling_weights)
            _check_simplex(upd.weights)
            try:
                _check_simplex(sampler.set_weights(step + 1, upd.weights))
            except DataExhausted:
                break
    else:
        raise AssertionError("the data never ran out")


# ---------------------------------------------------------------- paths of the wrong kind, every command

_FILE, _DIR = "<file>", "<dir>"
WRONG_KIND = [
    ("train config", ["train", _DIR], "config file '<dir>' is a directory, not a YAML file"),
    ("data.path", ["train", "--data.path=<file>"], "prepared data directory (data.path) '<file>' is a file"),
    ("model.path", ["train", "CFG", "--model.path=<file>"], "model path '<file>' is a file"),
    ("model.tokenizer", ["train", "CFG", "--model.tokenizer=<file>"], "tokenizer path '<file>' is a file"),
    ("mixing.targets", ["train", "CFG", "--mixing.rule=dbl", "--mixing.interval=1", "--mixing.targets=<dir>"],
     "targets file '<dir>' is a directory; point at the JSON file"),
    ("mixing.init_loss", ["train", "CFG", "--mixing.init_loss=<dir>"],
     "initial-loss file '<dir>' is a directory; point at the JSON file"),
    ("mixing.replay_from", ["train", "CFG", "--mixing.rule=replay", "--mixing.replay_from=<file>"],
     "mixing.replay_from '<file>' is a file, but a directory is needed here"),
    ("run.out_dir", ["train", "CFG", "--run.out_dir=<file>"], "run.out_dir '<file>' cannot be created: '<file>' is a file"),
    ("init-loss --out", ["init-loss", "CFG", "--out=<dir>"], "the initial-loss file (--out) '<dir>' is a directory"),
    ("targets --out", ["targets", "CFG", "--out=<dir>"], "the targets file (--out) '<dir>' is a directory"),
    ("prepare --tokenizer", ["prepare", "--tokenizer=<file>", "--out=<tmp>/o", "--domain", "a=<file>"],
     "tokenizer directory '<file>' is a file, but a directory is needed here"),
    ("prepare --out", ["prepare", "--tokenizer=<tok>", "--out=<file>", "--domain", "a=<file>"],
     "the output directory (--out / data.path) '<file>' cannot be created: '<file>' is a file"),
    ("prepare --merge", ["prepare", "--merge", "<file>", "--out=<tmp>/m"], "part directory '<file>' is a file"),
    ("report RUN_DIR", ["report", "<file>"], "run directory '<file>' is a file, but a directory is needed here"),
    ("report --out", ["report", "<run>", "--out", "<file>"], "the report folder (--out) '<file>' cannot be created"),
    ("sweep config", ["sweep", "<dir>", "--seeds", "1"], "sweep config '<dir>' is a directory, but a file is needed"),
    ("sweep --out", ["sweep", "CFG", "--out", "<file>", "--seeds", "1"], "the sweep root (--out) '<file>' cannot be created"),
    ("demo --out", ["demo", "--out", "<file>"], "the demo directory (--out) '<file>' cannot be created"),
]


@pytest.fixture(scope="module")
def finished_static_run(tmp_path_factory, tiny_prepared):
    from velocitune.train import train

    out = tmp_path_factory.mktemp("kinds") / "run"
    train(tiny_config(tiny_prepared, out, train={"steps": 2}, mixing={"rule": "static"},
                      checkpoint={"interval": 0, "save_final": False}))
    return out


@pytest.mark.parametrize("argv, message", [c[1:] for c in WRONG_KIND], ids=[c[0] for c in WRONG_KIND])
def test_a_path_of_the_wrong_kind_is_one_clear_error(ctx, capsys, argv, message, finished_static_run):
    """Every path a command takes: a file where a directory belongs, or the reverse, is named as such."""
    f, d = ctx.tmp / "afile", ctx.tmp / "adir"
    f.write_text("x")
    d.mkdir()
    subst = {"<file>": str(f), "<dir>": str(d), "<tmp>": str(ctx.tmp), "<tok>": str(ctx.tokenizer),
             "<run>": str(finished_static_run), "CFG": str(ctx.config())}

    def fill(text: str) -> str:
        for key, value in subst.items():
            text = text.replace(key, value)
        return text

    expect_error([fill(a) for a in argv], capsys, fill(message))
