"""Tests for velocitune.prepare: every input format end to end, the val split rule, reruns,
interruptions, sharded prepare + merge, the CLI, and one test per kind of bad input."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import logging
import random
from pathlib import Path

import numpy as np
import pytest

from velocitune import prepare as prep
from velocitune.errors import ConfigError, DataError
from velocitune.prepare import add_arguments, main, merge_prepared, prepare_corpus
from velocitune.shards import PreparedData, open_shard

EOS = "<|endoftext|>"
WORDS = ("alpha beta gamma delta model token shard domain loss weight velocity learn code math "
         "def return import class for while if else print value").split()


def _paragraphs(seed: int, n: int, lo: int = 5, hi: int = 40) -> list[str]:
    rng = random.Random(seed)
    # The index makes every document distinct (identical documents share a hash by design).
    return [f"{i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))) for i in range(n)]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_paragraphs(99, 200) + ["def f(x):\n    return x * 2\n"] * 20, trainer)
    out = tmp_path_factory.mktemp("tokenizer")
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def hf(tokenizer_dir):
    """The reference: the same tokenizer through transformers' own __call__ (not prepare's path)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


def _ref(hf, text: str) -> list[int]:
    return hf(text, add_special_tokens=False)["input_ids"] + [hf.eos_token_id]


