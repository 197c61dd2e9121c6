"""Tests for the study's fourth domain set (studies/fourth_corpus.py), built at a tiny scale.

Every test here runs with network connections refused.
"""

import json
import sys
from pathlib import Path

import pytest
import yaml
from conftest import DEMO_SCALE

from velocitune.demo import corpus
from velocitune.errors import ConfigError

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `studies`
from studies import alt_corpus, fourth_corpus, third_corpus  # noqa: E402

pytestmark = pytest.mark.usefixtures("no_network")

SCALE = DEMO_SCALE
NEW = ("prose", "yaml", "cython")


@pytest.fixture(scope="module")
def fourth(tmp_path_factory):
    return fourth_corpus.build_fourth_corpus(tmp_path_factory.mktemp("fourth"), scale=SCALE, progress=False)


def _texts(paths: dict[str, Path]) -> dict[str, list[str]]:
    return {n: [json.loads(line)["text"] for line in p.read_text().splitlines()] for n, p in paths.items()}


class _Loader(yaml.SafeLoader):
    """YAML with the harness's `!function module.name` tags read as plain strings."""


_Loader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def test_fourth_set_has_every_domain_from_its_own_sources(fourth, demo_corpus, tmp_path):
    assert list(fourth) == list(fourth_corpus.FOURTH_DOMAINS)
    assert set(fourth_corpus.FOURTH_SOURCES) == set(fourth_corpus.FOURTH_DOMAINS)
    texts = _texts(fourth)
    assert all(texts[n] for n in fourth_corpus.FOURTH_DOMAINS)
    assert fourth["replay"].read_bytes() == demo_corpus["replay"].read_bytes()
    # None of the three new domains shares a document with the demo's domains, the second set's or the third's.
    alt = _texts(alt_corpus.build_alt_corpus(tmp_path / "alt", scale=SCALE, progress=False))
    third = _texts(third_corpus.build_third_corpus(tmp_path / "third", scale=SCALE, progress=False))
    other = {json.loads(line)["text"] for d in corpus.CPT_DOMAINS for line in demo_corpus[d].read_text().splitlines()}
    other |= {t for n in ("cpp", "markdown", "records") for t in alt[n]}
    other |= {t for n in ("sympy", "licenses", "afm") for t in third[n]}
    new = {n: set(texts[n]) for n in NEW}
    assert not other & set().union(*new.values())
    assert not (new["prose"] & new["yaml"] or new["prose"] & new["cython"] or new["yaml"] & new["cython"])
    # Every yaml document parses as a YAML mapping and is no stub; the cython files hold Cython syntax.
    for doc in texts["yaml"]:
        assert len(doc.encode()) >= fourth_corpus.MIN_YAML_BYTES and isinstance(yaml.load(doc, _Loader), dict)
    assert all(any(k in t for k in ("cdef", "cimport", "cpdef", "ctypedef", "{{")) for t in texts["cython"])
    # The prose is English text, not code: the six commonest English words are > 10 % of its words
    # (0.135 at full scale, like replay's docstrings; 0.06-0.07 in the yaml and cython domains).
    for name in NEW:
        words = " ".join(texts[name]).lower().split()
        share = sum(w in ("the", "of", "and", "a", "to", "is") for w in words) / len(words)
        assert (share > 0.1) == (name == "prose"), (name, share)


def test_prose_holds_most_of_the_bytes_and_reads_every_source():
    budgets = fourth_corpus.FOURTH_BUDGET_BYTES
    assert set(budgets) == set(fourth_corpus.FOURTH_DOMAINS)
    assert budgets["prose"] / sum(budgets.values()) > 0.5
    assert budgets["prose"] > 2 * max(v for n, v in budgets.items() if n != "prose")
    assert budgets["replay"] == corpus.BUDGET_BYTES["replay"]  # the demo's whole slice, as in the other sets
    # The pool fills the budget, and both prose sources are met within the tiny scale's budget already.
    early, size = set(), 0
    for doc in fourth_corpus._prose_documents():
        size += len(doc.encode("utf-8"))
        if size <= budgets["prose"] * SCALE:
            early.add("readme" if doc.lstrip().startswith("#") else "docstring")
        if size >= budgets["prose"]:
            break
    assert size >= budgets["prose"] and early == {"readme", "docstring"}


def test_fourth_set_is_deterministic_and_cached(fourth, tmp_path):
    again = fourth_corpus.build_fourth_corpus(tmp_path, scale=SCALE, progress=False)
    assert all(again[n].read_bytes() == fourth[n].read_bytes() for n in fourth_corpus.FOURTH_DOMAINS)
    mtime = again["prose"].stat().st_mtime_ns
    fourth_corpus.build_fourth_corpus(tmp_path, scale=SCALE, progress=False)
    assert again["prose"].stat().st_mtime_ns == mtime
    with pytest.raises(ConfigError, match="scale"):
        fourth_corpus.build_fourth_corpus(tmp_path, scale=0, progress=False)


def test_stamp_follows_the_source_versions(fourth, tmp_path, monkeypatch):
    """A new lm_eval, nltk or scikit-learn changes the documents: the stamp must force a rebuild."""
    built = fourth_corpus.build_fourth_corpus(tmp_path, scale=SCALE, progress=False)
    mtime = built["yaml"].stat().st_mtime_ns
    real = fourth_corpus.package_version
    monkeypatch.setattr(fourth_corpus, "package_version", lambda n: "0.0" if n == "nltk" else real(n))
    fourth_corpus.build_fourth_corpus(tmp_path, scale=SCALE, progress=False)
    assert built["yaml"].stat().st_mtime_ns != mtime
    assert json.loads((tmp_path / corpus.STAMP_NAME).read_text())["nltk"] == "0.0"
