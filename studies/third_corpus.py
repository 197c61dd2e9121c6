"""The study's third domain set (issue 17, part 4): replay plus three domains from yet other sources.

`build_third_corpus` writes replay / sympy / licenses / afm as JSONL files by the demo corpus's rules
(velocitune.demo.corpus), like the second set (studies/alt_corpus.py): whole documents in a fixed hash
order up to a byte budget, and a stamp that makes a finished build a no-op. `replay` is the demo's own
slice; `sympy` is SymPy's Python source (a third-party library, symbolic maths; test suites skipped),
`licenses` the licence texts shipped in the metadata of the distributions in studies/distributions.txt
(each text once) and `afm` the Adobe Font Metrics files bundled with matplotlib (rigid numeric records). All three come with
`make setup`; none is used by the demo or the second set.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from studies.alt_corpus import _distribution_stamp, _text_file, build_replay_set, study_distributions
from velocitune.demo.corpus import SOURCES, Source, documents_from_units, package_dir, package_version

THIRD_DOMAINS = ("replay", "sympy", "licenses", "afm")
THIRD_SOURCES: dict[str, Source] = {
    "replay": SOURCES["replay"],
    "sympy": Source("Python source files of SymPy, whole and unmodified (test suites and benchmarks skipped)",
                    "BSD-3-Clause (SymPy)"),
    "licenses": Source("Licence texts in the installed distributions' metadata (LICENSE, COPYING, NOTICE, ...), "
                       "each distinct text once", "each text is itself a licence; redistributed verbatim"),
    "afm": Source("Adobe Font Metrics (.afm) files bundled with matplotlib (mpl-data/fonts/afm)",
                  "Adobe's AFM licence as stated in each file's header; matplotlib's licence for the collection"),
}
THIRD_BUDGET_BYTES: dict[str, int] = {"replay": 400_000, "sympy": 3_000_000, "licenses": 600_000, "afm": 700_000}
THIRD_VERSION = 1
_LICENSE_NAMES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS")


def build_third_corpus(out_dir: str | os.PathLike, scale: float = 1.0, progress: bool = True) -> dict[str, Path]:
    """Write the third domain set (THIRD_DOMAINS) as JSONL files under `out_dir`; return {domain: path}."""
    params = {"format": "velocitune-third-corpus", "third_version": THIRD_VERSION,
              "sympy": package_version("sympy"), "matplotlib": package_version("matplotlib"),
              "distributions": _distribution_stamp()}
    streams = lambda: {"sympy": _sympy_documents(), "licenses": _license_documents(),  # noqa: E731
                       "afm": _afm_documents()}
    return build_replay_set(out_dir, scale, progress, params, THIRD_BUDGET_BYTES, THIRD_SOURCES, streams, "third-set")


def _files(root: Path | None, keep: Callable[[Path], bool]) -> dict[str, Callable[[], list[str]]]:
    """{relative path: loader} of the files under `root` that `keep` accepts (none when root is absent)."""
    units: dict[str, Callable[[], list[str]]] = {}
    if root is None or not root.is_dir():
        return units
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("tests", "benchmarks", "__pycache__")]
        for fn in filenames:
            path = Path(dirpath) / fn
            if keep(path):
                units[path.relative_to(root).as_posix()] = partial(_text_file, path)
    return units


def _sympy_documents() -> Iterator[str]:
    return documents_from_units("sympy", _files(package_dir("sympy"), lambda p: p.suffix == ".py"))


def _afm_documents() -> Iterator[str]:
    root = package_dir("matplotlib")
    afm = None if root is None else root / "mpl-data" / "fonts" / "afm"
    return documents_from_units("afm", _files(afm, lambda p: p.suffix == ".afm"))


def _license_documents() -> Iterator[str]:
    """Each distinct licence text once: many distributions ship the same MIT or BSD text verbatim."""
    seen: set[str] = set()
    units: dict[str, Callable[[], list[str]]] = {}
    for dist in study_distributions():
        for file in dist.files or []:
            if file.name.upper().startswith(_LICENSE_NAMES) and ".dist-info" in str(file):
                units[f"{dist.metadata.get('Name', '?')}/{file}"] = partial(_text_file, Path(file.locate()))
    for text in documents_from_units("licenses", units):
        digest = hashlib.sha256(" ".join(text.split()).encode()).hexdigest()
        if digest not in seen:
            seen.add(digest)
            yield text