def _h(text: str) -> int:
    """The documented val hash: blake2b-64 of the UTF-8 text, big-endian."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def _stream(out: Path, manifest: dict, name: str, split: str) -> np.ndarray:
    entry = next(e for e in manifest["domains"] if e["name"] == name)
    parts = [np.asarray(open_shard(out / rel)) for rel in entry[split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def _docs(stream: np.ndarray, eos: int) -> list[list[int]]:
    """Split a token stream back into documents (each ends with EOS)."""
    assert stream.size == 0 or stream[-1] == eos
    cuts = np.flatnonzero(stream == eos)
    return [stream[a + 1 : b + 1].tolist() for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]


def _write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def _run(tok, out, domains, **kw) -> dict:
    kw.setdefault("workers", 1)
    kw.setdefault("progress", False)
    return prepare_corpus(tok, out, domains, **kw)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- every input format, end to end --------------------------------------------------------------


def _all_formats(root: Path) -> dict[str, list[str]]:
    """One domain per format; returns the documents each should yield, in the documented order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    docs: dict[str, list[str]] = {}
    text = root / "text"
    (text / "sub").mkdir(parents=True)
    (text / ".git").mkdir()
    files = {"b.md": "# Title\n\nsome markdown", "a.txt": "plain text file", "sub/c.py": "def f(x):\n    return x",
             "sub/d.rst": "Heading\n=======", "e.tex": "\\section{Intro} math $x^2$",
             "z.c": "int main() { return 0; }"}
    for rel, t in files.items():
        (text / rel).write_text(t)
    (text / ".hidden.txt").write_text("hidden files are skipped")
    (text / ".git" / "x.txt").write_text("so are hidden directories")
    (text / "data.csv").write_text("a,b\n1,2")  # not a supported extension: ignored
    (text / "empty.txt").write_text("")  # an empty document: skipped, counted
    # Sorted by full path: a.txt, b.md, e.tex, sub/c.py, sub/d.rst, z.c (via --ext .c).
    docs["text"] = [files[k] for k in ["a.txt", "b.md", "e.tex", "sub/c.py", "sub/d.rst", "z.c"]]

    jl = _paragraphs(1, 12)
    with open(root / "plain.jsonl", "w") as f:
        for i, t in enumerate(jl[:6]):
            f.write(json.dumps({"text": t}) + "\n")
        f.write("\n")  # blank line: ignored
        f.write(json.dumps({"text": ""}) + "\n")  # empty: skipped, counted
        f.write(json.dumps({"text": None, "meta": 1}) + "\n")  # null: skipped, counted
        for t in jl[6:]:
            f.write(json.dumps({"text": t, "lang": "en"}) + "\n")
    docs["jsonl"] = jl

    gz = _paragraphs(2, 9) + ["unicode: héllo wörld ✓ 日本語"]
    with gzip.open(root / "g.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in gz)
    docs["gz"] = gz

    zs = _paragraphs(3, 8)
    raw = "".join(json.dumps({"text": t}) + "\n" for t in zs).encode()
    (root / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    docs["zst"] = zs

    pqd = _paragraphs(4, 11)
    pq.write_table(pa.table({"text": pqd, "n": list(range(11))}), root / "p.parquet", row_group_size=4)
    docs["parquet"] = pqd
    return docs


def test_every_format_end_to_end(tmp_path, tokenizer_dir, hf):
    expected = _all_formats(tmp_path / "in")
    domains = {"text": [str(tmp_path / "in" / "text")], "jsonl": str(tmp_path / "in" / "plain.jsonl"),
               "gz": str(tmp_path / "in" / "g.jsonl.gz"), "zst": str(tmp_path / "in" / "z.jsonl.zst"),
               "parquet": str(tmp_path / "in" / "p.parquet")}
    out = tmp_path / "out"
    m = _run(tokenizer_dir, out, domains, val_fraction=0.2, extensions=[".c"], shard_tokens=64)

    assert m["tokenizer"]["vocab_size"] == len(hf) == 300
    assert m["tokenizer"]["eos_token_id"] == hf.eos_token_id
    assert m["tokenizer"]["hash"] == hashlib.sha256((tokenizer_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert m["dtype"] == "uint16"
    assert [e["name"] for e in m["domains"]] == list(domains)
    eos = hf.eos_token_id
    for e in m["domains"]:
        name = e["name"]
        ref = [_ref(hf, t) for t in expected[name]]
        train, val = _stream(out, m, name, "train"), _stream(out, m, name, "val")
        assert e["train"]["tokens"] == train.size and e["val"]["tokens"] == val.size
        assert train.size + val.size == sum(map(len, ref))  # token counts = direct tokenization
        # Val = whole documents; train = the others, both in document order.
        val_docs, train_docs = _docs(val, eos), _docs(train, eos)
        val_idx = [ref.index(d) for d in val_docs]
        assert val_idx == sorted(val_idx) and len(val_idx) >= 1
        assert train_docs == [d for i, d in enumerate(ref) if i not in val_idx]
        assert (e["train"]["documents"], e["val"]["documents"]) == (len(train_docs), len(val_docs))
        assert all(open_shard(out / rel).size == 64 for rel in e["train"]["shards"][:-1])
    by = {e["name"]: e for e in m["domains"]}
    assert by["text"]["empty_documents"] == 1 and by["jsonl"]["empty_documents"] == 2
    assert by["text"]["files"] == 7  # 6 documents + the empty file
    total = sum(e["train"]["tokens"] for e in m["domains"])
    assert m["w0"] == {e["name"]: e["train"]["tokens"] / total for e in m["domains"]}
    # What the training side reads back.
    data = PreparedData(out)
    assert data.domains == list(domains)
    np.testing.assert_allclose(data.w0.sum(), 1.0)
    np.testing.assert_array_equal(data.val("gz").read(0, data.val("gz").n_tokens), _stream(out, m, "gz", "val"))


def test_encoder_paths_agree(tokenizer_dir, hf):
    # The serialised-backend path (fast tokenizers) and the transformers path (any other tokenizer)
    # must write the same tokens: EOS after every document, nothing else added.
    info = prep.load_tokenizer(tokenizer_dir)
    assert info.spec["kind"] == "fast"
    texts = _paragraphs(20, 5) + ["héllo ✓", " leading space"]
    fast_tokens, fast_lengths = prep._BatchEncoder(info.spec).encode(texts)
    slow_spec = {**info.spec, "kind": "hf", "dir": str(tokenizer_dir)}
    hf_tokens, hf_lengths = prep._BatchEncoder(slow_spec).encode(texts)
    ref = [_ref(hf, t) for t in texts]
    assert fast_tokens.dtype == np.uint16
    assert fast_tokens.tolist() == hf_tokens.tolist() == [i for r in ref for i in r]
    assert fast_lengths.tolist() == hf_lengths.tolist() == [len(r) for r in ref]
    assert prep._BatchEncoder(info.spec).encode(texts, lengths_only=True)[0] is None


def test_text_field_option(tmp_path, tokenizer_dir, hf):
    texts = _paragraphs(5, 6)
    src = _write_jsonl(tmp_path / "c.jsonl", texts, field="content")
    m = _run(tokenizer_dir, tmp_path / "out", {"c": str(src)}, text_field="content")
    e = m["domains"][0]
    assert e["train"]["tokens"] + e["val"]["tokens"] == sum(len(_ref(hf, t)) for t in texts)


# -- the val split -------------------------------------------------------------------------------


def _reference_val(hf, texts: list[str], fraction: float, cap: int) -> list[int]:
    """The documented rule with a plain sort: candidates (hash < fraction*2^64) in hash order, taken
    while the tokens already taken are below the cap; at least the lowest-hash document."""
    hashes = [_h(t) for t in texts]
    cands = sorted((h, i) for i, h in enumerate(hashes) if h < int(fraction * 2**64))
    chosen, total = [], 0
    for h, i in cands:
        if total >= cap:
            break
        chosen.append(i)
        total += len(_ref(hf, texts[i]))
    if not chosen:
        chosen = [min(range(len(texts)), key=lambda i: hashes[i])]
    return sorted(chosen)


def _val_indices(out: Path, m: dict, name: str, hf, texts: list[str]) -> list[int]:
    ref = [_ref(hf, t) for t in texts]
    return sorted(ref.index(d) for d in _docs(_stream(out, m, name, "val"), hf.eos_token_id))


@pytest.mark.parametrize("cap", [10**9, 300, 1])
def test_val_split_follows_the_rule(tmp_path, tokenizer_dir, hf, cap):
    texts = _paragraphs(6, 150)
    src = _write_jsonl(tmp_path / "d.jsonl", texts)
    m = _run(tokenizer_dir, tmp_path / "out", {"d": str(src)}, val_fraction=0.2, val_tokens=cap)
    got = _val_indices(tmp_path / "out", m, "d", hf, texts)
    assert got == _reference_val(hf, texts, 0.2, cap)
    if cap == 10**9:
        assert 15 <= len(got) <= 45  # about 20 % of 150
    if cap == 1:
        assert len(got) == 1


def test_val_split_is_deterministic_and_stable_when_documents_are_added(tmp_path, tokenizer_dir, hf):
    texts = _paragraphs(7, 80)
    a = _run(tokenizer_dir, tmp_path / "a", {"d": str(_write_jsonl(tmp_path / "a.jsonl", texts))},
             val_fraction=0.15)
    b = _run(tokenizer_dir, tmp_path / "b", {"d": str(_write_jsonl(tmp_path / "b.jsonl", texts))},
             val_fraction=0.15)
    assert (tmp_path / "a/d/val_00000.bin").read_bytes() == (tmp_path / "b/d/val_00000.bin").read_bytes()
    assert (tmp_path / "a/d/train_00000.bin").read_bytes() == (tmp_path / "b/d/train_00000.bin").read_bytes()
    before = {texts[i] for i in _val_indices(tmp_path / "a", a, "d", hf, texts)}
    # Add documents, and shuffle the file order: the old documents' val membership must not move.
    more = texts + [f"new {t}" for t in _paragraphs(8, 60)]
    random.Random(0).shuffle(more)
    c = _run(tokenizer_dir, tmp_path / "c", {"d": str(_write_jsonl(tmp_path / "c.jsonl", more))},
             val_fraction=0.15)
    after = {more[i] for i in _val_indices(tmp_path / "c", c, "d", hf, more)}
    assert after & set(texts) == before
    assert after - set(texts)  # some new documents joined val


def test_small_domain_gets_one_val_document(tmp_path, tokenizer_dir, hf):
    texts = _paragraphs(9, 5)
    assert all(_h(t) >= int(0.01 * 2**64) for t in texts)  # none is a val candidate
    m = _run(tokenizer_dir, tmp_path / "out", {"d": str(_write_jsonl(tmp_path / "d.jsonl", texts))})
    assert _val_indices(tmp_path / "out", m, "d", hf, texts) == [min(range(5), key=lambda i: _h(texts[i]))]
    assert m["domains"][0]["train"]["documents"] == 4


# -- reruns, interruptions, sharding ---------------------------------------------------------------


def _two_domains(root: Path) -> dict[str, list[str]]:
    (root / "txt").mkdir(parents=True)
    for i, t in enumerate(_paragraphs(10, 12, 20, 60)):
        (root / "txt" / f"{i:02d}.txt").write_text(t)
    _write_jsonl(root / "j.jsonl", _paragraphs(11, 40, 10, 50))
    return {"txt": [str(root / "txt")], "json": [str(root / "j.jsonl")]}


def test_rerun_skips_finished_domains_and_redoes_changed_ones(tmp_path, tokenizer_dir, monkeypatch):
    domains = _two_domains(tmp_path / "in")
    out = tmp_path / "out"
    first = _run(tokenizer_dir, out, domains, val_fraction=0.1)
    stats = {rel: (out / rel).stat().st_mtime_ns for rel in _files(out)}

    def no_scan(*a, **k):
        raise AssertionError("a finished domain was tokenized again")

    monkeypatch.setattr(prep, "_scan_domain", no_scan)
    again = _run(tokenizer_dir, out, domains, val_fraction=0.1)
    assert again == first
    assert {rel: (out / rel).stat().st_mtime_ns for rel in _files(out) if rel != "manifest.json"} == \
        {rel: t for rel, t in stats.items() if rel != "manifest.json"}
    monkeypatch.undo()

    # A changed input redoes only its domain.
    with open(tmp_path / "in" / "j.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document about velocity"}) + "\n")
    scanned = []
    real_scan = prep._scan_domain
    monkeypatch.setattr(prep, "_scan_domain", lambda name, *a, **k: scanned.append(name) or real_scan(name, *a, **k))
    third = _run(tokenizer_dir, out, domains, val_fraction=0.1)
    assert scanned == ["json"]
    assert third["domains"][0] == first["domains"][0]
    assert third["domains"][1]["inputs_hash"] != first["domains"][1]["inputs_hash"]
    n = lambda m: m["domains"][1]["train"]["documents"] + m["domains"][1]["val"]["documents"]  # noqa: E731
    assert n(third) == n(first) + 1
    # Changing a split setting redoes everything.
    scanned.clear()
    _run(tokenizer_dir, out, domains, val_fraction=0.2)
    assert scanned == ["txt", "json"]


def test_interrupted_run_resumes_to_identical_bytes(tmp_path, tokenizer_dir, monkeypatch):
    domains = _two_domains(tmp_path / "in")
    monkeypatch.setattr(prep, "_BATCH_DOCS", 3)  # several batches per domain
    kw = dict(val_fraction=0.1, shard_tokens=200)
    _run(tokenizer_dir, tmp_path / "clean", domains, **kw)

    out = tmp_path / "killed"
    closes = []
    real_close = prep.ShardWriter.close

    def dying_close(self):
        closes.append(self.path.parent.name)
        if closes.count("json") == 3:  # a few shards into the second domain
            raise KeyboardInterrupt
        return real_close(self)

    monkeypatch.setattr(prep.ShardWriter, "close", dying_close)
    with pytest.raises(KeyboardInterrupt):
        _run(tokenizer_dir, out, domains, **kw)
    monkeypatch.setattr(prep.ShardWriter, "close", real_close)
    left = _files(out)
    assert "txt/.done" in left and "json/.done" not in left and "manifest.json" not in left
    assert any(k.startswith("json/train_") for k in left)  # finished shards of the cut domain remain
    # As if killed harder: a stray temp file and a truncated shard.
    (out / "json" / ".train_00009.bin.123.dead.tmp").write_bytes(b"partial")
    victim = next(out / k for k in left if k.startswith("json/train_"))
    victim.write_bytes(victim.read_bytes()[:40])

    _run(tokenizer_dir, out, domains, **kw)
    assert _files(out) == _files(tmp_path / "clean")


def test_sharded_prepare_and_merge_equal_a_single_run(tmp_path, tokenizer_dir, monkeypatch):
    domains = _two_domains(tmp_path / "in")
    monkeypatch.setattr(prep, "_BATCH_DOCS", 4)
    kw = dict(val_fraction=0.1, shard_tokens=150)
    single = _run(tokenizer_dir, tmp_path / "single", domains, **kw)
    parts = []
    for i in range(3):
        part = tmp_path / f"part{i}"
        # One part through a 2-process pool: the pool path must write the same bytes.
        m = _run(tokenizer_dir, part, domains, num_shards=3, shard_index=i, workers=2 if i == 1 else 1, **kw)
        assert m["part"] == {"index": i, "count": 3} and "w0" not in m
        parts.append(part)
    with pytest.raises(DataError, match="part 2 of a 3-way.*--merge"):
        PreparedData(parts[2])
    with pytest.raises(DataError, match="every part 0..N-1"):
        merge_prepared(parts[:2], tmp_path / "bad", progress=False)
    merged = merge_prepared(list(reversed(parts)), tmp_path / "merged", progress=False)
    assert merged == single
    assert _files(tmp_path / "merged") == _files(tmp_path / "single")
    # The parts split the documents, not the val rule: their val sets add up to the single run's.
    for k, e in enumerate(single["domains"]):
        p = [json.loads((d / "manifest.json").read_text())["domains"][k] for d in parts]
        assert sum(x["val"]["documents"] for x in p) == e["val"]["documents"]
        assert sum(x["train"]["documents"] for x in p) == e["train"]["documents"]


def test_merge_refuses_parts_of_different_runs(tmp_path, tokenizer_dir):
    domains = _two_domains(tmp_path / "in")
    parts = [_run(tokenizer_dir, tmp_path / f"p{i}", domains, num_shards=2, shard_index=i,
                  val_fraction=0.1 if i == 0 else 0.2) and tmp_path / f"p{i}" for i in range(2)]
    with pytest.raises(DataError, match="different settings"):
        merge_prepared(parts, tmp_path / "m", progress=False)
    _run(tokenizer_dir, tmp_path / "whole", domains)
    with pytest.raises(DataError, match="not a part"):
        merge_prepared([tmp_path / "whole"], tmp_path / "m", progress=False)
    with pytest.raises(DataError, match="no manifest.json"):
        merge_prepared([tmp_path / "in"], tmp_path / "m", progress=False)


# -- the command line ------------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="velocitune prepare")
    add_arguments(parser)
    return parser.parse_args(argv)


def test_cli_flags_and_repeated_domain(tmp_path, tokenizer_dir, hf, capsys):
    a = _write_jsonl(tmp_path / "a.jsonl", _paragraphs(12, 6))
    b = _write_jsonl(tmp_path / "b.jsonl", _paragraphs(13, 6))
    c = _write_jsonl(tmp_path / "c.jsonl", _paragraphs(14, 5))
    args = _parse([f"--tokenizer={tokenizer_dir}", "--out", str(tmp_path / "out"), "--domain", f"x={a}",
                   "--domain", f"y={c}", "--domain", f"x={b}", "--workers", "1", "--no-progress",
                   "--val-fraction", "0.3", "--val-tokens", "50"])
    assert main(args) == 0
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [e["name"] for e in m["domains"]] == ["x", "y"]
    assert m["domains"][0]["sources"] == [str(a), str(b)]
    assert m["settings"]["val_fraction"] == 0.3 and m["settings"]["val_tokens"] == 50
    x = m["domains"][0]
    assert x["train"]["documents"] + x["val"]["documents"] == 12
    assert "prepared" in capsys.readouterr().out


def test_cli_yaml_config_with_relative_paths_and_overrides(tmp_path, tokenizer_dir):
    cfg_dir = tmp_path / "cfg"
    cfg_dir.mkdir()
    _write_jsonl(cfg_dir / "a.jsonl", _paragraphs(15, 8))
    _write_jsonl(cfg_dir / "b.jsonl", _paragraphs(16, 8))
    (cfg_dir / "p.yaml").write_text(
        f"tokenizer: {tokenizer_dir}\nout: prepared\ndomains:\n  a: a.jsonl\n  b: [b.jsonl]\n"
        "val_fraction: 0.25\nworkers: 1\nprogress: false\n")
    assert main(_parse([str(cfg_dir / "p.yaml"), "--val-fraction", "0.5"])) == 0
    m = json.loads((cfg_dir / "prepared" / "manifest.json").read_text())
    assert m["settings"]["val_fraction"] == 0.5  # the flag wins over the file
    assert m["domains"][1]["sources"] == [str(cfg_dir / "b.jsonl")]


def test_cli_merge(tmp_path, tokenizer_dir):
    domains = _two_domains(tmp_path / "in")
    for i in range(2):
        _run(tokenizer_dir, tmp_path / f"p{i}", domains, num_shards=2, shard_index=i)
    assert main(_parse(["--merge", str(tmp_path / "p0"), str(tmp_path / "p1"), "--out",
                        str(tmp_path / "m"), "--no-progress"])) == 0
    assert PreparedData(tmp_path / "m").domains == ["txt", "json"]


def test_cli_help_mentions_every_option():
    parser = argparse.ArgumentParser(prog="velocitune prepare")
    add_arguments(parser)
    text = parser.format_help()
    for flag in ["--tokenizer", "--out", "--domain", "--val-tokens", "--val-fraction", "--workers",
                 "--text-field", "--ext", "--strict", "--shard-tokens", "--num-shards", "--shard-index",
                 "--merge", "--no-progress", "CONFIG.yaml", ".jsonl.zst", "Parquet"]:
        assert flag in text, flag


# -- bad input: one test each ---------------------------------------------------------------------


def test_missing_path(tmp_path, tokenizer_dir):
    with pytest.raises(DataError, match=r"domain 'd'.*nope.*does not exist"):
        _run(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "nope")})


