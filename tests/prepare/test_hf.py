"""Tests for velocitune.prepare.hf: `hf:PATH[:SPLIT][:FIELD]` sources give the same split and the same shards
as the same documents in files, stream in bounded batches, reuse finished domains, and fetch nothing."""

from __future__ import annotations

import json
import os
import socket

import pytest
from conftest import paragraphs, read_tree, run_prepare, write_docs

from velocitune.errors import DataError
from velocitune.prepare import hf, pipeline

datasets = pytest.importorskip("datasets")
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(autouse=True)
def _local_only(monkeypatch, tmp_path):
    """Any network connection fails the test; the library's cache (lock files of load_dataset) goes to tmp."""

    def refuse(*a, **k):
        raise AssertionError("an hf: source tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))
    datasets.disable_progress_bars()


def _save(path, columns: dict, **splits) -> str:
    """`save_to_disk` of a Dataset of `columns`, or of a DatasetDict when `splits` are given."""
    if splits:
        datasets.DatasetDict({k: datasets.Dataset.from_dict(v) for k, v in splits.items()}).save_to_disk(path)
    else:
        datasets.Dataset.from_dict(columns).save_to_disk(path)
    return str(path)


DOCS = paragraphs(21, 90, 5, 60) + ["", "  spaces  "] + paragraphs(22, 30, 30, 80)


@pytest.mark.parametrize("layout", ["saved", "dict", "files", "arrow"])
def test_same_split_and_byte_identical_shards_as_jsonl(layout, tmp_path, tokenizer_dir, monkeypatch):
    """The key invariant: the same documents as JSONL and as a dataset give the same train/val shards."""
    from velocitune.prepare import split

    monkeypatch.setattr(split, "_BATCH_DOCS", 7)  # several tokenizer batches
    monkeypatch.setattr(hf, "_BATCH_ROWS", 16)  # and several dataset batches
    texts = DOCS + [None]  # a null document is skipped, as in files
    jsonl = write_docs(tmp_path / "docs.jsonl", texts)
    cols = {"text": texts, "id": list(range(len(texts)))}
    if layout == "saved":
        spec = "hf:" + _save(tmp_path / "ds", cols)
    elif layout == "dict":  # train chosen by default among several splits
        spec = "hf:" + _save(tmp_path / "ds", None, train=cols, test={"text": ["held", "out"], "id": [0, 1]})
    elif layout == "files":  # a directory of data files, streamed through load_dataset
        (tmp_path / "ds").mkdir()
        write_docs(tmp_path / "ds" / "train.jsonl", texts)
        spec = f"hf:{tmp_path / 'ds'}"
    else:  # the Arrow files of a saved dataset, by glob
        spec = f"hf:{_save(tmp_path / 'ds', cols)}/*.arrow"
    kw = dict(val_fraction=0.1, val_tokens=300, shard_tokens=500)
    ref = run_prepare(tokenizer_dir, tmp_path / "ref", {"web": [str(jsonl)]}, **kw)
    got = run_prepare(tokenizer_dir, tmp_path / "got", {"web": [spec]}, **kw)
    a, b = read_tree(tmp_path / "ref"), read_tree(tmp_path / "got")
    shards = [k for k in a if k.endswith(".bin")]
    assert len([k for k in shards if "/train_" in k]) >= 2 and any("/val_" in k for k in shards)
    assert {k: a[k] for k in shards} == {k: b[k] for k in b if k.endswith(".bin")}
    for key in ("train", "val", "empty_documents", "skipped_files"):
        assert got["domains"][0][key] == ref["domains"][0][key]
    assert got["domains"][0]["empty_documents"] == 2  # "" and null ("  spaces  " is a document)
    assert got["w0"] == ref["w0"]
    split_name = {"saved": "", "arrow": "", "dict": "train", "files": "train"}[layout]
    assert got["domains"][0]["sources"] == [f"{spec}:{split_name}:text"]


def test_split_and_field_of_the_spec(tmp_path, tokenizer_dir):
    """hf:PATH:SPLIT:FIELD reads that split's column; hf:PATH::FIELD keeps the default split."""
    body = paragraphs(3, 40)
    path = _save(tmp_path / "ds", None, train={"body": paragraphs(4, 40)}, valid={"body": body})
    jsonl = write_docs(tmp_path / "valid.jsonl", body)
    kw = dict(val_fraction=0.1, val_tokens=200)
    ref = run_prepare(tokenizer_dir, tmp_path / "ref", {"d": [str(jsonl)]}, **kw)
    got = run_prepare(tokenizer_dir, tmp_path / "got", {"d": [f"hf:{path}:valid:body"]}, **kw)
    assert got["domains"][0]["train"] == ref["domains"][0]["train"]
    assert got["domains"][0]["sources"] == [f"hf:{path}:valid:body"]
    # The split left out: train; the field from text_field (--text-field).
    other = run_prepare(tokenizer_dir, tmp_path / "other", {"d": [f"hf:{path}"]}, text_field="body", **kw)
    assert other["domains"][0]["sources"] == [f"hf:{path}:train:body"]
    assert other["domains"][0]["train"]["tokens"] != got["domains"][0]["train"]["tokens"]
    skip = run_prepare(tokenizer_dir, tmp_path / "skip", {"d": [f"hf:{path}::body"]}, **kw)
    assert read_tree(tmp_path / "skip")["d/train_00000.bin"] == read_tree(tmp_path / "other")["d/train_00000.bin"]
    assert skip["domains"][0]["sources"] == [f"hf:{path}:train:body"]


def test_parse_spec():
    assert hf.parse_spec("d", "hf:data/x") == ("data/x", None, None)
    assert hf.parse_spec("d", "hf:data/x:test") == ("data/x", "test", None)
    assert hf.parse_spec("d", "hf:data/x::body") == ("data/x", None, "body")
    assert hf.parse_spec("d", "hf:data/x:test:body") == ("data/x", "test", "body")
    with pytest.raises(DataError, match=r"'hf:a:b:c:d' is not a dataset source; expected hf:PATH\[:SPLIT\]"):
        hf.parse_spec("d", "hf:a:b:c:d")


def test_rerun_reuses_and_a_changed_dataset_is_redone(tmp_path, tokenizer_dir, monkeypatch):
    path = _save(tmp_path / "ds", {"text": paragraphs(5, 40)})
    domains = {"web": [f"hf:{path}"]}
    first = run_prepare(tokenizer_dir, tmp_path / "out", domains, val_fraction=0.1)
    scanned = []
    real_scan = pipeline.scan_domain
    monkeypatch.setattr(pipeline, "scan_domain", lambda name, *a, **k: scanned.append(name) or real_scan(name, *a, **k))
    assert run_prepare(tokenizer_dir, tmp_path / "out", domains, val_fraction=0.1) == first
    assert scanned == []
    # Saved again with one more document: its files change, so the domain is redone.
    _save(tmp_path / "ds2", {"text": paragraphs(5, 40) + ["one more document"]})
    os.replace(tmp_path / "ds2" / "data-00000-of-00001.arrow", tmp_path / "ds" / "data-00000-of-00001.arrow")
    again = run_prepare(tokenizer_dir, tmp_path / "out", domains, val_fraction=0.1)
    assert scanned == ["web"]
    assert again["domains"][0]["inputs_hash"] != first["domains"][0]["inputs_hash"]
    docs = lambda m: m["domains"][0]["train"]["documents"] + m["domains"][0]["val"]["documents"]  # noqa: E731
    assert docs(again) == docs(first) + 1


def test_inputs_hash_depends_on_split_and_field(tmp_path):
    path = _save(tmp_path / "ds", None, train={"a": ["x y"], "b": ["z"]}, test={"a": ["x"], "b": ["y"]})
    settings = pipeline.make_settings()
    digest = lambda spec: pipeline.inputs_hash(  # noqa: E731
        pipeline.list_domain_files("d", [spec], ())[0], "tok", 0, settings)
    hashes = {digest(f"hf:{path}:{s}:{f}") for s in ("train", "test") for f in ("a", "b")}
    assert len(hashes) == 4
    assert digest(f"hf:{path}:train:a") == digest(f"hf:{path}::a")


def test_reading_is_batched(tmp_path, monkeypatch):
    """The column is never materialised whole: rows come from `iter` in batches of _BATCH_ROWS."""
    path = _save(tmp_path / "ds", {"text": [f"doc {i}" for i in range(50)], "pad": ["x" * 100] * 50})
    monkeypatch.setattr(hf, "_BATCH_ROWS", 8)
    sizes = []
    real_iter = datasets.Dataset.iter

    def spy(self, batch_size, *a, **k):
        for batch in real_iter(self, batch_size, *a, **k):
            sizes.append(batch.num_rows)
            assert batch.column_names == ["text"]  # only the text column is read
            yield batch

    monkeypatch.setattr(datasets.Dataset, "iter", spy)
    (f,), _ = pipeline.list_domain_files("d", [f"hf:{path}"], ())
    sizes.clear()
    from velocitune.prepare.sources import iter_documents

    assert [t for _, t in iter_documents(f, "text", "d")] == [f"doc {i}" for i in range(50)]
    assert sizes == [8] * 6 + [2]


def test_offline_is_restored_after_reading(tmp_path):
    import huggingface_hub.constants as hub

    before = (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE, os.environ.get("HF_DATASETS_OFFLINE"))
    path = _save(tmp_path / "ds", {"text": ["a", "b"]})
    (f,), _ = pipeline.list_domain_files("d", [f"hf:{path}"], ())
    docs = hf.iter_documents("d", f.path, f.dataset)
    next(docs)
    assert datasets.config.HF_HUB_OFFLINE is True and hub.HF_HUB_OFFLINE is True
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    list(docs)
    assert (datasets.config.HF_HUB_OFFLINE, hub.HF_HUB_OFFLINE, os.environ.get("HF_DATASETS_OFFLINE")) == before


def test_a_non_utf8_arrow_column_is_skipped_like_a_file(tmp_path, tokenizer_dir):
    import pyarrow as pa

    bad = pa.array([b"caf\xe9", b"ol\xe9"], type=pa.binary()).view(pa.string())  # invalid UTF-8, unchecked
    with pa.OSFile(str(tmp_path / "bad.arrow"), "wb") as sink, pa.ipc.new_stream(sink, pa.schema([("text", pa.string())])) as w:
        w.write_table(pa.table({"text": bad}))
    good = _save(tmp_path / "good", {"text": paragraphs(6, 30)})
    out = run_prepare(tokenizer_dir, tmp_path / "out", {"d": [f"hf:{tmp_path / 'bad.arrow'}", f"hf:{good}"]},
                      val_fraction=0.1)
    assert out["domains"][0]["skipped_files"] == 1
    assert out["domains"][0]["train"]["documents"] + out["domains"][0]["val"]["documents"] == 30


def test_a_damaged_data_file_met_mid_stream_is_one_data_error(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setattr(hf, "_BATCH_ROWS", 4)
    (tmp_path / "ds").mkdir()
    good = write_docs(tmp_path / "ds" / "train.jsonl", paragraphs(7, 20)).read_text()
    (tmp_path / "ds" / "train.jsonl").write_text(good + '{"text": "unterminated\n')
    with pytest.raises(DataError) as err:
        run_prepare(tokenizer_dir, tmp_path / "out", {"d": [f"hf:{tmp_path / 'ds'}"]}, val_fraction=0.1)
    assert str(err.value).startswith(f"domain 'd': cannot read dataset {tmp_path / 'ds'} (split 'train') (")
    assert str(err.value).endswith("); a data file is corrupt or truncated: replace or remove it")


def test_a_plain_file_is_not_a_dataset(tmp_path):
    p = write_docs(tmp_path / "a.jsonl", ["x", "y"])
    with pytest.raises(DataError, match=f"domain 'd': {p} is not a dataset \\(a file that is not .arrow; to read "
                                        "a data file as it is, pass its path without hf:\\)"):
        pipeline.list_domain_files("d", [f"hf:{p}"], ())


def test_cli_flag_and_yaml_domains_take_hf_specs(tmp_path, tokenizer_dir, monkeypatch):
    """`--domain NAME=hf:...` and `prepare.domains` in YAML (relative to the working directory) both read it."""
    from velocitune.cli import main

    monkeypatch.chdir(tmp_path)
    _save(tmp_path / "ds", None, train={"text": paragraphs(8, 30)}, test={"text": ["x", "y"]})
    (tmp_path / "cpt.yaml").write_text(
        f"data: {{path: prepared, seq_len: 8}}\nmodel: {{tokenizer: {tokenizer_dir}}}\n"
        "prepare:\n  domains:\n    a: hf:ds\n  val_fraction: 0.2\n  workers: 1\nlog: {progress: false}\n")
    assert main(["prepare", "cpt.yaml", "--domain", "b=hf:ds:train:text"]) == 0
    m = json.loads((tmp_path / "prepared" / "manifest.json").read_text())
    assert [e["sources"] for e in m["domains"]] == [[f"hf:{tmp_path / 'ds'}:train:text"]] * 2
    tree = read_tree(tmp_path / "prepared")
    assert tree["a/train_00000.bin"] == tree["b/train_00000.bin"] and tree["a/val_00000.bin"] == tree["b/val_00000.bin"]


def test_sharded_prepare_of_a_dataset_merges_to_the_one_machine_result(tmp_path, tokenizer_dir):
    from velocitune.prepare import merge_prepared

    domains = {"web": [f"hf:{_save(tmp_path / 'ds', {'text': paragraphs(9, 60)})}"]}
    kw = dict(val_fraction=0.1, shard_tokens=400)
    run_prepare(tokenizer_dir, tmp_path / "single", domains, **kw)
    parts = [tmp_path / f"p{i}" for i in range(3)]
    for i, p in enumerate(parts):
        run_prepare(tokenizer_dir, p, domains, num_shards=3, shard_index=i, **kw)
    merge_prepared(parts, tmp_path / "merged", progress=False)
    assert read_tree(tmp_path / "merged") == read_tree(tmp_path / "single")
