"""Downstream tasks for the demo's domains: lm-evaluation-harness task files over local JSON Lines.

Three tasks, each on text the demo never trains on (held-out math problems come from the generator under
another seed, any problem whose statement is in the corpus dropped):
- `demo_math_answer`: the prompt is a problem and its worked solution up to "Answer:"; the score is the
  exact match of the greedy completion (to the end of the line) with the answer: whether the model carries
  the last step's result into the closing line. (The demo's 1.9M-parameter model scores 0 here: it cannot
  yet copy a multi-digit number; the task is for larger models.)
- `demo_math_method`: the prompt is a problem and "Solution:"; the choices are its true first step and the
  first steps of three problems of other kinds (other templates once digits are masked); the score is how
  often the true step has the highest log-likelihood: whether the model tells which method a problem needs.
- `demo_code_next_line`: standard-library files past the code domain's budget (the code stream goes on
  where the corpus stopped, so no file is in it). The prompt is up to `CONTEXT_LINES` lines of a file; the
  choices are the true next line and three other lines of the same file; the score is how often the
  true line has the highest log-likelihood (`acc`), also per byte (`acc_norm`).

`write_tasks(corpus_dir, out_dir)` writes the data and the YAML files (with absolute data paths, since
lm-eval resolves `data_files` against the working directory) into `out_dir`, which is what
`velocitune eval --include` takes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

from velocitune.demo.corpus import code_documents
from velocitune.demo.math_problems import MATH_SEED, math_documents
from velocitune.fileio import atomic_write_text, output_dir

MATH_TASK = "demo_math_answer"
METHOD_TASK = "demo_math_method"
CODE_TASK = "demo_code_next_line"
TASKS = (MATH_TASK, METHOD_TASK, CODE_TASK)
N_EXAMPLES = 200  # per task, unless told otherwise
CONTEXT_LINES = 6
MIN_LINE_CHARS = 8  # lines shorter than this ("else:", ")") are neither asked for nor offered as choices
CHOICES = 4
LINES_PER_FILE = 4  # questions per held-out file, so that the tasks cover many files
# The held-out math stream: any seed other than the corpus's gives other problems (checked against it).
HELDOUT_MATH_SEED = MATH_SEED + 1


def _corpus_texts(path: Path) -> set[str]:
    with open(path, encoding="utf-8") as f:
        return {json.loads(line)["text"] for line in f if line.strip()}


def _problem_statement(doc: str) -> str:
    return doc.split("\n\nSolution:", 1)[0]


def heldout_math_documents(corpus_math: set[str]) -> Iterator[str]:
    """Worked problems from the held-out stream whose statements are neither in the corpus nor repeated."""
    seen = {_problem_statement(d) for d in corpus_math}
    for doc in math_documents(HELDOUT_MATH_SEED):
        statement = _problem_statement(doc)
        if statement not in seen:
            seen.add(statement)
            yield doc


def math_examples(corpus_math: set[str], n: int = N_EXAMPLES) -> list[dict]:
    """{"prompt", "answer"} for `n` held-out problems (none whose statement is in the corpus)."""
    out = []
    for doc in itertools.islice(heldout_math_documents(corpus_math), n):
        body, answer = doc.rsplit("\nAnswer: ", 1)
        out.append({"prompt": body + "\nAnswer:", "answer": answer.strip()})
    return out


def _first_step(doc: str) -> str:
    return doc.split("\n\nSolution:\n", 1)[1].split("\n", 1)[0]


def _template(line: str) -> str:
    """A line with its numbers masked: the same for every problem of one kind."""
    return re.sub(r"\d+", "0", line)


def method_examples(corpus_math: set[str], n: int = N_EXAMPLES, pool: int = 4) -> list[dict]:
    """{"context", "choices", "label"}: a held-out problem, its true first step among three first steps of
    problems of other kinds (drawn from `pool`·n other held-out problems)."""
    docs = list(itertools.islice(heldout_math_documents(corpus_math), (pool + 1) * n))
    questions, others = docs[:n], docs[n:]
    rng = random.Random(HELDOUT_MATH_SEED)
    out = []
    for doc in questions:
        step = _first_step(doc)
        candidates = sorted({_first_step(o) for o in others if _template(_first_step(o)) != _template(step)})
        distractors: list[str] = []
        for c in rng.sample(candidates, len(candidates)):  # three steps of three different kinds
            if all(_template(c) != _template(d) for d in distractors):
                distractors.append(c)
            if len(distractors) == CHOICES - 1:
                break
        label = rng.randrange(CHOICES)
        out.append({"context": _problem_statement(doc) + "\n\nSolution:\n",
                    "choices": distractors[:label] + [step] + distractors[label:], "label": label})
    return out


def _eligible(lines: list[str]) -> list[int]:
    """Indices of lines worth asking for: long enough, after at least one line, unique in the file."""
    counts: dict[str, int] = {}
    for line in lines:
        counts[line] = counts.get(line, 0) + 1
    return [i for i, line in enumerate(lines)
            if i >= 1 and len(line.strip()) >= MIN_LINE_CHARS and counts[line] == 1]


def code_examples_from_file(text: str, rng: random.Random, per_file: int = LINES_PER_FILE) -> list[dict]:
    """Next-line questions from one file: {"context", "choices", "label"} (the true line at `label`)."""
    lines = text.splitlines()
    eligible = _eligible(lines)
    if len(eligible) < CHOICES + per_file:
        return []
    out = []
    for i in sorted(rng.sample(eligible, per_file)):
        distractors = rng.sample([j for j in eligible if j != i], CHOICES - 1)
        choices = [lines[j] for j in distractors]
        label = rng.randrange(CHOICES)
        choices.insert(label, lines[i])
        context = "\n".join(lines[max(0, i - CONTEXT_LINES):i]) + "\n"
        out.append({"context": context, "choices": choices, "label": label})
    return out


def heldout_code_files(corpus_code: set[str]) -> Iterator[str]:
    """Standard-library files of the code stream that are not in the corpus, in stream order."""
    for doc in code_documents():
        if doc not in corpus_code:
            yield doc


def code_examples(corpus_code: set[str], n: int = N_EXAMPLES) -> list[dict]:
    out: list[dict] = []
    for doc in heldout_code_files(corpus_code):
        # Seeded by the file's text, so the questions of a file do not depend on which files came before.
        rng = random.Random(hashlib.sha256(doc.encode("utf-8")).digest())
        out += code_examples_from_file(doc, rng)
        if len(out) >= n:
            return out[:n]
    return out


def _task_yaml(name: str, data: Path, kind: str) -> dict:
    common = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
              "test_split": "test", "metadata": {"version": 1.0, "source": "velocitune demo"}}
    if kind == "answer":
        return {**common, "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
                "generation_kwargs": {"until": ["\n"], "max_gen_toks": 24, "do_sample": False},
                # The model writes " 42": strip the leading space before comparing.
                "filter_list": [{"name": "none", "filter": [{"function": "remove_whitespace"},
                                                            {"function": "take_first"}]}],
                "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}
    return {**common, "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{label}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                            {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def write_tasks(corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, n: int = N_EXAMPLES) -> Path:
    """The demo's task data and lm-eval YAML files in `out_dir` (given to `velocitune eval --include`)."""
    corpus_dir, out = Path(corpus_dir), output_dir(Path(out_dir).resolve(), "the task directory")
    corpus_math = _corpus_texts(corpus_dir / "math.jsonl")
    tasks = ((MATH_TASK, math_examples(corpus_math, n), "answer"),
             (METHOD_TASK, method_examples(corpus_math, n), "choice"),
             (CODE_TASK, code_examples(_corpus_texts(corpus_dir / "code.jsonl"), n), "choice"))
    for name, rows, kind in tasks:
        data = out / f"{name}.jsonl"
        _write_jsonl(data, rows)
        atomic_write_text(out / f"{name}.yaml", yaml.safe_dump(_task_yaml(name, data, kind), sort_keys=False))
    return out


def tasks_are_written(out_dir: str | os.PathLike) -> bool:
    out = Path(out_dir)
    return all((out / f"{t}.yaml").is_file() and (out / f"{t}.jsonl").is_file() for t in TASKS)


__all__ = ["TASKS", "write_tasks", "tasks_are_written", "math_examples", "method_examples", "code_examples",
           "code_examples_from_file"]