def test_glob_matching_nothing(tmp_path, tokenizer_dir):
    with pytest.raises(DataError, match=r"domain 'd'.*matches no files"):
        _run(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "*.jsonl")})


def test_glob_source(tmp_path, tokenizer_dir, hf):
    texts = _paragraphs(17, 6)
    for i in range(3):
        _write_jsonl(tmp_path / f"s{i}.jsonl", texts[2 * i : 2 * i + 2])
    m = _run(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "s*.jsonl")})
    e = m["domains"][0]
    assert e["files"] == 3 and e["train"]["tokens"] + e["val"]["tokens"] == sum(len(_ref(hf, t)) for t in texts)


def test_domain_without_documents(tmp_path, tokenizer_dir):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("")
    _write_jsonl(tmp_path / "d" / "b.jsonl", [""])
    with pytest.raises(DataError, match="domain 'd' yields no documents"):
        _run(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "d")})


def test_directory_without_supported_files(tmp_path, tokenizer_dir):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"domain 'd'.*no input files.*--ext \.csv"):
        _run(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "d")})


def test_explicit_file_with_unsupported_extension(tmp_path, tokenizer_dir):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match=r"domain 'd'.*unsupported extension \.csv.*--ext \.csv"):
        _run(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "x.csv")})


def test_duplicate_domain_name_in_yaml(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("tokenizer: tok\nout: out\ndomains:\n  code: a/\n  math: m.jsonl\n  code: b/\n")
    with pytest.raises(DataError, match=r"line 6: 'code' is given twice.*\[path1, path2\]"):
        main(_parse([str(cfg)]))


def test_unknown_yaml_key(tmp_path):
    cfg = tmp_path / "p.yaml"
    cfg.write_text("tokenizer: tok\nout: o\nval_token: 5\n")
    with pytest.raises(ConfigError, match="unknown key 'val_token'; did you mean 'val_tokens'"):
        main(_parse([str(cfg)]))


def test_bad_domain_flag_and_name(tmp_path, tokenizer_dir):
    with pytest.raises(ConfigError, match="NAME=PATH"):
        main(_parse(["--tokenizer", str(tokenizer_dir), "--out", str(tmp_path), "--domain", "nopath"]))
    with pytest.raises(DataError, match="domain name 'a/b' is not allowed"):
        _run(tokenizer_dir, tmp_path / "out", {"a/b": str(tmp_path)})


def test_non_utf8_files_are_skipped_and_counted(tmp_path, tokenizer_dir, hf, caplog):
    d = tmp_path / "d"
    d.mkdir()
    texts = _paragraphs(18, 4)
    for i, t in enumerate(texts):
        (d / f"{i}.txt").write_text(t)
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    # A JSON Lines file whose 2nd line is bad: skipped whole, its 1st line not counted either.
    (d / "bad.jsonl").write_bytes(b'{"text": "fine line"}\n{"text": "caf\xe9"}\n')
    # Parquet binary columns are decoded as UTF-8: a good one is read, a bad one skipped whole.
    import pyarrow as pa
    import pyarrow.parquet as pq

    extra = _paragraphs(19, 2)
    pq.write_table(pa.table({"text": pa.array([x.encode() for x in extra], pa.binary())}), d / "good.parquet")
    pq.write_table(pa.table({"text": pa.array([b"ok", b"caf\xe9"], pa.binary())}), d / "bad.parquet")
    with caplog.at_level(logging.WARNING, logger="velocitune.prepare"):
        m = _run(tokenizer_dir, tmp_path / "out", {"d": str(d)})
    e = m["domains"][0]
    assert e["skipped_files"] == 3
    assert e["train"]["documents"] + e["val"]["documents"] == 6
    assert e["train"]["tokens"] + e["val"]["tokens"] == sum(len(_ref(hf, t)) for t in texts + extra)
    for name in ("latin1.txt", "bad.jsonl", "bad.parquet"):
        assert name in caplog.text
    assert "not valid UTF-8" in caplog.text
    with pytest.raises(DataError, match=r"domain 'd'.*bad\.jsonl is not valid UTF-8.*--strict"):
        _run(tokenizer_dir, tmp_path / "out2", {"d": str(d)}, strict=True)


def test_malformed_json_line(tmp_path, tokenizer_dir):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"text": "b"}\n{"text": "c"\n')
    with pytest.raises(DataError, match=r"domain 'd'.*d\.jsonl, line 3: malformed JSON"):
        _run(tokenizer_dir, tmp_path / "out", {"d": str(p)})
    p.write_text('{"text": "a"}\n["not", "an", "object"]\n')
    with pytest.raises(DataError, match=r"line 2: a JSON list"):
        _run(tokenizer_dir, tmp_path / "out", {"d": str(p)})


def test_missing_text_field(tmp_path, tokenizer_dir):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a"}\n{"body": "b", "id": 2}\n')
    with pytest.raises(DataError, match=r"d\.jsonl, line 2: no field 'text'.*\['body', 'id'\].*--text-field"):
        _run(tokenizer_dir, tmp_path / "out", {"d": str(p)})
    p.write_text('{"text": 5}\n')
    with pytest.raises(DataError, match=r"line 1: field 'text' is a int"):
        _run(tokenizer_dir, tmp_path / "out", {"d": str(p)})


def test_parquet_missing_column(tmp_path, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet has no column 'text'; its columns are \['body'\]"):
        _run(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "d.parquet")})


