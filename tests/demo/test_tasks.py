"""The demo's downstream tasks (velocitune.demo.tasks): held out from the corpus, well-formed, deterministic,
and loadable by lm-evaluation-harness."""

from __future__ import annotations

import json
import random
import re

import pytest
import yaml
from conftest import jsonl_texts

from velocitune.demo import tasks
from velocitune.demo.math_problems import math_documents

pytestmark = pytest.mark.usefixtures("no_network")


def test_math_questions_are_held_out_and_answer_their_own_problem(demo_corpus):
    corpus = set(jsonl_texts(demo_corpus["math"]))
    rows = tasks.math_examples(corpus, n=50)
    statements = {d.split("\n\nSolution:")[0] for d in corpus}
    heldout = math_documents(tasks.HELDOUT_MATH_SEED)
    docs = [next(heldout) for _ in range(200)]
    for r in rows:
        assert r["prompt"].split("\n\nSolution:")[0] not in statements
        assert r["prompt"].endswith("\nAnswer:") and r["answer"] and "\n" not in r["answer"]
        assert r["prompt"] + " " + r["answer"] in docs  # the prompt and answer make one whole generated document
    assert len({r["prompt"] for r in rows}) == 50


def test_method_questions_offer_first_steps_of_other_kinds(demo_corpus):
    corpus = set(jsonl_texts(demo_corpus["math"]))
    rows = tasks.method_examples(corpus, n=40)
    statements = {d.split("\n\nSolution:")[0] for d in corpus}
    heldout = math_documents(tasks.HELDOUT_MATH_SEED)
    first_steps = {}
    for doc in (next(heldout) for _ in range(400)):
        first_steps[doc.split("\n\nSolution:")[0]] = doc.split("\n\nSolution:\n")[1].split("\n")[0]
    for r in rows:
        statement = r["context"].removesuffix("\n\nSolution:\n")
        assert statement not in statements and r["context"].endswith("\n\nSolution:\n")
        assert r["choices"][r["label"]] == first_steps[statement]  # the true first step of this problem
        masked = [re.sub(r"\d+", "0", c) for c in r["choices"]]
        assert len(set(masked)) == tasks.CHOICES  # four different kinds of step
    assert len({r["label"] for r in rows}) > 1 and tasks.method_examples(corpus, n=40) == rows


def test_code_questions_come_from_files_outside_the_corpus(demo_corpus):
    corpus = set(jsonl_texts(demo_corpus["code"]))
    rows = tasks.code_examples(corpus, n=40)
    assert len(rows) == 40
    files = []
    for doc in tasks.heldout_code_files(corpus):
        files.append(doc)
        if len(files) == 40:
            break
    assert not corpus & set(files)
    for r in rows:
        assert len(r["choices"]) == tasks.CHOICES == len(set(r["choices"]))
        true = r["choices"][r["label"]]
        # the context and the true line are consecutive lines of one held-out file
        assert any(r["context"] + true + "\n" in f or f.endswith(r["context"] + true) for f in files)
        assert all(len(c.strip()) >= tasks.MIN_LINE_CHARS for c in r["choices"])
    assert tasks.code_examples(corpus, n=40) == rows  # deterministic
    assert len({r["label"] for r in rows}) > 1  # the answer's position varies


def test_code_examples_from_file_skips_short_files_and_keeps_the_true_line():
    rng = random.Random(0)
    assert tasks.code_examples_from_file("x = 1\ny = 2\n", rng) == []
    text = "\n".join(f"value_{i} = compute({i})" for i in range(20))
    rows = tasks.code_examples_from_file(text, rng)
    assert len(rows) == tasks.LINES_PER_FILE
    for r in rows:
        prev = r["context"].splitlines()[-1]
        i = int(prev.split("_")[1].split(" ")[0])
        assert r["choices"][r["label"]] == f"value_{i + 1} = compute({i + 1})"


def test_written_tasks_load_in_lm_eval(demo_corpus, tmp_path):
    from lm_eval.tasks import TaskManager

    out = tasks.write_tasks(demo_corpus["math"].parent, tmp_path / "tasks", n=10)
    assert tasks.tasks_are_written(out)
    for name in tasks.TASKS:
        spec = yaml.safe_load((out / f"{name}.yaml").read_text())
        data = spec["dataset_kwargs"]["data_files"]["test"]
        assert data == str(out / f"{name}.jsonl") and len((out / f"{name}.jsonl").read_text().splitlines()) == 10
    manager = TaskManager(include_path=str(out), include_defaults=False)
    assert set(tasks.TASKS) <= set(manager.all_tasks)
    loaded = manager.load(list(tasks.TASKS))["tasks"]
    docs = list(loaded[tasks.CODE_TASK].test_docs())
    first = json.loads((out / f"{tasks.CODE_TASK}.jsonl").read_text().splitlines()[0])
    assert docs[0]["choices"] == first["choices"] and docs[0]["label"] == first["label"]
