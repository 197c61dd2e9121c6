"""`velocitune train`: continual pre-training of a causal LM on a domain mixture that is re-weighted while it trains.

One loop, top to bottom (DESIGN §6 rule 1): lr → micro-steps → clip → step → log → evaluate → update the
mixture for the next step → checkpoint. (Updating at the end of step t-1 is the same boundary as "before
step t"; doing it before the checkpoint means every record of a step is on disk before its checkpoint.) Everything that shapes the token stream or the weights (sampler schedule,
mixing-rule state, RNG, accumulators) goes into the checkpoint, so a resumed run equals an uninterrupted
one. Per-domain NLL sums stay on the device between log/update points: the only per-step host sync is
one finiteness flag, needed to skip or stop on a NaN loss before the optimizer step.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from velocitune import __version__, dist, mixing
from velocitune.checkpoint import RunLock, list_checkpoints, load_latest, rng_state, save_checkpoint, set_rng_state
from velocitune.config import Config, dump_yaml, to_dict
from velocitune.errors import ConfigError, DataError, TrainingError
from velocitune.evaluate import evaluate, load_val_set
from velocitune.losses import check_loss_path, forward_losses
from velocitune.metrics import (
    JsonlWriter,
    TensorBoardLogger,
    Throughput,
    Timers,
    atomic_write_json,
    atomic_write_text,
    format_weights,
    read_jsonl,
    truncate_after,
)
from velocitune.model import (
    build_model, check_vocab, flops_per_token, load_model, load_tokenizer, peak_flops,
    vocab_fingerprint,
)
from velocitune.sampler import MixtureSampler, rank_slice
from velocitune.shards import PreparedData

ADAPTIVE_RULES = ("velocitune", "velocitune-no-target", "dbl", "odm")

# Config keys a resumed run may change; any other difference is refused with the difference shown.
RESUMABLE_CHANGES = (
    "log.",
    "checkpoint.",
    "train.device",
    "train.threads",
    "train.micro_batch_size",
    "train.compile",
    "eval.batch_size",
    "dist.",
    "run.out_dir",
)


# --------------------------------------------------------------------------- schedule and budget


def lr_at(step: int, peak: float, steps: int, warmup: int, schedule: str, min_ratio: float, decay_fraction: float) -> float:
    """LR of optimizer step `step` (0-based): linear warm-up, then cosine, WSD or constant."""
    if step < warmup:
        return peak * (step + 1) / warmup
    lo = peak * min_ratio
    if schedule == "constant":
        return peak
    if schedule == "wsd":
        decay_start = max(warmup, int(round(steps * (1 - decay_fraction))))
        if step < decay_start:
            return peak
        frac = (step - decay_start + 1) / max(1, steps - decay_start)
        return peak + (lo - peak) * min(1.0, frac)
    progress = (step - warmup + 1) / max(1, steps - warmup)  # cosine: reaches lo at the last step
    return lo + (peak - lo) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def lr_schedule(cfg: Config, steps: int) -> np.ndarray:
    """The LR of every optimizer step, float64 (steps,): what the LR-aware target law integrates."""
    warmup = warmup_steps(cfg, steps)
    t = cfg.train
    return np.array(
        [lr_at(s, t.lr, steps, warmup, t.schedule, t.min_lr_ratio, t.decay_fraction) for s in range(steps)]
    )


def warmup_steps(cfg: Config, steps: int) -> int:
    w = cfg.train.warmup_steps
    return int(round(w * steps)) if w < 1 else int(w)


def resolve_steps(cfg: Config, windows: list[int]) -> int:
    """train.steps, else train.tokens / tokens per step, else one epoch of the (subsampled) corpus."""
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    if cfg.train.steps is not None:
        return cfg.train.steps
    if cfg.train.tokens is not None:
        return max(1, math.ceil(cfg.train.tokens / tokens_per_step))
    epoch = sum(windows) // cfg.train.batch_size
    if epoch < 1:
        raise DataError(
            f"the corpus holds {sum(windows)} training windows of {cfg.data.seq_len + 1} tokens, fewer than one "
            f"global batch of {cfg.train.batch_size}; lower train.batch_size or data.seq_len, or add data"
        )
    return epoch


def mixing_interval(cfg: Config, steps: int) -> int:
    m = cfg.mixing.interval if cfg.mixing.interval is not None else max(1, steps // 100)
    if cfg.mixing.rule in ADAPTIVE_RULES and m >= steps:
        raise ConfigError(
            f"config key 'mixing.interval' is {m} but the run has only {steps} steps, so the weights would "
            f"never change; use a smaller interval (default: steps // 100)"
        )
    return m


def is_update_step(step: int, warmup: int, m: int) -> bool:
    """Updates happen at optimizer-step boundaries from the end of warm-up on, every m steps; never at 0."""
    return step > 0 and step >= warmup and (step - warmup) % m == 0


# --------------------------------------------------------------------------- inputs of the mixing rule


def read_targets(cfg: Config, names: list[str]) -> Optional[np.ndarray]:
    """Targets from targets.json and/or explicit values; NaN for domains without one."""
    values: dict[str, float] = {}
    if cfg.mixing.targets:
        p = Path(cfg.mixing.targets)
        if not p.is_file():
            raise ConfigError(f"mixing.targets: '{p}' does not exist; run `velocitune targets` first")
        import json

        doc = json.loads(p.read_text())
        values.update({n: float(d["target"]) for n, d in doc.get("domains", {}).items()})
    values.update(cfg.mixing.target_values or {})
    if not values:
        return None
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"targets given for unknown domain(s) {unknown}; the prepared data has {names}")
    return np.array([values.get(n, np.nan) for n in names], dtype=np.float64)


def read_init_loss(path: Path, names: list[str]) -> np.ndarray:
    if not path.is_file():
        raise ConfigError(
            f"mixing.init_loss: '{path}' does not exist; run `velocitune init-loss` first, or drop the key to "
            f"measure it at step 0"
        )
    import json

    doc = json.loads(path.read_text())["domains"]
    missing = [n for n in names if n not in doc]
    if missing:
        raise ConfigError(f"{path} has no initial loss for domain(s) {missing}; re-run `velocitune init-loss`")
    return np.array([float(doc[n]["loss"]) for n in names], dtype=np.float64)


def make_rule(cfg: Config, w0: np.ndarray, names: list[str], data: PreparedData) -> mixing.Rule:
    mc = cfg.mixing
    params = {
        key: getattr(mc, key)
        for key in ("eta", "smoothing", "floor", "relative_floor", "min_weight", "ema", "alpha")
        if getattr(mc, key) is not None
    }
    if mc.rule in ("velocitune", "velocitune-no-target"):
        params["preset"] = mc.preset
    if mc.rule == "temperature":
        params = {"temperature": mc.temperature,
                  "token_counts": np.array([data.domain_info(n)["train"]["tokens"] for n in names], dtype=np.float64)}
    if mc.rule == "replay":
        src = Path(mc.replay_from) / "mixture.jsonl"
        if not src.is_file():
            raise ConfigError(f"mixing.replay_from: '{src}' does not exist; point it at a finished run directory")
        records = read_jsonl(src)
        params = {"replay_weights": mixing.replay_weights_from_records(records, names, mode=mc.replay_mode)}
    if mc.rule in ("static", "uniform"):
        params = {}
    return mixing.make_rule(mc.rule, w0, names, **params)


def initial_weights(cfg: Config, data: PreparedData) -> np.ndarray:
    names = data.domains
    if cfg.mixing.weights is None:
        return data.w0.copy()
    unknown = sorted(set(cfg.mixing.weights) - set(names))
    missing = [n for n in names if n not in cfg.mixing.weights]
    if unknown or missing:
        raise ConfigError(f"mixing.weights must name exactly the domains {names}; unknown {unknown}, missing {missing}")
    return np.array([cfg.mixing.weights[n] for n in names], dtype=np.float64)


def make_model(cfg: Config, data: PreparedData) -> torch.nn.Module:
    """The model to continue training: a local HF directory, or a fresh Llama from `model` sizes."""
    if cfg.model.path:
        model = load_model(cfg.model.path)
    else:
        mc = cfg.model
        model = build_model(
            vocab_size=data.vocab_size, hidden_size=mc.hidden_size, n_layers=mc.n_layers, n_heads=mc.n_heads,
            intermediate_size=mc.intermediate_size, max_seq_len=max(cfg.data.seq_len, 64), n_kv_heads=mc.n_kv_heads,
            tie_embeddings=mc.tie_embeddings, seed=cfg.train.seed,
        )
    fp_data = data.manifest["tokenizer"].get("vocab_fingerprint")
    tok_dir = cfg.model.tokenizer or cfg.model.path  # the tokenizer final/ will ship with
    if tok_dir and fp_data and (Path(tok_dir) / "tokenizer_config.json").is_file():
        fp_model = vocab_fingerprint(load_tokenizer(tok_dir))
        check_vocab(model, data.vocab_size, fp_model, fp_data)
    check_vocab(model, data.vocab_size)
    return model


# --------------------------------------------------------------------------- run directory


def check_resume_config(saved: dict, now: dict) -> None:
    diffs = []
    for sec in now:
        for key, val in now[sec].items():
            dotted = f"{sec}.{key}"
            old = saved.get(sec, {}).get(key)
            if old != val and not any(dotted.startswith(p) for p in RESUMABLE_CHANGES):
                diffs.append(f"  {dotted}: {old!r} -> {val!r}")
    if diffs:
        allowed = ", ".join(p + ("*" if p.endswith(".") else "") for p in RESUMABLE_CHANGES)
        raise ConfigError(
            "cannot resume: the config differs from the checkpoint's in keys that shape the run:\n"
            + "\n".join(diffs)
            + f"\nRevert them, or start a new run.out_dir. Keys that may change on resume: {allowed}"
        )


def save_final(model: torch.nn.Module, tokenizer, out: Path, state_dict: Optional[dict] = None) -> None:
    """final/: a save_pretrained directory (plus tokenizer), written beside and renamed into place."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def default_arm(cfg: Config) -> str:
    if cfg.run.arm:
        return cfg.run.arm
    arm = cfg.mixing.rule
    if cfg.mixing.rule in ("velocitune", "velocitune-no-target") and cfg.mixing.preset != "robust":
        arm += f"-{cfg.mixing.preset}"
    if cfg.mixing.rule in ADAPTIVE_RULES and cfg.mixing.signal == "train":
        arm += "-train"
    return arm


