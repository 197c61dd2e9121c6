"""Benchmark `prepare_corpus` against the bare tokenizer: tokens/s side by side, same documents, same workers.

Corpus: the installed Python's standard-library .py files (no download), split into two domains: one
as a directory of text files, one as a JSON Lines file. Tokenizer: a 8192-entry byte-level BPE trained
here. Baseline: the same tokenizer's batch encoder (`encode_batch_fast`, ids extracted) in a spawn Pool
of the same size over the same documents, already in memory. `prepare_corpus` additionally reads and
hashes every document twice, splits val, and writes shards. Runs alternate to share the machine's noise.

    PYTHONPATH=. python benchmarks/prepare.py [--mb 20] [--workers N] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sysconfig
import tempfile
import time
from pathlib import Path

from results_file import save

from velocitune.fileio import atomic_write_json

EOS = "<|endoftext|>"


def stdlib_sources(limit_bytes: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    out, total = [], 0
    for p in files:
        try:
            size = p.stat().st_size
            p.read_bytes().decode("utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if size == 0:
            continue
        out.append(p)
        total += size
        if total >= limit_bytes:
            break
    return out


def build_corpus(root: Path, mb: float) -> tuple[dict[str, list[str]], list[str]]:
    """Two domains (text dir, jsonl) from stdlib files; returns (domains for prepare, all documents)."""
    files = stdlib_sources(int(mb * 2**20))
    texts = [p.read_text(encoding="utf-8") for p in files]
    half = len(texts) // 2
    (root / "code").mkdir(parents=True)
    for i, t in enumerate(texts[:half]):
        (root / "code" / f"{i:05d}.py").write_text(t, encoding="utf-8")
    with open(root / "more.jsonl", "w", encoding="utf-8") as f:
        for t in texts[half:]:
            f.write(json.dumps({"text": t}) + "\n")
    return {"code": [str(root / "code")], "more": [str(root / "more.jsonl")]}, texts


def train_tokenizer(texts: list[str], out: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8192, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    sample, size = [], 0
    for t in texts[::3]:  # a spread-out ~4 MB sample keeps training to seconds
        sample.append(t)
        size += len(t)
        if size > 4 * 2**20:
            break
    tok.train_from_iterator(sample, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS).save_pretrained(out)
    return out


_TK = None


def _init(tokenizer_json: str) -> None:
    global _TK
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _TK = Tokenizer.from_file(tokenizer_json)


def _count(texts: list[str]) -> int:
    ids = [e.ids for e in _TK.encode_batch_fast(texts, add_special_tokens=False)]
    return sum(len(x) + 1 for x in ids)  # + EOS, as prepare writes


def batches(texts: list[str]) -> list[list[str]]:
    """Documents grouped into the same unit of work prepare uses."""
    from velocitune.prepare.split import _BATCH_CHARS

    out, cur, chars = [], [], 0
    for t in texts:
        cur.append(t)
        chars += len(t)
        if chars >= _BATCH_CHARS:
            out.append(cur)
            cur, chars = [], 0
    if cur:
        out.append(cur)
    return out


def run_baseline(tokenizer_dir: Path, texts: list[str], workers: int) -> tuple[int, float]:
    jobs = batches(texts)
    start = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(workers, _init, (str(tokenizer_dir / "tokenizer.json"),)) as pool:
        tokens = sum(pool.imap(_count, jobs))
    return tokens, time.perf_counter() - start


def run_prepare(tokenizer_dir: Path, domains: dict, out: Path, workers: int) -> tuple[int, float]:
    from velocitune.prepare import prepare_corpus

    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    m = prepare_corpus(tokenizer_dir, out, domains, workers=workers, progress=False)
    seconds = time.perf_counter() - start
    return sum(e["train"]["tokens"] + e["val"]["tokens"] for e in m["domains"]), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MiB (default 20)")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds; best of each is reported")
    ap.add_argument("--out", default=None, help="where to save the figures (default: benchmarks/results/prepare.json)")
    args = ap.parse_args()

    from velocitune.prepare import load_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        domains, texts = build_corpus(tmp / "corpus", args.mb)
        corpus_bytes = sum(len(t.encode("utf-8")) for t in texts)
        t0 = time.perf_counter()
        tok_dir = train_tokenizer(texts, tmp / "tok")
        train_s = time.perf_counter() - t0
        load_tokenizer(tok_dir)  # warm the transformers import outside the timings
        print(f"corpus: {len(texts)} documents, {corpus_bytes / 2**20:.1f} MiB; tokenizer trained in "
              f"{train_s:.1f} s; workers={args.workers}")
        base, ours = [], []
        for r in range(args.rounds):
            n_base, s_base = run_baseline(tok_dir, texts, args.workers)
            n_ours, s_ours = run_prepare(tok_dir, domains, tmp / "out", args.workers)
            # Same documents, same tokenizer: the token totals must agree exactly.
            assert n_base == n_ours, (n_base, n_ours)
            base.append(n_base / s_base)
            ours.append(n_ours / s_ours)
            print(f"round {r}: baseline {base[-1]:,.0f} tok/s ({s_base:.1f} s)   "
                  f"prepare_corpus {ours[-1]:,.0f} tok/s ({s_ours:.1f} s)   ratio {ours[-1] / base[-1]:.3f}")
    result = {
        "corpus_documents": len(texts), "corpus_mib": round(corpus_bytes / 2**20, 2), "tokens": n_ours,
        "vocab_size": 8192, "workers": args.workers, "rounds": args.rounds,
        "baseline_tok_per_s": [round(x) for x in base], "prepare_tok_per_s": [round(x) for x in ours],
        "ratio_per_round": [round(o / b, 4) for o, b in zip(ours, base)],
        "ratio_best": round(max(ours) / max(base), 4), "target_ratio": 0.8,
        "baseline": "tokenizers encode_batch_fast + ids, spawn Pool(workers), documents in memory",
    }
    print(f"best prepare_corpus / best baseline = {result['ratio_best']:.3f} (target >= 0.8)")
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result)
    else:
        out = save("prepare", result)
    print(f"saved {out}")


if __name__ == "__main__":
    main()
