"""The study's fourth domain set (issue 27, item 8): replay plus three domains, most of it natural language.

`build_fourth_corpus` writes replay / prose / yaml / cython as JSONL files by the demo corpus's rules
(velocitune.demo.corpus), like the second and third sets (studies/alt_corpus.py, studies/third_corpus.py):
whole documents in a fixed hash order up to a byte budget, and a stamp that makes a finished build a no-op.
`replay` is the demo's own slice; `prose` is English prose about language and its processing: the task
descriptions (README.md) the lm-evaluation-harness ships with its tasks (paper abstracts, what each
benchmark measures) and NLTK's docstrings (NLTK's HOWTO doctests are left out: half of their text is
session transcripts). By its budget it holds nearly two thirds of the set's bytes: the case where the natural mixture is hard to beat, since static
already gives the large domain most of the data. `yaml` is the harness's task configurations (keys,
Jinja prompt templates, metric lists) and `cython` scikit-learn's Cython sources. All three come with
`make setup` (lm_eval, nltk and scikit-learn are pinned in constraints.txt); none is used by the demo, the
second or the third set, and their bytes depend only on the three packages' versions, which the stamp holds.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from studies.alt_corpus import build_replay_set
from studies.third_corpus import _files
from velocitune.demo.corpus import (
    _SCI_EXCLUDE,
    MIN_SCI_CHARS,
    SOURCES,
    Source,
    _docstrings,
    _python_files,
    documents_from_units,
    package_dir,
    package_version,
)

FOURTH_DOMAINS = ("replay", "prose", "yaml", "cython")
FOURTH_SOURCES: dict[str, Source] = {
    "replay": SOURCES["replay"],
    "prose": Source("English prose: the task descriptions (README.md) shipped with the lm-evaluation-harness's "
                    "tasks (lm_eval/tasks), whole and unmodified, and NLTK's docstrings of 200 characters or "
                    "more (test suites skipped)",
                    "MIT (lm-evaluation-harness; quoted paper abstracts are their authors', as cited in each file); "
                    "Apache-2.0 (NLTK)"),
    "yaml": Source("Task configuration files (.yaml) of the lm-evaluation-harness (lm_eval/tasks), whole and "
                   "unmodified; files under 300 bytes (two-line `include:` stubs) skipped", "MIT (lm-evaluation-harness)"),
    "cython": Source("Cython sources of scikit-learn (.pyx, .pxd, .pxi and their .tp Tempita templates), whole "
                     "and unmodified (test suites skipped)", "BSD-3-Clause (scikit-learn)"),
}
# `prose` is 64 % of the bytes (1.8 of 2.8 MB, of a ~2.0 MB pool: the READMEs ~0.8 MB, the docstrings
# ~1.2 MB). Every domain stays under one epoch of the study's 0.82M-token runs at its token
# share (data.max_repetition defaults to 1). tests/studies/test_fourth_corpus.py checks the share.
FOURTH_BUDGET_BYTES: dict[str, int] = {"replay": 400_000, "prose": 1_800_000, "yaml": 300_000, "cython": 300_000}
FOURTH_VERSION = 1
MIN_YAML_BYTES = 300
_CYTHON_SUFFIXES = (".pyx", ".pxd", ".pxi", ".pyx.tp", ".pxd.tp", ".pxi.tp")


def build_fourth_corpus(out_dir: str | os.PathLike, scale: float = 1.0, progress: bool = True) -> dict[str, Path]:
    """Write the fourth domain set (FOURTH_DOMAINS) as JSONL files under `out_dir`; return {domain: path}."""
    params = {"format": "velocitune-fourth-corpus", "fourth_version": FOURTH_VERSION,
              "lm_eval": package_version("lm_eval"), "nltk": package_version("nltk"),
              "scikit-learn": package_version("scikit-learn")}
    streams = lambda: {"prose": _prose_documents(), "yaml": _yaml_documents(),  # noqa: E731
                       "cython": _cython_documents()}
    return build_replay_set(out_dir, scale, progress, params, FOURTH_BUDGET_BYTES, FOURTH_SOURCES, streams,
                            "fourth-set")


def _tasks_dir() -> Path | None:
    root = package_dir("lm_eval")
    return None if root is None else root / "tasks"


def _prose_documents() -> Iterator[str]:
    """Both prose sources' units interleaved in one hash order, so that any budget takes some of each."""
    units: dict[str, Callable[[], list[str]]] = {}
    units.update({f"tasks/{k}": v for k, v in _files(_tasks_dir(), lambda p: p.name == "README.md").items()})
    nltk = package_dir("nltk")
    if nltk is not None:
        for rel in _python_files(nltk, _SCI_EXCLUDE):
            units[f"nltk/{rel}"] = partial(_docstrings, nltk / rel, MIN_SCI_CHARS)
    return documents_from_units("prose", units)


def _yaml_documents() -> Iterator[str]:
    # The stubs (`include: _template_yaml` + a task name) are thousands of near-copies that teach nothing.
    keep = lambda p: p.suffix == ".yaml" and p.stat().st_size >= MIN_YAML_BYTES  # noqa: E731
    return documents_from_units("yaml", _files(_tasks_dir(), keep))


def _cython_documents() -> Iterator[str]:
    return documents_from_units("cython", _files(package_dir("sklearn"), lambda p: p.name.endswith(_CYTHON_SUFFIXES)))