# --------------------------------------------------------------------------- the loop


@dataclass
class RunResult:
    out_dir: Path
    steps: int
    final_val_loss: dict[str, float]
    weights: dict[str, float]


def train(cfg: Config, resume: bool = False) -> RunResult:
    env = dist.init(cfg.train.device, cfg.dist.backend)
    try:
        return _train(cfg, env, resume)
    finally:
        dist.shutdown(env)


def _train(cfg: Config, env: dist.DistEnv, resume: bool) -> RunResult:
    t_start = time.perf_counter()
    out = Path(cfg.run.out_dir)
    main = env.is_main
    say = print if main else (lambda *a, **k: None)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)

    # ---- data, budget, batch geometry
    data = PreparedData(cfg.data.path)
    names, k, L = list(data.domains), len(data.domains), cfg.data.seq_len
    domains = {n: data.train(n) for n in names}
    windows = [domains[n].n_windows(L) for n in names]
    empty = [n for n, w in zip(names, windows) if w == 0]
    if empty:
        raise DataError(
            f"domain(s) {empty} hold fewer training tokens than one window of data.seq_len + 1 = {L + 1}; "
            f"lower data.seq_len or add documents"
        )
    sub_windows = [max(1, math.ceil(w * cfg.data.subsample)) for w in windows]
    steps = resolve_steps(cfg, sub_windows)
    B = cfg.train.batch_size
    if B % env.world_size:
        raise ConfigError(f"train.batch_size={B} must be divisible by the number of processes ({env.world_size})")
    per_rank = B // env.world_size
    micro = cfg.train.micro_batch_size or per_rank
    if per_rank % micro:
        raise ConfigError(f"train.micro_batch_size={micro} must divide the per-process batch {per_rank}")
    n_micro = per_rank // micro
    tokens_per_step = B * L
    warmup = warmup_steps(cfg, steps)
    m = mixing_interval(cfg, steps)
    adaptive = cfg.mixing.rule in ADAPTIVE_RULES
    use_eval_signal = adaptive and cfg.mixing.signal == "eval"
    eval_every = cfg.eval.interval or (m if use_eval_signal else max(1, steps // 10))
    eval_points = set(cfg.eval.points) if cfg.eval.points is not None else set(range(eval_every, steps, eval_every))
    ckpt_every = cfg.checkpoint.interval if cfg.checkpoint.interval is not None else max(1, steps // 5)

    # ---- model
    torch.manual_seed(cfg.train.seed)
    random.seed(cfg.train.seed)
    np.random.seed(cfg.train.seed % 2**32)
    device = env.device
    model = make_model(cfg, data)
    tok_dir = cfg.model.tokenizer or cfg.model.path or data.manifest["tokenizer"].get("name_or_path")
    tokenizer = None
    if cfg.model.tokenizer or (tok_dir and Path(tok_dir).is_dir()):
        tokenizer = load_tokenizer(tok_dir)  # a model.tokenizer that does not exist is an error, not skipped
    model.to(device)
    model.train()  # load_model returns eval mode
    # Once, before any step: the chunked loss must equal the model's own logits (catches unknown heads).
    check_loss_path(model, torch.from_numpy(domains[names[0]].windows(np.arange(1), L)[:, :-1]).to(device))
    bf16 = device.type == "cuda" and cfg.train.precision in ("auto", "bf16")
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    flops_tok = flops_per_token(model, L)
    peak, peak_name = peak_flops(device)
    if cfg.train.compile:
        # Compile the decoder in place: the chunked loss calls it directly and runs the head itself.
        getattr(model, "base_model", model).compile()
    net = dist.wrap_model(model, cfg.dist.strategy, env, bf16)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), fused=device.type == "cuda",
    )

    # ---- mixing rule, sampler, signal inputs
    w_init = initial_weights(cfg, data)
    rule = make_rule(cfg, w_init, names, data)
    targets = read_targets(cfg, names)
    given_init = read_init_loss(Path(cfg.mixing.init_loss), names) if cfg.mixing.init_loss else None
    if rule.needs_targets:
        missing = [n for n, t in zip(names, targets if targets is not None else [np.nan] * k) if not np.isfinite(t)]
        if missing:
            raise ConfigError(
                f"rule '{cfg.mixing.rule}' needs a target loss for every domain; missing for {missing}. "
                f"Run `velocitune targets` and set mixing.targets=PATH, or give mixing.target_values"
            )
    sampler = MixtureSampler(
        seed=cfg.train.seed, global_batch=B, windows_per_domain=windows, initial_weights=rule.initial_weights(),
        max_repetition=cfg.data.max_repetition, floor=cfg.mixing.sampling_floor, subsample=cfg.data.subsample,
        names=names, tokens_per_window=L,
    )
    val = load_val_set(data, L, cfg.eval.max_tokens)

    # Per-domain training NLL sums on device (float64 (k,)): `sig_*` over the current update window
    # (the `train` signal), `log_*` over the current log window (metrics).
    sig_sum = torch.zeros(k, dtype=torch.float64, device=device)
    sig_cnt = torch.zeros_like(sig_sum)
    log_sum = torch.zeros_like(sig_sum)
    log_cnt = torch.zeros_like(sig_sum)
    loss_acc = torch.zeros((), dtype=torch.float64, device=device)  # sum of step losses over the log window
    timers = Timers()
    start_step, skipped, init, sig_last = 0, 0, None, None
    tokens_done = np.zeros(k, dtype=np.int64)  # trained tokens per domain (host; from the sampler plan)

    # ---- run directory and resume
    lock = contextlib.nullcontext()
    if main:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out)
    with lock:
        ckpt_root = out / "checkpoints"
        loaded = None
        if resume:
            loaded = load_latest(ckpt_root) if ckpt_root.exists() else None
            if loaded is None:
                say(f"no valid checkpoint in {ckpt_root}; starting from step 0")
                if main:
                    for f in ("metrics.jsonl", "eval.jsonl", "mixture.jsonl"):
                        (out / f).unlink(missing_ok=True)
        elif main and (out / "metrics.jsonl").exists():
            raise ConfigError(f"run directory '{out}' already holds a run; pass --resume to continue it, or set run.out_dir")
        if loaded is not None:
            start_step, state = loaded
            check_resume_config(state["config"], to_dict(cfg))
            dist.restore_model_state(ckpt_root, state, model, optimizer, env, cfg.dist.strategy)
            sampler.load_state_dict(state["sampler"])
            rule.load_state_dict(state["rule"])
            set_rng_state(state["rng"])
            for buf, key in ((sig_sum, "sig_sum"), (sig_cnt, "sig_cnt"), (log_sum, "log_sum"), (log_cnt, "log_cnt")):
                buf.copy_(state[key].to(device))
            loss_acc.fill_(float(state["loss_acc"]))
            init, skipped, sig_last = state["init"], state["skipped"], state["sig_last"]
            tokens_done = np.asarray(state["tokens_done"], dtype=np.int64)
            timers.load_state_dict(state["timers"])
            t_start -= state["elapsed_s"]  # wall time counts the run, not this process
            if main:
                for f in ("metrics.jsonl", "eval.jsonl", "mixture.jsonl"):
                    truncate_after(out / f, start_step)
            say(f"resumed from step {start_step}")
        if main:
            atomic_write_text(out / "config.yaml", dump_yaml(cfg))
            if targets is not None and cfg.mixing.targets:
                shutil.copyfile(cfg.mixing.targets, out / "targets.json")
        metrics_log = JsonlWriter(out / "metrics.jsonl") if main else None
        eval_log = JsonlWriter(out / "eval.jsonl") if main else None
        mix_log = JsonlWriter(out / "mixture.jsonl") if main else None
        tb = TensorBoardLogger(out / "tb", enabled=cfg.log.tensorboard and main)

        def run_eval(step: int, timer: str) -> np.ndarray:
            with timers(timer):
                losses = evaluate(net, val, env, cfg.eval.batch_size, cfg.train.loss_chunk_tokens, autocast())
            if main:
                eval_log.write({"step": step, "tokens": step * tokens_per_step,
                                "losses": dict(zip(names, losses.tolist())),
                                "tokens_evaluated": dict(zip(names, val.tokens.tolist())),
                                "elapsed_s": time.perf_counter() - t_start})
                tb.scalars("val_loss", dict(zip(names, losses.tolist())), step)
            return losses

        # ---- ℓ_init: from a file, cached in the run dir, or measured now on the val sets
        if init is None:
            measured = run_eval(0, "eval")
            init = given_init if given_init is not None else measured
            sig_last = init.copy()  # train signal: the estimate of a domain not sampled in a window
            if main and given_init is None:
                atomic_write_json(out / "init_loss.json", {
                    "model": cfg.model.path or "fresh", "domains": {
                        n: {"loss": float(l), "tokens": int(t)} for n, l, t in zip(names, init, val.tokens)}})
            if main:
                mix_log.write(mixture_record(0, 0, names, None, init, targets, None, rule.initial_weights(),
                                             sampler.plan(0).sampling_weights, tokens_done, L, [], cfg.mixing.signal))

        # ---- what the user sees before the first step
        # The eval signal's cost per training step: by FLOPs (a forward is a third of a step), and from clocks.
        overhead_flops = (val.tokens.sum() / (3 * m * tokens_per_step)) if use_eval_signal else 0.0
        probe = probe_overhead(net, val, env, cfg, autocast, micro, n_micro) if use_eval_signal else None
        overhead = probe.eval_s / (m * probe.step_s) if probe else overhead_flops
        if main:
            print(dump_yaml(cfg))
            print(f"domains: {format_weights(names, w_init)}  (w0 = token shares)" if cfg.mixing.weights is None
                  else f"domains: {format_weights(names, w_init)}")
            print(f"steps {steps} x {B} seq x {L} tok = {steps * tokens_per_step:,} tokens; warm-up {warmup}; "
                  + (f"update every {m} steps; " if adaptive else f"{cfg.mixing.rule} weights; ")
                  + f"{env.world_size} process(es), {n_micro} micro-batch(es) of {micro}")
            if probe:
                print(f"estimated reweighting overhead: {100 * overhead:.1f}% (signal=eval; timed before training: "
                      f"one evaluation {probe.eval_s:.3g}s per {m} steps of {probe.step_s:.3g}s; "
                      f"by FLOPs k*val_tokens/(3*m*tokens_per_step) = {100 * overhead_flops:.1f}%)")
            elif adaptive:
                print(f"estimated reweighting overhead: 0.0% (signal={cfg.mixing.signal}: the training losses "
                      f"already computed" + (f"; one all-reduce of {2 * k} numbers per update)" if env.distributed
                                             else ")"))
            if targets is not None:
                for n, li, lt in zip(names, init, targets):
                    if np.isfinite(lt) and li <= lt:
                        print(f"warning: domain '{n}' starts at {li:.3f} <= its target {lt:.3f}: "
                              f"it is predicted to get worse; the δ_min guard upweights it if it falls behind")

        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=start_step, disable=not (main and cfg.log.progress), unit="step",
                   dynamic_ncols=True)
        throughput = Throughput(flops_tok, peak, env.world_size)
        throughput.start()
        # Timer totals as the loop starts: the overhead measured at the end covers this loop only.
        loop_t0, timers_at_loop = time.perf_counter(), timers.seconds()
        last_loss = float("nan")
        net.train()
        step = start_step
        # ŵ of the newest mixture record (after a resume: as the truncated file holds it), to log changes.
        logged_w_hat = sampler.plan(start_step).sampling_weights if start_step < steps else None
        if main and start_step > 0 and (recs := read_jsonl(out / "mixture.jsonl")):
            logged_w_hat = np.array([recs[-1]["sampling_weights"][n] for n in names], dtype=np.float64)
        for step in range(start_step, steps):
            # 1. learning rate for this step
            lr = lr_at(step, cfg.train.lr, steps, warmup, cfg.train.schedule, cfg.train.min_lr_ratio, cfg.train.decay_fraction)
            for g in optimizer.param_groups:
                g["lr"] = lr

            # 2. forward/backward over this rank's micro-batches of the global plan
            with timers("data"):
                plan = sampler.plan(step)
                if main and not np.array_equal(plan.sampling_weights, logged_w_hat):
                    # The sampler capped a domain that used its max_repetition epochs (any rule, static too):
                    # record the distribution actually sampled from this step on, so that plots and the
                    # replay rule's time average see it.
                    logged_w_hat = plan.sampling_weights
                    mix_log.write(mixture_record(step, step * tokens_per_step, names, None, init, targets, None,
                                                 rule_weights(rule), logged_w_hat, tokens_done, L, [],
                                                 cfg.mixing.signal))
                tokens_done += np.bincount(plan.domains, minlength=k) * L
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            for j in range(n_micro):
                with timers("data"):
                    sl = rank_slice(B, env.rank, env.world_size, j, n_micro)
                    x, d = assemble(domains, names, plan.domains[sl], plan.windows[sl], L, device)
                with dist.grad_sync(net, enabled=(j == n_micro - 1)), autocast():
                    out_ = forward_losses(net, x[:, :-1], x[:, 1:], d, k, cfg.train.loss_chunk_tokens)
                (out_.loss / n_micro).backward()
                step_loss += out_.loss.detach().double() / n_micro
                sig_sum += out_.nll_sum
                sig_cnt += out_.count
                log_sum += out_.nll_sum
                log_cnt += out_.count

            # 3. clip and step; a non-finite loss or gradient stops the run or skips the batch
            gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip or float("inf"))
            if not bool(torch.isfinite(step_loss) & torch.isfinite(gnorm)):  # the one per-step sync (see docstring)
                if cfg.train.nan_policy == "stop":
                    bar.close()
                    ckpts = list_checkpoints(ckpt_root) if ckpt_root.exists() else []
                    where = f"the last checkpoint is {ckpts[-1]}" if ckpts else "no checkpoint was written yet"
                    raise TrainingError(
                        f"non-finite loss or gradient at step {step} (loss {float(step_loss)}, grad norm {float(gnorm)}); "
                        f"{where}. Lower train.lr or raise train.warmup_steps and resume with --resume, "
                        f"or set train.nan_policy=skip to skip such batches"
                    )
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                sig_sum.zero_(), sig_cnt.zero_(), log_sum.zero_(), log_cnt.zero_()
                say(f"warning: skipped step {step}: non-finite loss (train.nan_policy=skip; {skipped} so far)")
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                loss_acc += step_loss
            done = step + 1
            throughput.add(tokens_per_step)

            # 4. log (the host reads device values only here)
            if done % cfg.log.interval == 0 or done == steps:
                packed = dist.all_reduce_sum(torch.cat([log_sum, log_cnt, loss_acc.view(1)]), env).cpu().numpy()
                n_steps = (done - 1) % cfg.log.interval + 1
                last_loss = packed[-1] / env.world_size / n_steps
                dom = packed[:k] / np.maximum(packed[k:2 * k], 1.0)
                log_sum.zero_(), log_cnt.zero_(), loss_acc.zero_()
                stats = throughput.log_point()
                tps = stats.tok_per_s
                if main:
                    elapsed = time.perf_counter() - t_start
                    spent = {"data": timers.total("data"), "eval": timers.total("eval"),
                             "update": timers.total("reweight")}
                    rec = {"step": done, "tokens": done * tokens_per_step, "loss": last_loss, "lr": lr,
                           "tok_per_s": tps, "tok_per_s_per_rank": tps / env.world_size, "grad_norm": float(gnorm),
                           "elapsed_s": elapsed, **{f"time_{n}_s": t for n, t in spent.items()},
                           **{f"share_{n}": t / elapsed for n, t in spent.items()},  # of the run's wall time so far
                           "skipped_steps": skipped, "domain_loss": dict(zip(names, dom.tolist()))}
                    if stats.mfu is not None:
                        rec["mfu"] = stats.mfu
                        rec["peak_flops"] = peak_name
                    metrics_log.write(rec)
                    tb.scalars("train", {"loss": last_loss, "lr": lr, "tok_per_s": tps}, done)
                    tb.scalars("train_domain_loss", dict(zip(names, dom.tolist())), done)
                    bar.set_postfix_str(f"loss {last_loss:.3f} | {tps:,.0f} tok/s | "
                                        f"{format_weights(names, sampler.plan(step).sampling_weights)}")
            bar.update(1)

            # 5. evaluate for the curves (not part of the mixing signal)
            if done in eval_points and done < steps and not (use_eval_signal and is_update_step(done, warmup, m)):
                run_eval(done, "eval")

            # 6. update the mixture for the next step (an optimizer-step boundary; never at step 0)
            if adaptive and is_update_step(done, warmup, m) and done < steps:
                if use_eval_signal:
                    losses = run_eval(done, "reweight")
                with timers("reweight"):
                    if not use_eval_signal:
                        packed = dist.all_reduce_sum(torch.cat([sig_sum, sig_cnt]), env).cpu().numpy()
                        # A domain with no tokens in this window (weight ~0) keeps its last estimate.
                        losses = np.where(packed[k:] > 0, packed[:k] / np.maximum(packed[k:], 1.0), sig_last)
                        sig_last = losses
                        sig_sum.zero_(), sig_cnt.zero_()
                    upd = rule.update(done, losses, init, targets, plan.sampling_weights)
                    if not upd.skipped:
                        w_hat = logged_w_hat = sampler.set_weights(done, upd.weights)
                        if cfg.dist.check_weights:
                            check_same_on_all_ranks(upd.weights, env)
                if main and not upd.skipped:
                    mix_log.write(mixture_record(done, done * tokens_per_step, names, losses, init, targets,
                                                 upd.velocity, upd.weights, w_hat, tokens_done, L, upd.guarded,
                                                 cfg.mixing.signal))
                    tb.scalars("weight", dict(zip(names, w_hat.tolist())), done)
                    if upd.velocity is not None:
                        tb.scalars("velocity", dict(zip(names, np.asarray(upd.velocity).tolist())), done)

            # 7. checkpoint (after every record of this step is written, so resume truncates cleanly)
            if ckpt_every and done % ckpt_every == 0 and done < steps:
                with timers("checkpoint"):
                    save_state(ckpt_root, done, cfg, model, optimizer, sampler, rule, init, sig_last, skipped, tokens_done,
                               (sig_sum, sig_cnt, log_sum, log_cnt, loss_acc), timers, t_start, env)
        bar.close()
        in_loop = {n: timers.total(n) - timers_at_loop.get(n, 0.0) for n in ("reweight", "eval", "checkpoint")}
        steps_s = time.perf_counter() - loop_t0 - sum(in_loop.values())  # the training steps alone
        measured_overhead = in_loop["reweight"] / steps_s if adaptive and steps_s > 0 else 0.0

        # ---- the end: final validation loss, summary, final/ model
        final = run_eval(steps, "eval")
        wall = time.perf_counter() - t_start
        w_final = rule_weights(rule)
        final_sd = dist.full_model_state(model, env, cfg.dist.strategy) if cfg.checkpoint.save_final else None
        if main:
            for log in (metrics_log, eval_log, mix_log):
                log.close()  # syncs; left open, a process running many trainings leaks three files per run
            atomic_write_json(out / "summary.json", {
                "velocitune_version": __version__, "arm": default_arm(cfg), "rule": cfg.mixing.rule,
                "preset": cfg.mixing.preset, "signal": cfg.mixing.signal, "seed": cfg.train.seed, "domains": names,
                "steps": steps, "tokens": steps * tokens_per_step, "init_loss": dict(zip(names, map(float, init))),
                "targets": None if targets is None else dict(zip(names, map(float, targets))),
                "final_val_loss": dict(zip(names, final.tolist())),
                "tokens_per_domain": dict(zip(names, tokens_done.tolist())),
                "epochs_per_domain": dict(zip(names, sampler.epochs(steps).tolist())),
                "wall_time_s": wall, "time_eval_s": timers.total("eval"), "time_update_s": timers.total("reweight"),
                "time_data_s": timers.total("data"), "time_checkpoint_s": timers.total("checkpoint"),
                "skipped_steps": skipped, "world_size": env.world_size, "estimated_overhead": overhead,
                "estimated_overhead_flops": overhead_flops, "measured_overhead": measured_overhead,
                "complete": True,
            })
            if cfg.checkpoint.save_final:
                save_final(dist.unwrap(model), tokenizer, out / "final", final_sd)
            tb.close()
            mean = float(np.mean(final))
            print(f"done: {steps} steps, {steps * tokens_per_step:,} tokens in {wall:.0f}s; "
                  f"mean val loss {mean:.4f}; {format_weights(names, final)} (val loss)")
            spent = {"evaluation": "eval", "reweighting": "reweight", "data loading": "data", "checkpoints": "checkpoint"}
            print("time: " + ", ".join(f"{label} {100 * timers.total(t) / wall:.1f}%" for label, t in spent.items())
                  + f" of {wall:.0f}s")
            if adaptive:
                print(f"reweighting overhead: measured {100 * measured_overhead:.1f}% of the training steps' time "
                      f"(estimated {100 * overhead:.1f}%; signal={cfg.mixing.signal})")
        dist.barrier(env)
        return RunResult(out, steps, dict(zip(names, final.tolist())), dict(zip(names, np.asarray(w_final).tolist())))


