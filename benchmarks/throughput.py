"""Benchmark: training throughput of `velocitune train` against a plain PyTorch loop, side by side in one process.

Four variants train the same model on the same prepared shards with the same batch and AdamW settings:
  plain   a minimal loop written here: random windows from the shards, `model(ids, labels=ids).loss`,
          backward, clip to norm 1.0, AdamW (weight decay on >= 2-D parameters only, as train.py); no logging
  static  `velocitune.train.train` with mixing.rule=static
  train   rule=velocitune, signal=train (per-domain training loss; explicit mixing.target_values)
  eval    rule=velocitune, signal=eval (forward passes over the fixed val sets every m steps)
Every run is cut into blocks of m = mixing.interval = log.interval steps. Warm-up is 0, so each velocitune
update (and each eval-signal evaluation) falls at a block boundary and every block after the first holds
exactly one. The first `skip` blocks (start-up, the step-0 evaluation, compilation) and the final
evaluation are left out; what remains is the window. Ratios are medians over window blocks, each block
compared with the same block of the other variant; tokens/s are window totals. The eval variant's extra time
per block over static's is the measured overhead of the eval signal, compared with the estimate
train.py prints and saves (summary.json `estimated_overhead`: one evaluation over m training steps, both
timed before training by overhead.probe_overhead; median over repeats), and with the FLOPs formula printed
beside it (`estimated_overhead_flops` = k·val_tokens / (3·m·tokens_per_step)).

CPU mode (default) runs the four variants in lock-step: each in its own thread, one optimizer step at a time
in turn (plain, static, train, eval, plain, ...; reversed in odd repeats), so that adjacent steps of
different variants see the same load on a shared, noisy machine. A step is timed (wall clock and thread CPU
time) from the start of the variant's turn to the end of its step, while no other variant runs; velocitune's
steps end where train.py calls `Throughput.add` (patched here for the benchmark only). The demo Llama:
hidden 128, 4 layers, 4 heads, MLP 352, vocab 8192, batch 16 x 128, fp32, one torch thread; ~5 minutes on
2 cores; data built once into /tmp/velocitune-bench/cpu (demo corpus at scale 0.1, 8192-token BPE, ~15 s):

    python benchmarks/throughput.py [--steps 40] [--repeats 2] [--cache DIR]

GPU mode (`--gpu`) runs the variants one after another (plain, static, train, eval, plain, ...; four models
do not share one GPU well, nor does torch.compile share threads), on CUDA with bf16 autocast and
torch.compile (train.compile=true for velocitune, which compiles the decoder in place and runs the chunked
head eagerly; torch.compile(model) for the plain loop), on a
124M-parameter Llama (hidden 768, 12 layers, 12 heads, MLP 2560, vocab 32000, seq 1024, batch 16). Block
times come from metrics.jsonl `elapsed_s` (train.py reads the device at every log record) and from clocks
read after torch.cuda.synchronize() in the plain loop. Prints tokens/s and MFU against the GPU's named dense
bf16 peak (velocitune.model.peak_flops). Data: the demo corpus at scale 1.0 (about a minute of CPU). Needs
one CUDA device and exits with a message without one:

    python benchmarks/throughput.py --gpu [--steps 100] [--repeats 3] [--vocab 32000]

Targets: static >= 0.95x plain tokens/s; train >= 0.99x static; eval-signal overhead within 20 % (relative)
of the estimate. Prints a table and writes benchmarks/results/throughput.json (GPU: throughput_gpu.json).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import platform
import shutil
import statistics
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from results_file import save  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = ("plain", "static", "train", "eval")
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 1e-3, (0.9, 0.95), 0.1, 1.0  # train.py's defaults
TARGET_LOSS = 4.0  # explicit mixing.target_values (nats); a fresh model starts near ln(vocab) = 9
TARGETS = {"static_vs_plain": 0.95, "train_vs_static": 0.99, "eval_overhead_rel_err": 0.20}


@dataclass(frozen=True)
class Setup:
    """Everything that sizes one benchmark mode."""

    mode: str  # cpu (lock-step threads) | gpu (sequential runs)
    device: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    vocab: int | None  # None: the tokenizer's
    seq_len: int
    batch: int
    steps: int
    m: int  # mixing.interval = log.interval = block length, in steps
    skip: int  # blocks left out at the start
    eval_tokens: int  # eval.max_tokens per domain for the eval-signal variant
    compile: bool
    scale: float  # demo-corpus scale
    val_fraction: float
    val_tokens: int  # cap on prepared val tokens per domain


def cpu_setup(args: argparse.Namespace) -> Setup:
    return Setup(mode="cpu", device="cpu", hidden=128, layers=4, heads=4, intermediate=352, vocab=args.vocab,
                 seq_len=128, batch=16, steps=args.steps or 40, m=5, skip=1, eval_tokens=3072,
                 compile=False, scale=0.1, val_fraction=0.3, val_tokens=8192)


def gpu_setup(args: argparse.Namespace) -> Setup:
    # skip=2: the first block holds compilation; the second the eval signal's first (no-grad) pass.
    return Setup(mode="gpu", device="cuda", hidden=768, layers=12, heads=12, intermediate=2560,
                 vocab=args.vocab or 32000, seq_len=1024, batch=16, steps=args.steps or 100, m=10, skip=2,
                 eval_tokens=16384, compile=True, scale=1.0, val_fraction=0.1, val_tokens=32768)


# --------------------------------------------------------------------------- data and model, built once


def build_data(cache: Path, s: Setup) -> tuple[Path, Path]:
    """Demo corpus -> 8192-token BPE -> prepared CPT domains under `cache`; each stage is skipped when cached."""
    from velocitune.demo import CPT_DOMAINS, PRETRAIN_DOMAIN, build_corpus, train_tokenizer
    from velocitune.prepare import prepare_corpus

    corpus = build_corpus(cache / "corpus", scale=s.scale, progress=False)
    tok = train_tokenizer([corpus[d] for d in (PRETRAIN_DOMAIN, *CPT_DOMAINS)], cache / "tokenizer")
    prepare_corpus(tok, cache / "data", {d: [str(corpus[d])] for d in CPT_DOMAINS}, val_fraction=s.val_fraction,
                   val_tokens=s.val_tokens, workers=2, progress=False)
    return tok, cache / "data"


def model_kwargs(s: Setup, vocab: int) -> dict:
    """build_model arguments: the same for the plain loop and for velocitune (seed 0 = train.seed)."""
    return dict(vocab_size=vocab, hidden_size=s.hidden, n_layers=s.layers, n_heads=s.heads,
                intermediate_size=s.intermediate, max_seq_len=s.seq_len, seed=0)


def saved_model(cache: Path, s: Setup, vocab: int) -> Path:
    """A vocab other than the data's needs a model directory (train.py sizes fresh models to the data)."""
    from velocitune.model import build_model

    out = cache / f"model-v{vocab}-h{s.hidden}-l{s.layers}-i{s.intermediate}-t{s.seq_len}"
    if not (out / "config.json").is_file():
        build_model(**model_kwargs(s, vocab)).save_pretrained(out)
    return out


