"""Tests for the demo corpus in velocitune.demo.corpus: layout, determinism, rebuilds, budgets, the prose split.

The corpus is built at a tiny scale (fast; the `demo_corpus` fixture of tests/conftest.py); the full-size
build is a slow test. Every test here runs with network connections refused.
"""

import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DEMO_SCALE, jsonl_texts
from tqdm import tqdm

from velocitune.demo import corpus
from velocitune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("no_network")

REPO = Path(__file__).resolve().parents[2]
SCALE = DEMO_SCALE
ALL_DOMAINS = (corpus.PRETRAIN_DOMAIN, *corpus.CPT_DOMAINS)


def text_bytes(docs: list[str]) -> int:
    return sum(len(d.encode("utf-8")) for d in docs)


def paragraphs(docs: list[str], min_chars: int) -> set[str]:
    """Whitespace-normalised paragraphs of at least `min_chars` characters."""
    found = set()
    for doc in docs:
        for para in doc.split("\n\n"):
            key = " ".join(para.split())
            if len(key) >= min_chars:
                found.add(key)
    return found


# --- Corpus layout, determinism, rebuilds ------------------------------------------------------


def test_network_is_really_refused():
    with pytest.raises(AssertionError, match="network"):
        socket.create_connection(("127.0.0.1", 9))


def test_every_domain_is_a_nonempty_jsonl_file_with_a_documented_source(demo_corpus):
    assert set(demo_corpus) == set(ALL_DOMAINS)
    assert len(corpus.CPT_DOMAINS) >= 4 and corpus.PRETRAIN_DOMAIN not in corpus.CPT_DOMAINS
    for name, path in demo_corpus.items():
        assert path.name == f"{name}.jsonl" and path.parent == demo_corpus["code"].parent
        lines = path.read_text(encoding="utf-8").splitlines()
        assert lines, name
        for line in lines:
            obj = json.loads(line)
            assert list(obj) == ["text"] and isinstance(obj["text"], str) and obj["text"].strip()
        source = corpus.SOURCES[name]
        assert source.description and source.licence


def test_domains_differ_in_content(demo_corpus):
    docs = {name: jsonl_texts(path) for name, path in demo_corpus.items()}
    assert all(d.startswith("Problem: ") and "\nAnswer: " in d for d in docs["math"])
    # Python source parses; prose does not look like source files.
    for doc in docs["code"]:
        ast.parse(doc)
    assert sum("def " in d or "import " in d for d in docs["code"]) >= len(docs["code"]) - 1
    sci = "\n".join(docs["sci"])
    assert "Parameters\n----------" in sci or "Examples\n--------" in sci
    assert not any(d.startswith("Problem: ") for d in docs["replay"] + docs["sci"] + docs["pretrain_prose"])


def test_build_is_byte_identical_across_processes_and_hash_seeds(demo_corpus, tmp_path):
    script = (
        "import sys; from velocitune.demo import corpus; "
        "corpus.build_corpus(sys.argv[1], scale=float(sys.argv[2]), progress=False)"
    )
    for seed in ("0", "4242"):
        out = tmp_path / f"seed{seed}"
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", script, str(out), str(SCALE)], check=True, env=env, cwd=tmp_path)
        for name, path in demo_corpus.items():
            assert (out / path.name).read_bytes() == path.read_bytes(), (seed, name)
        assert (out / corpus.STAMP_NAME).read_bytes() == (demo_corpus["code"].parent / corpus.STAMP_NAME).read_bytes()


def test_rebuild_is_skipped_when_complete_and_redone_when_stale(tmp_path):
    first = corpus.build_corpus(tmp_path, scale=0.01, progress=False)
    original = {name: path.read_bytes() for name, path in first.items()}
    mtimes = {name: path.stat().st_mtime_ns for name, path in first.items()}

    again = corpus.build_corpus(tmp_path, scale=0.01, progress=False)
    assert again == first
    assert {name: path.stat().st_mtime_ns for name, path in again.items()} == mtimes

    # A damaged file is noticed (its size no longer matches the stamp) and rebuilt.
    first["math"].write_bytes(original["math"][:100])
    corpus.build_corpus(tmp_path, scale=0.01, progress=False)
    assert first["math"].read_bytes() == original["math"]

    # A different scale rebuilds everything and records the new parameters.
    corpus.build_corpus(tmp_path, scale=0.02, progress=False)
    assert json.loads((tmp_path / corpus.STAMP_NAME).read_text())["scale"] == 0.02
    assert len(first["code"].read_bytes()) > len(original["code"])