# --------------------------------------------------------------------------- helpers of the loop


def assemble(domains: dict, names: list[str], dom: np.ndarray, win: np.ndarray, L: int, device: torch.device):
    """Gather the planned windows into one int64 batch (n, L+1) and its per-sequence domain ids (n,)."""
    batch = np.empty((len(dom), L + 1), dtype=np.int64)
    for d in np.unique(dom):
        rows = np.nonzero(dom == d)[0]
        batch[rows] = domains[names[d]].windows(win[rows], L)
    x = torch.from_numpy(batch)
    dvec = torch.from_numpy(dom.astype(np.int64))
    if device.type == "cuda":
        x, dvec = x.pin_memory(), dvec.pin_memory()
    return x.to(device, non_blocking=True), dvec.to(device, non_blocking=True)


@dataclass
class OverheadProbe:
    eval_s: float  # one evaluation of the val sets (what the eval signal runs per update), this rank
    step_s: float  # one training step's forward and backward passes (n_micro micro-batches), this rank


def probe_overhead(net, val, env: dist.DistEnv, cfg: Config, autocast, micro: int, n_micro: int,
                   repeats: int = 5) -> OverheadProbe:
    """Time the eval signal's evaluation and a training step before training, leaving no trace.

    The FLOPs estimate k·val/(3·m·τ) takes a forward pass for a third of a step; at small scale fixed costs
    (per-layer kernels, the chunked head, Python) make it more, and the estimate runs ~20 % low. So time the
    real thing: one warm-up micro-batch (it also compiles under train.compile), then `repeats` training
    micro-batches (forward + backward through the same chunked loss as the loop; median) on val windows, and
    one whole `evaluate` after a forward-only warm-up. Gradients are dropped and the RNG forked, so the run
    is the same as without the probe. Collective under torchrun (every rank runs it). Leaves out the
    optimizer step, clipping and data loading (a few % of a step). Cost: about one update's evaluation
    plus seven micro-batches. On the CPU benchmark it lands within 10 % of the measured overhead.
    """
    device = env.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    flat = np.concatenate(val.windows)  # (all val windows, L+1)
    dom = np.repeat(np.arange(len(val.windows)), [w.shape[0] for w in val.windows])  # (all val windows,)
    rows = np.arange(micro) % flat.shape[0]  # a training-shaped micro-batch, repeating windows if few
    x = torch.from_numpy(flat[rows]).to(device)  # (micro, L+1)
    d = torch.from_numpy(dom[rows]).to(device)  # (micro,)
    model = dist.unwrap(net)

    def micro_step(backward: bool = True) -> float:
        sync()
        t0 = time.perf_counter()
        with torch.set_grad_enabled(backward), autocast():
            out = forward_losses(net, x[:, :-1], x[:, 1:], d, len(val.windows), cfg.train.loss_chunk_tokens)
        if backward:
            out.loss.backward()
        sync()
        return time.perf_counter() - t0

    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):  # dropout draws stay private
        micro_step()  # warm-up of the training pass
        step_s = n_micro * float(np.median([micro_step() for _ in range(repeats)]))
        model.zero_grad(set_to_none=True)
        net.eval()
        micro_step(backward=False)  # warm-up of the forward-only pass (the ℓ_init evaluation may not have run)
        net.train()
        sync()
        t0 = time.perf_counter()
        evaluate(net, val, env, cfg.eval.batch_size, cfg.train.loss_chunk_tokens, autocast())
        eval_s = time.perf_counter() - t0
    return OverheadProbe(eval_s=eval_s, step_s=step_s)