# --------------------------------------------------------------------------- the variants


def plain_run(s: Setup, data_dir: Path, vocab: int, model_dir: Path | None, on_step: Callable[[int], None]) -> float:
    """The reference loop; calls on_step(steps done) after every optimizer step; returns the last loss."""
    import torch

    from velocitune.model import build_model, load_model
    from velocitune.shards import PreparedData

    torch.set_num_threads(1)
    device = torch.device(s.device)
    model = load_model(model_dir) if model_dir else build_model(**model_kwargs(s, vocab))
    model.to(device).train()
    net = torch.compile(model) if s.compile else model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, fused=device.type == "cuda")
    bf16 = device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    data = PreparedData(data_dir)
    domains = [data.train(n) for n in data.domains]
    n_windows = np.array([d.n_windows(s.seq_len) for d in domains])
    rng = np.random.default_rng(0)
    batch = np.empty((s.batch, s.seq_len + 1), dtype=np.int64)  # (B, L+1) windows; inputs are [:, :L]
    for step in range(s.steps):
        dom = rng.choice(len(domains), size=s.batch, p=data.w0)  # (B,) domain of each row
        for d in np.unique(dom):
            rows = np.flatnonzero(dom == d)
            batch[rows] = domains[d].windows(rng.integers(0, n_windows[d], size=rows.size), s.seq_len)
        ids = torch.from_numpy(batch[:, : s.seq_len])  # (B, L)
        if device.type == "cuda":
            ids = ids.pin_memory()
        ids = ids.to(device, non_blocking=True)
        with autocast():
            loss = net(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        on_step(step + 1)
    return loss.item()


def velocitune_config(variant: str, s: Setup, data_dir: Path, tok_dir: Path, model_dir: Path | None,
                      names: list[str], out: Path):
    from velocitune.config import from_dict

    model = {"path": str(model_dir), "tokenizer": str(tok_dir)} if model_dir else {
        "hidden_size": s.hidden, "n_layers": s.layers, "n_heads": s.heads, "intermediate_size": s.intermediate,
        "tokenizer": str(tok_dir)}
    mixing: dict = {"rule": "static", "interval": s.m}
    if variant in ("train", "eval"):
        mixing = {"rule": "velocitune", "signal": variant, "interval": s.m,
                  "target_values": {n: TARGET_LOSS for n in names}}
    return from_dict({
        "run": {"out_dir": str(out), "arm": f"bench-{variant}"},
        # No domain may run dry and have its weight capped mid-run: repetition does not change the speed.
        "data": {"path": str(data_dir), "seq_len": s.seq_len, "max_repetition": 1e6},
        "model": model,
        # Warm-up 0: updates fall at multiples of m, i.e. at block boundaries.
        "train": {"steps": s.steps, "batch_size": s.batch, "lr": LR, "beta1": BETAS[0], "beta2": BETAS[1],
                  "weight_decay": WEIGHT_DECAY, "grad_clip": GRAD_CLIP, "warmup_steps": 0, "threads": 1,
                  "device": s.device, "compile": s.compile, "seed": 0},
        "mixing": mixing,
        # eval.interval = steps: no curve evaluations. static/train evaluate one window per domain at step 0
        # and at the end (both outside the window); the eval signal `eval_tokens` per domain every m steps.
        "eval": {"max_tokens": s.eval_tokens if variant == "eval" else s.seq_len, "interval": s.steps,
                 "batch_size": s.batch},
        "log": {"interval": s.m, "progress": False, "tensorboard": False},
        "checkpoint": {"interval": 0, "save_final": False},
    })


def velocitune_run(variant: str, s: Setup, data_dir: Path, tok_dir: Path, model_dir: Path | None,
                   names: list[str], runs: Path) -> dict:
    """One `velocitune train` run; returns its metrics.jsonl records, estimate and last loss."""
    from velocitune.fileio import read_jsonl
    from velocitune.train import train

    out = runs / variant
    shutil.rmtree(out, ignore_errors=True)
    train(velocitune_config(variant, s, data_dir, tok_dir, model_dir, names, out))
    records = read_jsonl(out / "metrics.jsonl")
    summary = json.loads((out / "summary.json").read_text())
    return {"records": records, "estimated_overhead": summary["estimated_overhead"],
            "estimated_overhead_flops": summary["estimated_overhead_flops"], "final_loss": records[-1]["loss"]}


# --------------------------------------------------------------------------- CPU: lock-step threads


class LockStep:
    """Round-robin turns for variants running in threads: one optimizer step each, in a fixed order.

    A variant's step time is measured from the start of its turn to the end of its step, while every other
    variant waits, so it is that variant's own time; per step: (wall seconds, thread CPU seconds).
    """

    def __init__(self, names: list[str]):
        self._cv = threading.Condition()
        self._order = list(names)
        self._turn = 0
        self._started: dict[str, tuple[float, float]] = {}
        self.steps: dict[str, list[tuple[float, float]]] = {n: [] for n in names}

    def begin(self, name: str) -> None:
        with self._cv:
            self._cv.wait_for(lambda: self._order[self._turn] == name)
        self._started[name] = (time.perf_counter(), time.thread_time())

    def step_done(self, name: str) -> None:
        wall, cpu = self._started[name]
        self.steps[name].append((time.perf_counter() - wall, time.thread_time() - cpu))
        self._hand_on(name, finished=False)
        self.begin(name)

    def finish(self, name: str) -> None:
        self._hand_on(name, finished=True)

    def _hand_on(self, name: str, finished: bool) -> None:
        with self._cv:
            i = self._order.index(name)
            if finished:
                self._order.pop(i)
                self._turn = i % len(self._order) if self._order else 0
            else:
                self._turn = (i + 1) % len(self._order)
            self._cv.notify_all()


@contextlib.contextmanager
def step_hook(hooks: dict[int, Callable[[], None]]):
    """Make train.py's per-step `Throughput.add` call the hook registered for the calling thread."""
    import velocitune.train as vt

    base = vt.Throughput

    class Hooked(base):  # type: ignore[misc, valid-type]
        def add(self, tokens: int) -> None:
            super().add(tokens)
            hooks[threading.get_ident()]()

    vt.Throughput = Hooked
    try:
        yield
    finally:
        vt.Throughput = base


def lockstep_repeat(s: Setup, data_dir: Path, tok_dir: Path, model_dir: Path | None, vocab: int,
                    names: list[str], runs: Path, order: list[str]) -> dict[str, dict]:
    """All four variants once, in lock-step; per variant its block times and velocitune's records."""
    turns = LockStep(order)
    hooks: dict[int, Callable[[], None]] = {}
    results: dict[str, dict] = {}
    errors: list[BaseException] = []

    def body(v: str) -> None:
        hooks[threading.get_ident()] = lambda: turns.step_done(v)
        turns.begin(v)
        try:
            if v == "plain":
                results[v] = {"final_loss": plain_run(s, data_dir, vocab, model_dir, lambda _: turns.step_done(v))}
            else:
                results[v] = velocitune_run(v, s, data_dir, tok_dir, model_dir, names, runs)
        except BaseException as e:  # re-raised in the main thread
            errors.append(e)
        finally:
            turns.finish(v)

    threads = [threading.Thread(target=body, args=(v,), name=f"bench-{v}") for v in order]
    with step_hook(hooks):
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise errors[0]
    for v in order:
        if len(turns.steps[v]) != s.steps:
            raise RuntimeError(f"variant {v} reported {len(turns.steps[v])} steps, expected {s.steps}: train.py no "
                               f"longer calls Throughput.add once per step; update benchmarks/throughput.py")
        steps = np.array(turns.steps[v])  # (steps, 2): wall and CPU seconds of each step
        blocks = steps.reshape(s.steps // s.m, s.m, 2).sum(axis=1)[s.skip:]  # (window blocks, 2)
        results[v]["blocks"] = [{"wall_s": float(w), "cpu_s": float(c)} for w, c in blocks]
    return results


# --------------------------------------------------------------------------- GPU: sequential runs


def sequential_run(v: str, s: Setup, data_dir: Path, tok_dir: Path, model_dir: Path | None, vocab: int,
                   names: list[str], runs: Path) -> dict:
    """One variant alone; block times from synchronised clocks (plain) or metrics.jsonl (velocitune)."""
    import torch

    if s.compile:
        torch._dynamo.reset()  # each run compiles its own model from a clean cache
    if v == "plain":
        marks: list[float] = []

        def mark(done: int) -> None:
            if done % s.m == 0:
                torch.cuda.synchronize()
                marks.append(time.perf_counter())

        result = {"final_loss": plain_run(s, data_dir, vocab, model_dir, mark)}
    else:
        result = velocitune_run(v, s, data_dir, tok_dir, model_dir, names, runs)
        marks = [r["elapsed_s"] for r in result["records"]]  # one per block end (steps m, 2m, ...)
    edges = np.array(marks[s.skip - 1:])  # block b of the window spans edges[b] .. edges[b + 1]
    result["blocks"] = [{"wall_s": float(w)} for w in np.diff(edges)]
    return result


# --------------------------------------------------------------------------- figures


def add_update_times(result: dict, s: Setup) -> None:
    """Per window block, the time velocitune's own update timer (eval passes, rule) counted."""
    cumulative = [0.0] + [r["time_update_s"] for r in result["records"]]  # at block edges 0, m, 2m, ...
    for b, block in enumerate(result["blocks"]):
        edge = s.skip + b
        block["update_s"] = cumulative[edge + 1] - cumulative[edge]


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def median_ci(xs: list[float], level: float = 0.9, draws: int = 2000) -> list[float]:
    """Bootstrap interval of the median of `xs` (seeded): how far the noise lets the median move."""
    samples = np.random.default_rng(0).choice(np.asarray(xs), size=(draws, len(xs)))  # (draws, n)
    meds = np.median(samples, axis=1)
    return [float(np.quantile(meds, (1 - level) / 2)), float(np.quantile(meds, (1 + level) / 2))]


def block_ratios(num: list[dict], den: list[dict], key: str) -> list[float]:
    """den time / num time per block: the tokens/s of `num` relative to `den`."""
    return [d[key] / n[key] for n, d in zip(num, den)]


def analyse(reps: list[dict[str, dict]], s: Setup, flops_tok: float, peak: float | None) -> dict:
    tokens = (s.steps - s.skip * s.m) * s.batch * s.seq_len
    keys = ["wall_s", "cpu_s"] if "cpu_s" in reps[0]["plain"]["blocks"][0] else ["wall_s"]
    res: dict = {"window_tokens": tokens, "clock": keys}
    res["tok_per_s"] = {v: [tokens / sum(b["wall_s"] for b in r[v]["blocks"]) for r in reps] for v in VARIANTS}
    res["tok_per_s_median"] = {v: median(x) for v, x in res["tok_per_s"].items()}
    if "cpu_s" in keys:
        res["tok_per_cpu_s_median"] = {v: median([tokens / sum(b["cpu_s"] for b in r[v]["blocks"]) for r in reps])
                                       for v in VARIANTS}

    def compare(num: str, den: str, target: float) -> dict:
        out = {"target": target}
        for key in keys:
            xs = [x for r in reps for x in block_ratios(r[num]["blocks"], r[den]["blocks"], key)]
            out[key] = {"block_samples": xs, "median": median(xs), "ci90": median_ci(xs)}
        out["pass"] = out["wall_s"]["median"] >= target
        lo, hi = out["wall_s"]["ci90"]
        out["resolved"] = not lo < target < hi  # False: the verdict is within this machine's noise
        return out

    res["static_vs_plain"] = compare("static", "plain", TARGETS["static_vs_plain"])
    res["train_vs_static"] = compare("train", "static", TARGETS["train_vs_static"])
    res["train_vs_static"]["update_share_median"] = median(
        [b["update_s"] / b["wall_s"] for r in reps for b in r["train"]["blocks"]])

    per_repeat = [r["eval"]["estimated_overhead"] for r in reps]  # each run times its own probe
    estimate = median(per_repeat)
    ev: dict = {"estimate": estimate, "estimate_per_repeat": per_repeat, "target": TARGETS["eval_overhead_rel_err"],
                "estimate_flops": reps[0]["eval"]["estimated_overhead_flops"]}
    for key in keys:
        xs = [1 / x - 1 for r in reps for x in block_ratios(r["eval"]["blocks"], r["static"]["blocks"], key)]
        ev[key] = {"block_samples": xs, "median": median(xs), "ci90": median_ci(xs)}
    # The eval run's own update timer against the rest of its block: no second run involved.
    ev["own_timer"] = median([b["update_s"] / (b["wall_s"] - b["update_s"]) for r in reps for b in r["eval"]["blocks"]])
    ev["relative_error"] = abs(ev["wall_s"]["median"] - estimate) / estimate
    ev["relative_error_flops"] = abs(ev["wall_s"]["median"] - ev["estimate_flops"]) / ev["estimate_flops"]
    ev["pass"] = ev["relative_error"] <= TARGETS["eval_overhead_rel_err"]
    band = (estimate * (1 - ev["target"]), estimate * (1 + ev["target"]))  # overheads that would pass
    lo, hi = ev["wall_s"]["ci90"]
    ev["resolved"] = hi < band[0] or lo > band[1] or band[0] <= lo <= hi <= band[1]
    res["eval_overhead"] = ev
    if peak:
        res["mfu_median"] = {v: flops_tok * res["tok_per_s_median"][v] / peak for v in VARIANTS}
        logged = [rec["mfu"] for r in reps for rec in r["static"]["records"][s.skip:] if rec.get("mfu") is not None]
        res["static_logged_mfu_median"] = median(logged) if logged else None
    return res


def print_table(res: dict) -> None:
    cpu = "cpu_s" in res["clock"]
    print(f"\n{'variant':<8}{'tok/s median':>14}" + (f"{'tok/CPU-s':>11}" if cpu else "") + "   tok/s per repeat")
    for v in VARIANTS:
        xs = ", ".join(f"{x:,.0f}" for x in res["tok_per_s"][v])
        per_cpu = f"{res['tok_per_cpu_s_median'][v]:>11,.0f}" if cpu else ""
        print(f"{v:<8}{res['tok_per_s_median'][v]:>14,.0f}{per_cpu}   {xs}")
    if "mfu_median" in res:
        mfu = ", ".join(f"{v} {100 * x:.1f}%" for v, x in res["mfu_median"].items())
        logged = res.get("static_logged_mfu_median")
        print(f"MFU (median tok/s x FLOPs/token / peak): {mfu}"
              + (f"; velocitune's logged mfu (static): {100 * logged:.1f}%" if logged else ""))

    def verdict(r: dict) -> str:
        return ("PASS" if r["pass"] else "FAIL") + ("" if r["resolved"] else "*")

    def interval(ci: list[float], n: int, pct: bool = False) -> str:
        f = (lambda x: f"{100 * x:.1f}%") if pct else (lambda x: f"{x:.3f}")
        return f"{f(ci[0])}..{f(ci[1])} (n={n})"

    print(f"\n{'block-by-block comparison':<28}{'median':>9}" + (f"{'CPU time':>10}" if cpu else "")
          + f"{'target':>12}  result  90% interval of the median")
    for key, label in (("static_vs_plain", "velocitune static / plain"), ("train_vs_static", "train signal / static")):
        r = res[key]
        print(f"{label:<28}{r['wall_s']['median']:>8.3f}x" + (f"{r['cpu_s']['median']:>9.3f}x" if cpu else "")
              + f"{'>= ' + format(r['target'], '.2f'):>12}  {verdict(r):<6}  "
              + interval(r["wall_s"]["ci90"], len(r["wall_s"]["block_samples"])))
    r = res["eval_overhead"]
    print(f"{'eval-signal overhead':<28}{100 * r['wall_s']['median']:>8.1f}%"
          + (f"{100 * r['cpu_s']['median']:>9.1f}%" if cpu else "")
          + f"{'est ' + format(100 * r['estimate'], '.1f') + '%':>12}  {verdict(r):<6}  "
          + interval(r["wall_s"]["ci90"], len(r["wall_s"]["block_samples"]), pct=True))
    print(f"  relative error {100 * r['relative_error']:.1f}% (target <= {100 * r['target']:.0f}%); the eval run's own "
          f"update timer gives {100 * r['own_timer']:.1f}%; estimate per repeat "
          + ", ".join(f"{100 * x:.1f}%" for x in r["estimate_per_repeat"]))
    print(f"  the FLOPs formula k*val/(3*m*tau) gives {100 * r['estimate_flops']:.1f}%: relative error "
          f"{100 * r['relative_error_flops']:.1f}%")
    print(f"  train signal: weight updates take {100 * res['train_vs_static']['update_share_median']:.3f}% of its "
          f"time (its update timer)")
    if not all(res[k]["resolved"] for k in ("static_vs_plain", "train_vs_static", "eval_overhead")):
        print("  * the 90% interval straddles the target: this verdict is within the machine's noise")


# --------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="CUDA, bf16 autocast, torch.compile, 124M-parameter Llama")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (CPU 40, GPU 100)")
    p.add_argument("--repeats", type=int, default=None, help="repeats of all four variants (CPU 2, GPU 3)")
    p.add_argument("--vocab", type=int, default=None, help="model vocabulary (CPU: the tokenizer's; GPU: 32000)")
    p.add_argument("--cache", type=Path, default=None, help="data cache (default /tmp/velocitune-bench/<mode>)")
    args = p.parse_args()

    import torch

    if args.gpu and not torch.cuda.is_available():
        sys.exit("throughput.py --gpu needs a CUDA device, and torch.cuda.is_available() is False here "
                 f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Run it on a GPU machine, "
                 "or drop --gpu for the CPU benchmark.")
    s = gpu_setup(args) if args.gpu else cpu_setup(args)
    repeats = args.repeats or (3 if args.gpu else 2)
    if s.steps % s.m or s.steps <= (s.skip + 1) * s.m:
        sys.exit(f"--steps must be a multiple of {s.m} above {(s.skip + 1) * s.m}, got {s.steps}")

    from transformers.utils import logging as hf_logging

    from velocitune.metrics import flops_per_token, peak_flops
    from velocitune.model import build_model, load_tokenizer
    from velocitune.shards import PreparedData

    hf_logging.disable_progress_bar()  # "Loading weights" bars from every load_model

    cache = args.cache or Path("/tmp/velocitune-bench") / s.mode
    t0 = time.perf_counter()
    tok_dir, data_dir = build_data(cache, s)
    data = PreparedData(data_dir)
    n_tok = len(load_tokenizer(tok_dir))
    if n_tok != data.vocab_size:
        sys.exit(f"tokenizer {tok_dir} has {n_tok} tokens but {data_dir} was prepared with {data.vocab_size}; "
                 f"delete {cache} and run again")
    vocab = s.vocab or n_tok
    if vocab < n_tok:
        sys.exit(f"--vocab {vocab} is smaller than the tokenizer's {n_tok} tokens")
    model_dir = saved_model(cache, s, vocab) if vocab != n_tok else None
    setup_s = time.perf_counter() - t0
    probe = build_model(**model_kwargs(s, vocab))
    flops_tok, n_params = flops_per_token(probe, s.seq_len), sum(q.numel() for q in probe.parameters())
    peak, peak_name = peak_flops(torch.device(s.device))
    print(f"{s.mode}: Llama {n_params / 1e6:.1f}M params (hidden {s.hidden}, {s.layers} layers, vocab {vocab}), "
          f"batch {s.batch} x {s.seq_len}, {s.steps} steps per run in blocks of m = {s.m}, window = steps "
          f"{s.skip * s.m}..{s.steps}, {repeats} repeats, {'lock-step threads' if s.mode == 'cpu' else 'sequential'}; "
          f"data {data_dir} ({setup_s:.0f}s to build/check); peak: {peak_name}", flush=True)

    runs = cache / "runs"
    reps: list[dict[str, dict]] = []
    printed = io.StringIO()  # velocitune's own printing (resolved config, summaries) would bury the table
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", ResourceWarning)
        for rep in range(repeats):
            t = time.perf_counter()
            try:
                with contextlib.redirect_stdout(printed):
                    if s.mode == "cpu":
                        # Alternate the direction and rotate the start, so no variant always follows the same one.
                        base = VARIANTS if rep % 2 == 0 else VARIANTS[::-1]
                        k = rep // 2 % len(base)
                        order = list(base[k:] + base[:k])
                        reps.append(lockstep_repeat(s, data_dir, tok_dir, model_dir, vocab, data.domains, runs, order))
                    else:
                        reps.append({v: sequential_run(v, s, data_dir, tok_dir, model_dir, vocab, data.domains, runs)
                                     for v in VARIANTS})
            except BaseException:
                print(printed.getvalue())
                raise
            for v in VARIANTS[1:]:
                add_update_times(reps[-1][v], s)
            tps = {v: (s.steps - s.skip * s.m) * s.batch * s.seq_len / sum(b["wall_s"] for b in reps[-1][v]["blocks"])
                   for v in VARIANTS}
            print(f"  repeat {rep + 1}: " + ", ".join(f"{v} {x:,.0f}" for v, x in tps.items())
                  + f" tok/s ({time.perf_counter() - t:.0f}s)", flush=True)
    notes = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    res = analyse(reps, s, flops_tok, peak)
    print_table(res)
    for msg in notes:
        print(f"warning raised during the runs: {msg}")

    record = {
        "benchmark": "throughput",
        "what": "tokens/s of velocitune train (static, train signal, eval signal) vs a plain PyTorch loop in one "
                "process; block-by-block ratios over a window without start-up and step-0/final evaluations",
        "setup": asdict(s) | {"vocab": vocab, "params": n_params, "flops_per_token": flops_tok, "repeats": repeats},
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": 1,
        "peak": peak_name,
        "total_s": time.perf_counter() - t0,
        "results": res,
        "blocks": [{v: r[v]["blocks"] for v in VARIANTS} for r in reps],
        "final_loss": [{v: r[v]["final_loss"] for v in VARIANTS} for r in reps],
        "warnings": notes,
    }
    out_path = save("throughput_gpu" if args.gpu else "throughput", record)
    print(f"saved {out_path} ({record['total_s']:.0f}s)")


if __name__ == "__main__":
    main()
