"""Tests for the study's second domain set (studies/alt_corpus.py), built at a tiny scale.

Every test here runs with network connections refused.
"""

import json
import sys
from pathlib import Path

import pytest
from conftest import DEMO_SCALE

from velocitune.demo import corpus
from velocitune.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `studies`
from studies import alt_corpus  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_network")

SCALE = DEMO_SCALE


@pytest.fixture(scope="module")
def alt(tmp_path_factory):
    return alt_corpus.build_alt_corpus(tmp_path_factory.mktemp("alt"), scale=SCALE, progress=False)


def test_alt_set_has_every_domain_from_its_own_sources(alt, demo_corpus):
    assert list(alt) == list(alt_corpus.ALT_DOMAINS) and set(alt_corpus.ALT_SOURCES) == set(alt_corpus.ALT_DOMAINS)
    texts = {n: [json.loads(line)["text"] for line in p.read_text().splitlines()] for n, p in alt.items()}
    assert all(texts[n] for n in alt_corpus.ALT_DOMAINS)
    # replay is the demo's slice (disjoint from the base model's prose); the rest is new material.
    assert alt["replay"].read_bytes() == demo_corpus["replay"].read_bytes()
    demo_docs = {json.loads(line)["text"] for d in corpus.CPT_DOMAINS for line in demo_corpus[d].read_text().splitlines()}
    assert not demo_docs & {t for n in ("cpp", "markdown", "records") for t in texts[n]}
    assert all("#include" in t or "#pragma" in t or "namespace" in t for t in texts["cpp"][:20])
    for doc in texts["records"]:  # every line of a records document is a JSON object
        assert all(isinstance(json.loads(line), dict) for line in doc.splitlines())
    assert all(len(t) >= alt_corpus.MIN_MARKDOWN_CHARS for t in texts["markdown"])


def test_alt_set_is_deterministic_and_cached(alt, tmp_path):
    again = alt_corpus.build_alt_corpus(tmp_path, scale=SCALE, progress=False)
    assert all(again[n].read_bytes() == alt[n].read_bytes() for n in alt_corpus.ALT_DOMAINS)
    mtime = again["cpp"].stat().st_mtime_ns
    alt_corpus.build_alt_corpus(tmp_path, scale=SCALE, progress=False)
    assert again["cpp"].stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="scale"):
        alt_corpus.build_alt_corpus(tmp_path, scale=0, progress=False)


def test_markdown_and_licences_come_only_from_the_frozen_distribution_list(tmp_path, monkeypatch):
    """A package installed later (an extra, the user's own) must not change the study sets: only the
    distributions named in studies/distributions.txt are read, and the build stamp follows that list."""
    listed = [line for line in alt_corpus.DISTRIBUTIONS_FILE.read_text().splitlines() if line and line[0] != "#"]
    assert "velocitune" not in listed  # its README changes with every edit
    assert {"numpy", "torch", "scipy"} <= set(listed)
    full = alt_corpus._distribution_stamp()
    short = tmp_path / "distributions.txt"
    short.write_text("# two of them\nnumpy\nscipy\n")
    monkeypatch.setattr(alt_corpus, "DISTRIBUTIONS_FILE", short)
    got = alt_corpus.study_distributions()
    assert [alt_corpus._normalise(d.metadata["Name"]) for d in got] == ["numpy", "scipy"]
    assert alt_corpus._distribution_stamp() != full
    docs = list(alt_corpus._markdown_documents())
    assert docs and all(any(d == (x.metadata.get_payload() or "").replace("\r\n", "\n").strip() for x in got)
                        for d in docs)