def rule_weights(rule: mixing.Rule) -> np.ndarray:
    """The rule's current state weights w (its initial weights for rules without state)."""
    return np.asarray(rule.state_dict().get("weights", rule.initial_weights()), dtype=np.float64)


def mixture_record(step, tokens, names, losses, init, targets, velocity, weights, w_hat, tokens_done, L, guarded, signal) -> dict:
    def named(v):
        return None if v is None else dict(zip(names, np.asarray(v, dtype=np.float64).tolist()))

    return {"step": step, "tokens": tokens, "signal": signal, "losses": named(losses), "init": named(init),
            "targets": named(targets), "velocity": named(velocity), "weights": named(weights),
            "sampling_weights": named(w_hat), "tokens_per_domain": dict(zip(names, tokens_done.tolist())),
            "guarded": list(guarded)}


def save_state(root, step, cfg, model, optimizer, sampler, rule, init, sig_last, skipped, tokens_done, accs, timers, t_start, env) -> None:
    # Collective: under FSDP2 every rank writes its DCP shards; otherwise the full states are gathered for
    # rank 0. Rank 0's checkpoint directory is the commit point (it holds a reference to the shards).
    model_part = dist.checkpoint_model_state(root, step, model, optimizer, env, cfg.dist.strategy)
    if env.is_main:
        sig_sum, sig_cnt, log_sum, log_cnt, loss_acc = accs
        save_checkpoint(root, step, {
            **model_part,
            "sampler": sampler.state_dict(), "rule": rule.state_dict(), "rng": rng_state(),
            "sig_sum": sig_sum.cpu(), "sig_cnt": sig_cnt.cpu(), "log_sum": log_sum.cpu(), "log_cnt": log_cnt.cpu(),
            "loss_acc": float(loss_acc), "init": init, "skipped": skipped, "sig_last": sig_last,
            "tokens_done": tokens_done.copy(), "config": to_dict(cfg), "timers": timers.state_dict(),
            "elapsed_s": time.perf_counter() - t_start,
        }, keep=cfg.checkpoint.keep)
        dist.prune_sharded(root)  # shards of checkpoints that save_checkpoint just pruned
    dist.barrier(env)


def check_same_on_all_ranks(w: np.ndarray, env: dist.DistEnv) -> None:
    """Debug (dist.check_weights): every rank must compute bit-identical float64 weights."""
    if not env.distributed:
        return
    import torch.distributed as tdist

    mine = torch.tensor(w, dtype=torch.float64)
    ref = mine.clone()
    tdist.broadcast(ref, src=0)
    if not torch.equal(mine, ref):
        raise TrainingError(f"rank {env.rank} computed weights {w.tolist()} != rank 0's {ref.tolist()}")