def test_smaller_scale_is_a_prefix_of_larger(demo_corpus, tmp_path):
    smaller = corpus.build_corpus(tmp_path, scale=SCALE / 2, progress=False)
    for name in ALL_DOMAINS:
        small, large = jsonl_texts(smaller[name]), jsonl_texts(demo_corpus[name])
        assert 0 < len(small) <= len(large)
        assert large[: len(small)] == small, name


def test_sizes_follow_the_budgets_and_span_10x(demo_corpus):
    sizes = {}
    for name, path in demo_corpus.items():
        docs = jsonl_texts(path)
        sizes[name] = text_bytes(docs)
        budget = corpus.BUDGET_BYTES[name] * SCALE
        # Whole documents until the budget is reached: at most one document past it.
        assert budget <= sizes[name] < budget + max(len(d.encode("utf-8")) for d in docs), name
    cpt = [sizes[name] for name in corpus.CPT_DOMAINS]
    assert max(cpt) >= 10 * min(cpt)


@pytest.mark.slow
def test_full_scale_corpus_sizes(tmp_path):
    paths = corpus.build_corpus(tmp_path, scale=1.0, progress=False)
    docs = {name: jsonl_texts(path) for name, path in paths.items()}
    mb = {name: text_bytes(d) / 1e6 for name, d in docs.items()}
    print({name: (round(mb[name], 3), len(docs[name])) for name in ALL_DOMAINS})
    cpt = [mb[name] for name in corpus.CPT_DOMAINS]
    assert max(cpt) >= 10 * min(cpt)
    assert 6 <= sum(cpt) <= 12
    assert mb[corpus.PRETRAIN_DOMAIN] >= 1.4
    replay, pretrain = docs["replay"], docs[corpus.PRETRAIN_DOMAIN]
    assert not set(replay) & set(pretrain)
    shared = corpus.MIN_SHARED_PARAGRAPH_CHARS
    assert not paragraphs(replay, shared) & paragraphs(pretrain, shared)


def test_scale_must_be_a_positive_number(tmp_path):
    for bad in (0, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(ConfigError, match="scale"):
            corpus.build_corpus(tmp_path, scale=bad, progress=False)


# --- Replay / pretraining split ----------------------------------------------------------------


def test_replay_and_pretrain_prose_share_no_document_or_paragraph(demo_corpus):
    replay, pretrain = jsonl_texts(demo_corpus["replay"]), jsonl_texts(demo_corpus[corpus.PRETRAIN_DOMAIN])
    assert not set(replay) & set(pretrain)
    shared = corpus.MIN_SHARED_PARAGRAPH_CHARS
    assert not paragraphs(replay, shared) & paragraphs(pretrain, shared)


def test_prose_split_stays_disjoint_when_documents_repeat_and_quote_each_other():
    # 300 documents built from 120 paragraphs: many share paragraphs, some are exact repeats.
    paras = [f"Paragraph {i} says something long enough to count as shared text, number {i * 7}." for i in range(120)]
    docs = [f"{paras[i % 120]}\n\n{paras[(i * 7 + 3) % 120]}\n\nShort tail {i}." for i in range(300)]
    docs += docs[:50]
    replay, pretrain = corpus.split_prose(iter(docs), 10**9, 10**9, tqdm(disable=True))
    assert replay and pretrain
    assert not set(replay) & set(pretrain)
    assert not paragraphs(replay, 60) & paragraphs(pretrain, 60)
    # No long paragraph is used twice anywhere, yet every one of them is used once.
    used = [p for d in replay + pretrain for p in d.split("\n\n") if len(p) >= 60]
    assert len(used) == len(set(used)) == len(paras)
    # Roughly REPLAY_FRACTION of the documents go to replay.
    share = len(replay) / (len(replay) + len(pretrain))
    assert abs(share - corpus.REPLAY_FRACTION) < 0.1
