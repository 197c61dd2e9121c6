"""`velocitune eval` (velocitune.downstream): lm-eval on a toy model and toy local tasks, checked against our
own log-likelihood and greedy-decoding computation; downstream.json; the errors a user meets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from velocitune import runfiles
from velocitune.cli import main as cli_main
from velocitune.downstream import evaluated_tasks, parse_tasks
from velocitune.errors import ConfigError, DataError

MAX_GEN = 8


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, tiny_tokenizer):
    """A run directory holding only final/: a random tiny Llama and the tiny tokenizer."""
    from velocitune.model import build_model, load_tokenizer
    from velocitune.train import save_final

    tok = load_tokenizer(tiny_tokenizer)
    model = build_model(len(tok), hidden_size=32, n_layers=2, n_heads=2, intermediate_size=64, max_seq_len=96, seed=3)
    run = tmp_path_factory.mktemp("toy_run")
    save_final(model, tok, run / runfiles.FINAL_DIR)
    return run


def _model_and_tok(run: Path):
    from velocitune.model import load_model, load_tokenizer

    return load_model(run / runfiles.FINAL_DIR).eval(), load_tokenizer(run / runfiles.FINAL_DIR)


@torch.no_grad()
def _loglik(model, tok, context: str, continuation: str) -> float:
    """log P(continuation | context), with the context's trailing whitespace scored as part of the
    continuation (so that a choice's leading space or newline is not split off by the tokenizer)."""
    stripped = context.rstrip()
    continuation = context[len(stripped):] + continuation
    whole = tok(stripped + continuation, add_special_tokens=False)["input_ids"]
    ctx = tok(stripped, add_special_tokens=False)["input_ids"]
    logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    return float(sum(logp[i - 1, whole[i]] for i in range(len(ctx), len(whole))))


@torch.no_grad()
def _greedy_line(model, tok, prompt: str) -> str:
    """The greedy completion of `prompt` up to the first newline (or end of text), stripped."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    out: list[int] = []
    for _ in range(MAX_GEN):
        out.append(int(model(torch.tensor([ids + out])).logits[0, -1].argmax()))
        text = tok.decode(out)
        if "\n" in text or tok.eos_token in text:
            break
    text = tok.decode(out)
    return text.split("\n")[0].split(tok.eos_token)[0].strip()


def _write_task(root: Path, name: str, rows: list[dict], spec: dict) -> None:
    data = root / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    doc = {"task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data)}},
           "test_split": "test", **spec}
    (root / f"{name}.yaml").write_text(yaml.safe_dump(doc))


CHOICE_SPEC = {"output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
               "doc_to_target": "{{label}}", "target_delimiter": "",
               "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]}
ANSWER_SPEC = {"output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
               "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_GEN, "do_sample": False},
               "filter_list": [{"name": "none", "filter": [{"function": "remove_whitespace"}, {"function": "take_first"}]}],
               "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}]}


@pytest.fixture(scope="module")
def toy_tasks(tmp_path_factory, toy_run):
    """A multiple-choice task and a generative one, with the answers our own decoding expects."""
    root = tmp_path_factory.mktemp("tasks")
    model, tok = _model_and_tok(toy_run)
    rng = np.random.default_rng(0)
    words = ["def", "return", "value", "x", "prose", "math", "sum", "+", "1", "2", "(", ")", ":"]
    choice_rows = []
    for _ in range(16):
        context = " ".join(rng.choice(words, 6)) + ("\n" if rng.random() < 0.5 else " ")
        choices = [" ".join(rng.choice(words, int(rng.integers(1, 5)))) for _ in range(4)]
        choice_rows.append({"context": context, "choices": choices, "label": int(rng.integers(4))})
    _write_task(root, "toy_choice", choice_rows, CHOICE_SPEC)
    answer_rows = []
    for i in range(12):
        prompt = "Problem: " + " ".join(rng.choice(words, 5)) + "\nAnswer:"
        line = _greedy_line(model, tok, prompt)
        # Half the answers are what greedy decoding writes, half differ from it: exact match must be 0.5.
        answer_rows.append({"prompt": prompt, "answer": line if i % 2 == 0 else line + " wrong"})
    _write_task(root, "toy_answer", answer_rows, ANSWER_SPEC)
    return root, choice_rows, answer_rows


def test_eval_scores_equal_our_own_computation(toy_run, toy_tasks, capsys):
    root, choice_rows, answer_rows = toy_tasks
    rc = cli_main(["eval", str(toy_run), "--include", str(root), "--tasks", "toy_choice,toy_answer",
                   "--batch-size", "1", "--device", "cpu"])
    assert rc == 0
    doc = runfiles.read_downstream(toy_run / runfiles.DOWNSTREAM_FILE)
    assert doc["format"] == "velocitune-downstream" and doc["model"] == str(toy_run / "final")

    model, tok = _model_and_tok(toy_run)
    acc, acc_norm = [], []
    for r in choice_rows:
        ll = np.array([_loglik(model, tok, r["context"], c) for c in r["choices"]])
        acc.append(int(np.argmax(ll)) == r["label"])
        acc_norm.append(int(np.argmax(ll / np.array([len(c) for c in r["choices"]]))) == r["label"])
    choice = doc["tasks"]["toy_choice"]
    assert choice["samples"] == len(choice_rows)
    assert choice["metrics"]["acc"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert choice["metrics"]["acc_norm"] == pytest.approx(np.mean(acc_norm), abs=1e-12)
    p = np.mean(acc)
    assert choice["stderr"]["acc"] == pytest.approx(np.sqrt(p * (1 - p) / (len(acc) - 1)), rel=1e-9)
    answer = doc["tasks"]["toy_answer"]
    assert answer["metrics"] == {"exact_match": 0.5} and answer["samples"] == len(answer_rows)
    assert evaluated_tasks(toy_run) == {"toy_choice", "toy_answer"}
    out = capsys.readouterr().out
    assert f"toy_choice ({len(choice_rows)} examples): acc {np.mean(acc):.4f}" in out


def test_a_later_evaluation_adds_its_tasks_and_limit_is_recorded(toy_run, toy_tasks, monkeypatch):
    import os

    root, _, _ = toy_tasks
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert cli_main(["eval", str(toy_run), "--include", str(root), "--tasks", "toy_choice,toy_answer"]) == 0
    assert "HF_HUB_OFFLINE" not in os.environ  # offline only while lm-eval ran: the caller's setting is back
    assert cli_main(["eval", str(toy_run), "--include", str(root), "--tasks", "toy_answer", "--limit", "4"]) == 0
    tasks = runfiles.read_downstream(toy_run / runfiles.DOWNSTREAM_FILE)["tasks"]
    assert set(tasks) == {"toy_choice", "toy_answer"}  # toy_choice kept from before
    assert tasks["toy_answer"]["samples"] == 4 and tasks["toy_answer"]["limit"] == 4
    assert tasks["toy_choice"]["limit"] is None and tasks["toy_choice"]["samples"] == 16


def test_parse_tasks():
    assert parse_tasks(["a,b", "c", "a"]) == ["a", "b", "c"]
    with pytest.raises(ConfigError, match="no tasks given"):
        parse_tasks(" , ")


def test_eval_errors_say_what_to_do(tmp_path, toy_run, toy_tasks, capsys):
    root, _, _ = toy_tasks
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    cases = [
        (["eval", str(unfinished), "--tasks", "toy_choice", "--include", str(root)],
         "has no final model (" + str(unfinished / "final") + "/config.json is missing)"),
        (["eval", str(tmp_path / "nope"), "--tasks", "toy_choice"], "run directory '" + str(tmp_path / "nope")),
        (["eval", str(toy_run), "--tasks", "toy_choise", "--include", str(root)],
         "unknown lm-eval task 'toy_choise'"),  # (indexes lm-eval's own tasks too: the slowest case)
        (["eval", str(toy_run), "--tasks", "toy_choice", "--include", str(tmp_path / "no_tasks")],
         "task directory (--include) '" + str(tmp_path / "no_tasks") + "' does not exist"),
        (["eval", str(toy_run), "--tasks", "toy_choice", "--include", str(root), "--limit", "0"],
         "--limit must be >= 1"),
    ]
    for argv, message in cases:
        assert cli_main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err, (argv, err)
        if "toy_choise" in argv:
            assert "Did you mean toy_choice," in err, err


def test_final_without_tokenizer_is_refused(tmp_path, toy_run):
    import shutil

    from velocitune.downstream import final_model_dir

    run = tmp_path / "run"
    shutil.copytree(toy_run / "final", run / "final")
    for f in (run / "final").glob("tokenizer*"):
        f.unlink()
    with pytest.raises(DataError, match="holds no tokenizer files"):
        final_model_dir(run)


def test_downstream_json_is_checked_when_read(tmp_path):
    path = tmp_path / runfiles.DOWNSTREAM_FILE
    runfiles.write_downstream(path, {"model": "m", "lm_eval_version": "0.4", "tasks": {"t": {"metrics": {"acc": 0.5}}}})
    assert runfiles.read_downstream(path)["tasks"]["t"]["metrics"] == {"acc": 0.5}
    bad = json.loads(path.read_text())
    bad["tasks"]["t"]["metrics"]["acc"] = "high"
    path.write_text(json.dumps(bad))
    with pytest.raises(DataError, match="task 't' must hold a non-empty 'metrics' mapping of finite numbers"):
        runfiles.read_downstream(path)
    with pytest.raises(DataError, match="non-empty 'metrics'"):
        runfiles.write_downstream(path, {"model": "m", "lm_eval_version": "0.4", "tasks": {"t": {"metrics": {}}}})


def test_missing_lm_eval_names_the_extra(monkeypatch, toy_run):
    import sys

    from velocitune import downstream

    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(ConfigError, match=r"pip install 'velocitune\[eval\]'"):
        downstream.evaluate_runs([toy_run], "toy_choice")
