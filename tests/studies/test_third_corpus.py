"""Tests for the study's third domain set (studies/third_corpus.py), built at a tiny scale.

Every test here runs with network connections refused.
"""

import hashlib
import json
import sys
from pathlib import Path

import pytest
from conftest import DEMO_SCALE

from velocitune.demo import corpus
from velocitune.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `studies`
from studies import alt_corpus, third_corpus  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_network")

SCALE = DEMO_SCALE


@pytest.fixture(scope="module")
def third(tmp_path_factory):
    return third_corpus.build_third_corpus(tmp_path_factory.mktemp("third"), scale=SCALE, progress=False)


def _texts(paths: dict[str, Path]) -> dict[str, list[str]]:
    return {n: [json.loads(line)["text"] for line in p.read_text().splitlines()] for n, p in paths.items()}


def test_third_set_has_every_domain_from_its_own_sources(third, demo_corpus, tmp_path):
    assert list(third) == list(third_corpus.THIRD_DOMAINS)
    assert set(third_corpus.THIRD_SOURCES) == set(third_corpus.THIRD_DOMAINS)
    texts = _texts(third)
    assert all(texts[n] for n in third_corpus.THIRD_DOMAINS)
    assert third["replay"].read_bytes() == demo_corpus["replay"].read_bytes()
    # None of the three new domains shares a document with the demo's domains or the second set's.
    alt = _texts(alt_corpus.build_alt_corpus(tmp_path / "alt", scale=SCALE, progress=False))
    other = {json.loads(line)["text"] for d in corpus.CPT_DOMAINS for line in demo_corpus[d].read_text().splitlines()}
    other |= {t for n in ("cpp", "markdown", "records") for t in alt[n]}
    assert not other & {t for n in ("sympy", "licenses", "afm") for t in texts[n]}
    assert all(t.startswith("StartFontMetrics") for t in texts["afm"])
    assert any("sympy" in t for t in texts["sympy"]) and all(compile(t, "<sympy>", "exec") for t in texts["sympy"])
    # Each licence text once, whitespace aside (many distributions ship the same MIT text).
    digests = [hashlib.sha256(" ".join(t.split()).encode()).hexdigest() for t in texts["licenses"]]
    assert len(digests) == len(set(digests)) and all("licen" in t.lower() or "copyright" in t.lower()
                                                      for t in texts["licenses"])


def test_third_set_is_deterministic_and_cached(third, tmp_path):
    again = third_corpus.build_third_corpus(tmp_path, scale=SCALE, progress=False)
    assert all(again[n].read_bytes() == third[n].read_bytes() for n in third_corpus.THIRD_DOMAINS)
    mtime = again["afm"].stat().st_mtime_ns
    third_corpus.build_third_corpus(tmp_path, scale=SCALE, progress=False)
    assert again["afm"].stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="scale"):
        third_corpus.build_third_corpus(tmp_path, scale=0, progress=False)