def test_corrupt_compressed_file(tmp_path, tokenizer_dir):
    p = tmp_path / "d.jsonl.gz"
    p.write_bytes(gzip.compress(b'{"text": "a"}\n' * 50)[:30])
    with pytest.raises(DataError, match=r"cannot read or decompress .*d\.jsonl\.gz"):
        _run(tokenizer_dir, tmp_path / "out", {"d": str(p)})


def test_corrupt_parquet_file(tmp_path, tokenizer_dir):
    (tmp_path / "d.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(DataError, match=r"domain 'd'.*d\.parquet is not a readable Parquet file"):
        _run(tokenizer_dir, tmp_path / "out", {"d": str(tmp_path / "d.parquet")})


def test_tokenizer_that_does_not_load(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", ["a", "b"])
    with pytest.raises(DataError, match="tokenizer directory .*nope does not exist"):
        _run(tmp_path / "nope", tmp_path / "out", {"d": str(src)})
    bad = tmp_path / "bad_tok"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{ this is not a tokenizer")
    (bad / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(DataError, match="could not load a tokenizer from .*bad_tok"):
        _run(bad, tmp_path / "out", {"d": str(src)})


def test_tokenizer_without_eos(tmp_path, tokenizer_dir):
    from transformers import PreTrainedTokenizerFast

    no_eos = tmp_path / "no_eos"
    PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_dir / "tokenizer.json")).save_pretrained(no_eos)
    src = _write_jsonl(tmp_path / "d.jsonl", ["a", "b"])
    with pytest.raises(DataError, match="has no EOS token.*eos_token"):
        _run(no_eos, tmp_path / "out", {"d": str(src)})


def test_val_would_take_the_whole_domain(tmp_path, tokenizer_dir):
    (tmp_path / "one.txt").write_text("a single document")
    with pytest.raises(DataError, match="domain 'one' has a single document"):
        _run(tokenizer_dir, tmp_path / "out", {"one": str(tmp_path / "one.txt")})
    src = _write_jsonl(tmp_path / "same.jsonl", ["same text"] * 4)
    with pytest.raises(DataError, match="domain 'same': the val split would take all 4 documents"):
        _run(tokenizer_dir, tmp_path / "out", {"same": str(src)})
    src = _write_jsonl(tmp_path / "two.jsonl", ["first document", "second document"])
    with pytest.raises(DataError, match="domain 'two': the val split would take all 2.*--val-fraction"):
        _run(tokenizer_dir, tmp_path / "out", {"two": str(src)}, val_fraction=0.999999)


def test_shard_index_out_of_range(tmp_path, tokenizer_dir):
    src = _write_jsonl(tmp_path / "d.jsonl", ["a", "b"])
    with pytest.raises(DataError, match="--shard-index 3 is out of range for --num-shards 3"):
        _run(tokenizer_dir, tmp_path / "out", {"d": str(src)}, num_shards=3, shard_index=3)


def test_bad_settings(tmp_path, tokenizer_dir):
    src = _write_jsonl(tmp_path / "d.jsonl", ["a", "b"])
    for kw, match in [({"val_fraction": 1.0}, "val_fraction"), ({"val_tokens": 0}, "val_tokens"),
                      ({"shard_tokens": 0}, "shard_tokens"), ({"workers": 0}, "workers")]:
        with pytest.raises(ConfigError, match=match):
            _run(tokenizer_dir, tmp_path / "out", {"d": str(src)}, **kw)
