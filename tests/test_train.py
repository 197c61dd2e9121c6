"""The training loop end to end on a tiny model: run-directory contract, the rule applied as written,
exact resume after a weight update, gradient accumulation, NaN handling and bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import train_interrupted_at

from velocitune import mixing
from velocitune.errors import ConfigError, TrainingError
from velocitune.fileio import read_jsonl
from velocitune.train import train

NAMES = ["prose", "code", "math"]


def _losses(out, key="loss"):
    return [r[key] for r in read_jsonl(out / "metrics.jsonl")]


def test_run_directory_contract_and_rule_applied(make_config):
    cfg = make_config()
    res = train(cfg)
    out = res.out_dir
    for f in ("config.yaml", "metrics.jsonl", "eval.jsonl", "mixture.jsonl", "summary.json", "init_loss.json"):
        assert (out / f).is_file(), f
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["steps"] == 24 and summary["domains"] == NAMES
    # docs/contracts.md lists exactly the keys summary.json has.
    contract = (Path(__file__).parents[1] / "docs" / "contracts.md").read_text()
    block = contract.split("- `summary.json`, written at the end:", 1)[1].split("}`", 1)[0]
    assert set(re.findall(r'"(\w+)"', block)) == set(summary)
    assert sum(summary["tokens_per_domain"].values()) == 24 * 8 * 32

    metrics = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in metrics] == [4, 8, 12, 16, 20, 24]
    block = contract.split("- `metrics.jsonl`: one object per logged step:", 1)[1].split("}`", 1)[0]
    listed = set(re.findall(r'"(\w+)"', block))
    assert all(set(r) == listed - {"mfu", "peak_flops"} for r in metrics)  # CPU: no named peak, no MFU
    for r in metrics:
        for n in ("data", "eval", "update"):
            assert r[f"share_{n}"] == pytest.approx(r[f"time_{n}_s"] / r["elapsed_s"])
        assert 0 < r["share_update"] < 1 and r["share_data"] + r["share_eval"] + r["share_update"] < 1
    assert metrics[-1]["loss"] < metrics[0]["loss"]

    # Updates at 2 (end of warm-up) + 4j; every record's weights equal the rule recomputed from its inputs.
    mix = read_jsonl(out / "mixture.jsonl")
    assert [r["step"] for r in mix] == [0, 2, 6, 10, 14, 18, 22]
    w = np.array([mix[0]["weights"][n] for n in NAMES])
    for rec in mix[1:]:
        v = mixing.velocity([rec["losses"][n] for n in NAMES], [rec["init"][n] for n in NAMES],
                            [rec["targets"][n] for n in NAMES], floor=0.02)
        # the default's online targets (docs/design.md §3): a forgetting domain has V = 0 and keeps its floor
        quiet = np.array([n in rec["forgetting"] for n in NAMES])
        floors = np.array([rec["floors"][n] for n in NAMES])
        v = np.where(quiet, 0.0, v)
        np.testing.assert_allclose([rec["velocity"][n] for n in NAMES], v, atol=1e-12)
        w = mixing.update_weights(w, v, eta=1.0, smoothing=mixing.PRESETS["robust"]["smoothing"])  # the default preset
        w = mixing.lift_to_floors(w, floors)[0]  # max_rise (lift_to_floors has its own tests)
        if quiet.any():  # pinned at the floor, the others scaled together (an independent reference)
            w = np.where(quiet, floors, w * (1 - floors[quiet].sum()) / w[~quiet].sum())
        np.testing.assert_allclose([rec["weights"][n] for n in NAMES], w, atol=1e-9)
        assert sum(rec["sampling_weights"].values()) == pytest.approx(1.0)
    assert not np.allclose([mix[0]["weights"][n] for n in NAMES], w)

    # The eval signal's losses are the val losses logged at the same step.
    evals = {r["step"]: r for r in read_jsonl(out / "eval.jsonl")}
    assert evals[0]["losses"] == mix[0]["init"]
    for rec in mix[1:]:
        assert evals[rec["step"]]["losses"] == rec["losses"]
    assert summary["final_val_loss"] == evals[24]["losses"]

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final", local_files_only=True)
    assert model.config.vocab_size >= 384


@pytest.mark.parametrize("mixing_keys", [{}, {"pace": False}, {"rule": "odm", "interval": 1}], ids=["velocitune", "nopace", "odm"])
def test_resume_after_weight_update_is_bit_identical(make_config, monkeypatch, mixing_keys):
    sections = dict(log={"interval": 1, "progress": False}, checkpoint={"interval": 8, "keep": 2}, mixing=mixing_keys)
    ref = train(make_config("ref", **sections)).out_dir

    cfg = make_config("crash", **sections)
    train_interrupted_at(monkeypatch, cfg, 13)  # after the checkpoint at 8 and the updates at 10 and 12 (pending for 12)
    assert [r["step"] for r in read_jsonl(cfg_out(cfg) / "mixture.jsonl")][-1] == (13 if mixing_keys.get("interval") == 1 else 10)
    train(cfg, resume=True)
    out = cfg_out(cfg)
    assert _losses(out) == _losses(ref)
    assert [r["weights"] for r in read_jsonl(out / "mixture.jsonl")] == [r["weights"] for r in read_jsonl(ref / "mixture.jsonl")]
    assert read_jsonl(out / "eval.jsonl")[-1]["losses"] == read_jsonl(ref / "eval.jsonl")[-1]["losses"]
    from safetensors.torch import load_file

    a, b = load_file(ref / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert all(torch.equal(a[key], b[key]) for key in a)


def cfg_out(cfg):
    from pathlib import Path

    return Path(cfg.run.out_dir)


def test_gradient_accumulation_matches_full_batch(make_config):
    full = train(make_config("full", train={"steps": 6}, mixing={"rule": "static"})).out_dir
    acc = train(make_config("acc", train={"steps": 6, "micro_batch_size": 2}, mixing={"rule": "static"})).out_dir
    np.testing.assert_allclose(_losses(acc), _losses(full), rtol=1e-5)


@pytest.mark.parametrize("rule", ["static", "uniform", "temperature", "velocitune-no-target", "dbl", "odm"])
def test_every_rule_runs_and_keeps_weights_valid(make_config, rule):
    res = train(make_config(rule, train={"steps": 12}, mixing={"rule": rule}, checkpoint={"interval": 0}))
    mix = read_jsonl(res.out_dir / "mixture.jsonl")
    for rec in mix:
        w = np.array(list(rec["sampling_weights"].values()))
        assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    if rule in ("static", "uniform", "temperature"):
        assert len(mix) == 1  # no updates for static rules
    else:
        assert len(mix) > 1


def test_train_signal_uses_training_losses(make_config):
    res = train(make_config("sig", train={"steps": 12}, mixing={"signal": "train"}, checkpoint={"interval": 0},
                            eval={"interval": 5}))
    mix = read_jsonl(res.out_dir / "mixture.jsonl")
    evals = {r["step"] for r in read_jsonl(res.out_dir / "eval.jsonl")}
    assert len(mix) > 1
    assert all(rec["signal"] == "train" for rec in mix)
    assert json.loads((res.out_dir / "summary.json").read_text())["arm"] == "velocitune"  # train: its own signal
    assert not {r["step"] for r in mix[1:]} <= evals  # no val evaluation was needed for the updates


def test_replay_uses_previous_runs_average_weights(make_config):
    src = train(make_config("src", train={"steps": 12}, checkpoint={"interval": 0})).out_dir
    records = read_jsonl(src / "mixture.jsonl")
    expected = mixing.replay_weights_from_records(records, NAMES, mode="average")
    res = train(make_config("replay", train={"steps": 8}, checkpoint={"interval": 0},
                            mixing={"rule": "replay", "replay_from": str(src)}))
    first = read_jsonl(res.out_dir / "mixture.jsonl")[0]
    np.testing.assert_allclose([first["weights"][n] for n in NAMES], expected, atol=1e-12)


def test_nan_loss_stops_with_clear_message_or_skips(make_config, monkeypatch):
    import velocitune.train as T

    real = T.forward_losses
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 5:
            out = out._replace(loss=out.loss * float("nan"), nll_sum=out.nll_sum * float("nan"))
        return out

    monkeypatch.setattr(T, "forward_losses", poisoned)
    with pytest.raises(TrainingError, match="non-finite loss or gradient at step 4.*nan_policy=skip"):
        train(make_config("nan", mixing={"rule": "static"}))
    calls["n"] = 0
    res = train(make_config("skip", train={"nan_policy": "skip", "steps": 8}, mixing={"rule": "static"}))
    summary = json.loads((res.out_dir / "summary.json").read_text())
    assert summary["skipped_steps"] == 1
    assert all(np.isfinite(r["loss"]) for r in read_jsonl(res.out_dir / "metrics.jsonl"))


def test_bad_inputs(make_config, tmp_path):
    with pytest.raises(ConfigError, match="needs a target loss for every domain; missing for \\['math'\\]"):
        train(make_config("t1", mixing={"target_values": {"prose": 3.0, "code": 2.0}}))
    with pytest.raises(ConfigError, match="unknown domain"):
        train(make_config("t2", mixing={"target_values": {"prose": 3.0, "code": 2.0, "math": 1.0, "law": 2.0}}))
    with pytest.raises(ConfigError, match="mixing.interval' is 50 but the run has only 24 steps"):
        train(make_config("t3", mixing={"interval": 50}))
    cfg = make_config("t4", train={"steps": 4}, mixing={"rule": "static"})
    train(cfg)
    with pytest.raises(ConfigError, match="already holds a run; pass --resume"):
        train(cfg)
    changed = make_config("t4", train={"steps": 4, "lr": 1e-2}, mixing={"rule": "static"}, checkpoint={"interval": 2})
    # No checkpoint inside a 4-step run with interval 2 at step 2 -> there is one; resuming with another lr is refused.
    train(make_config("t5", train={"steps": 4}, mixing={"rule": "static"}, checkpoint={"interval": 2}))
    changed = make_config("t5", train={"steps": 4, "lr": 1e-2}, mixing={"rule": "static"}, checkpoint={"interval": 2})
    with pytest.raises(ConfigError, match="train.lr: 0.003 -> 0.01"):
        train(changed, resume=True)


def test_vocab_mismatch_is_refused(make_config, tmp_path):
    from velocitune.model import build_model

    small = build_model(vocab_size=100, hidden_size=32, n_layers=1, n_heads=2, intermediate_size=64, max_seq_len=64)
    small.save_pretrained(tmp_path / "small")
    with pytest.raises(TrainingError):
        train(make_config("vocab", model={"path": str(tmp_path / "small")}))


def test_model_with_another_tokenizer_is_refused(make_config, tmp_path, tiny_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from velocitune.model import build_model

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["0123456789 " * 50, "x y z " * 40],
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = tmp_path / "other"
    build_model(vocab_size=512, hidden_size=32, n_layers=1, n_heads=2, intermediate_size=64, max_seq_len=64).save_pretrained(other)
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>").save_pretrained(other)
    with pytest.raises(TrainingError, match="prepared with a different tokenizer"):
        train(make_config("tok", model={"path": str(other)}))
    # The same vocabulary saved again elsewhere is accepted (the check compares vocabularies, not files).
    same = tmp_path / "same"
    build_model(vocab_size=512, hidden_size=32, n_layers=1, n_heads=2, intermediate_size=64, max_seq_len=64).save_pretrained(same)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_tokenizer).save_pretrained(same)
    train(make_config("tok2", model={"path": str(same)}, train={"steps": 2}, mixing={"rule": "static"}))


@pytest.mark.slow
def test_compiled_decoder_gives_the_same_losses(make_config):
    eager = train(make_config("eager", train={"steps": 4}, mixing={"rule": "static"})).out_dir
    compiled = train(make_config("compiled", train={"steps": 4, "compile": True}, mixing={"rule": "static"})).out_dir
    np.testing.assert_allclose(_losses(compiled), _losses(eager), rtol=1e-4)


def test_capped_domains_are_recorded_in_mixture_jsonl_for_static_rules_too(make_config, tiny_prepared):
    """uniform never updates, but the sampler caps a domain that used its allowance: mixture.jsonl must
    show the distribution actually sampled (plots and the replay rule's time average read it)."""
    from velocitune.shards import PreparedData

    data = PreparedData(tiny_prepared)
    windows = {n: data.train(n).n_windows(32) for n in data.domains}
    small = min(windows, key=windows.get)
    # An allowance of ~12 draws for the smallest domain: uniform takes ~8/3 a step, so it runs out at about
    # step 5 of 8 (max_repetition applies to every domain; the others keep enough for 8 steps).
    rep = 12.5 / windows[small]
    cfg = make_config(mixing={"rule": "uniform"}, data={"max_repetition": rep}, train={"steps": 8})
    train(cfg)
    recs = read_jsonl(Path(cfg.run.out_dir) / "mixture.jsonl")
    summary = json.loads((Path(cfg.run.out_dir) / "summary.json").read_text())
    assert len(recs) >= 2 and recs[0]["step"] == 0
    assert [r["step"] for r in recs] == sorted(r["step"] for r in recs)
    last = recs[-1]
    assert last["sampling_weights"][small] == 0.0 and last["velocity"] is None and last["losses"] is None
    assert sum(last["sampling_weights"].values()) == pytest.approx(1.0)
    assert last["weights"] == recs[0]["weights"]  # the rule's state is untouched; only ŵ changed
    # The domain drew exactly its allowance, and every record's token counts are those before its step.
    assert summary["tokens_per_domain"][small] == int(rep * windows[small]) * 32
    assert all(r["tokens_per_domain"][small] <= summary["tokens_per_domain"][small] for r in recs)


def test_overhead_probe_leaves_no_trace(make_config):
    """probe_overhead times a training micro-batch and an evaluation; parameters, gradients, the RNG stream
    and the train/eval mode come out as they went in, even for a model whose dropout draws random numbers."""
    import contextlib

    from transformers import LlamaConfig, LlamaForCausalLM

    from velocitune.dist import DistEnv
    from velocitune.evaluate import ValSet
    from velocitune.overhead import probe_overhead

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                         intermediate_size=64, attention_dropout=0.5)).train()
    rng = np.random.default_rng(0)
    val = ValSet(names=["a", "b"], windows=[rng.integers(0, 64, size=(3, 17)), rng.integers(0, 64, size=(2, 17))])
    x = torch.from_numpy(val.windows[0][:, :-1])

    # Control: a training forward of this model does draw from the RNG, so the check below can fail.
    before = torch.get_rng_state()
    model(input_ids=x)
    assert not torch.equal(before, torch.get_rng_state())

    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = torch.get_rng_state()
    probe = probe_overhead(model, val, DistEnv(), make_config(), contextlib.nullcontext, micro=4, n_micro=2)
    assert torch.equal(before, torch.get_rng_state())
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert probe.eval_s > 0 and probe.step_s > 0


@pytest.mark.parametrize("signal", ["eval", "train"])
def test_overhead_estimate_printed_and_saved(make_config, monkeypatch, capsys, signal):
    """The estimate is the probe's evaluation time over m steps' time; the FLOPs formula is kept beside it."""
    import velocitune.train as T
    from velocitune.overhead import OverheadProbe

    calls = []

    def fake_probe(*args, **kwargs):
        calls.append(args)
        return OverheadProbe(eval_s=0.6, step_s=0.1)

    monkeypatch.setattr(T, "probe_overhead", fake_probe)
    out = train(make_config(mixing={"signal": signal})).out_dir
    summary = json.loads((out / "summary.json").read_text())
    printed = capsys.readouterr().out
    if signal == "eval":
        # m = 4: 0.6 s / (4 x 0.1 s); by FLOPs: 3 domains x 256 val tokens / (3 x 4 x 8 x 32 tokens per step).
        assert len(calls) == 1
        assert summary["estimated_overhead"] == pytest.approx(1.5)
        assert summary["estimated_overhead_flops"] == pytest.approx(0.25)
        assert "estimated reweighting overhead: 150.0%" in printed and "= 25.0%" in printed
        assert summary["measured_overhead"] > 0
    else:
        assert calls == []  # the train signal needs no probe: its losses come with the training steps
        assert summary["estimated_overhead"] == summary["estimated_overhead_flops"] == 0.0
        assert "estimated reweighting overhead: 0.0% (signal=train" in printed


def test_default_arm_names_the_signal_only_when_not_the_rules_own(make_config):
    from velocitune.summary import default_arm

    # (the fixture names signal eval; "auto" is each rule's own: train for velocitune since issue 27, and odm)
    assert default_arm(make_config(mixing={"signal": "train"})) == "velocitune"
    assert default_arm(make_config(mixing={"signal": "eval"})) == "velocitune-eval"
    assert default_arm(make_config(mixing={"rule": "odm", "signal": "auto"})) == "odm"  # odm's own signal is train
    assert default_arm(make_config(mixing={"rule": "odm", "signal": "eval"})) == "odm-eval"
    assert default_arm(make_config(mixing={"rule": "dbl"})) == "dbl"
    assert default_arm(make_config(mixing={"signal": "auto"})) == "velocitune"  # paced, online: the default
    assert default_arm(make_config(mixing={"pace": False, "signal": "auto"})) == "velocitune-nopace"
    assert default_arm(make_config(mixing={"rule": "uniform", "pace": True})) == "uniform-pace"
    assert default_arm(make_config(mixing={"preset": "faithful", "signal": "auto"})) == "velocitune-faithful"
    assert default_arm(make_config(mixing={"preset": "faithful"}, run={"arm": "mine"})) == "mine"


def test_a_skipped_step_keeps_the_earlier_steps_sums(make_config, monkeypatch):
    """nan_policy=skip: step 2 is non-finite; the log window and the train signal's window of steps 0-3 hold
    exactly the sums of steps 0, 1 and 3 (before the fix a skip zeroed both, dropping steps 0 and 1)."""
    import velocitune.train as T

    real = T.forward_losses
    seen = []

    def poisoned(*a, **k):
        out = real(*a, **k)
        seen.append((out.nll_sum.detach().double().clone(), out.count.detach().double().clone()))
        if len(seen) == 3:  # step 2 (one micro-batch per step)
            out = out._replace(loss=out.loss * float("nan"), nll_sum=out.nll_sum * float("nan"))
        return out

    monkeypatch.setattr(T, "forward_losses", poisoned)
    res = train(make_config("skip", train={"nan_policy": "skip", "steps": 8},
                            mixing={"signal": "train", "warmup": 0, "interval": 4}, log={"interval": 4}))
    total, count = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for s, c in (seen[0], seen[1], seen[3]):  # the kept steps, added in the loop's order
        total += s
        count += c
    want = dict(zip(["prose", "code", "math"], (total / count).tolist()))
    metrics = read_jsonl(res.out_dir / "metrics.jsonl")
    assert metrics[0]["step"] == 4 and metrics[0]["skipped_steps"] == 1
    assert metrics[0]["domain_loss"] == want  # exact
    update = next(r for r in read_jsonl(res.out_dir / "mixture.jsonl") if r["step"] == 4)
    assert update["losses"] == want  # the train signal's window: the same three steps, exactly


def test_resume_of_a_finished_run_trains_and_writes_nothing(make_config, capsys):
    cfg = make_config("done", train={"steps": 4}, mixing={"rule": "static"}, checkpoint={"interval": 2})
    train(cfg)
    out = Path(cfg.run.out_dir)
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()}
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()
    assert train(cfg, resume=True) is None
    printed = capsys.readouterr().out
    assert "is complete (its summary.json says so): nothing to resume" in printed
    assert "resumed from step" not in printed and "done:" not in printed
    assert (out / "metrics.jsonl").read_text() == metrics  # no new lines
    after = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.rglob("*") if p.is_file()}
    assert after == before  # final/, summary.json, config.yaml, checkpoints: untouched
    # The CLI says the same and exits 0.
    from velocitune.cli import main
    from velocitune.config import dump_yaml

    path = out.parent / "done.yaml"
    path.write_text(dump_yaml(cfg))
    assert main(["train", str(path), "--resume"]) == 0
    assert "nothing to resume" in capsys.readouterr().out


def test_missing_targets_are_refused_before_the_model_loads(make_config, tmp_path, monkeypatch):
    """mixing.targets names a file not made yet: the velocitune rule is refused at set-up, before any model is
    built; the static rule (it reads no targets) trains without it (issue 28)."""
    import velocitune.engine as E

    missing = str(tmp_path / "targets.json")

    def no_model(*a, **k):
        raise AssertionError("the model was built")

    with monkeypatch.context() as m:
        m.setattr(E, "make_model", no_model)
        with pytest.raises(ConfigError, match="targets.json' does not exist; run `velocitune targets` first"):
            train(make_config("vt", mixing={"targets": missing, "target_values": None}), dry_run=True)
    res = train(make_config("static", train={"steps": 2}, mixing={"rule": "static", "targets": missing,
                                                                    "target_values": None}))
    assert json.loads((res.out_dir / "summary.json").read_text())["targets"] is None
    assert not (res.out_dir / "targets.json").exists()


# ------------------------------------------------------------------- what a run prints before it starts


def test_the_config_is_one_line_unless_verbose(make_config, capsys):
    """One compact line (the keys a reader checks, then every key set away from its default); --verbose
    prints the whole resolved YAML instead. The dry run prints what a run prints before step 0."""
    cfg = make_config()
    train(cfg, dry_run=True)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("config: ")]
    assert len(lines) == 1 and "\nmixing:" not in out and "rule: " not in out
    assert lines[0].startswith(f"config: rule=velocitune signal=eval steps=24 batch=8×32 lr=0.003 model=fresh "
                               f"data={cfg.data.path} out={cfg.run.out_dir}; set: model.hidden_size=32 ")
    assert "mixing.interval=4" in lines[0] and "mixing.target_values={prose: 3, code: 2, math: 1.5}" in lines[0]
    assert "train.batch_size" not in lines[0] and "train.lr" not in lines[0]  # shown in front, not again
    train(cfg, dry_run=True, verbose=True)
    out = capsys.readouterr().out
    assert not any(line.startswith("config: ") for line in out.splitlines())
    assert out.startswith("version: 1\nrun: {out_dir: ") and "rule: velocitune" in out and "hidden_size: 32" in out
    static = make_config("static", mixing={"rule": "static"})
    train(static, dry_run=True)
    assert "config: rule=static steps=24 " in capsys.readouterr().out  # a rule that never updates has no signal


def test_reweighting_over_a_quarter_of_the_run_warns_with_the_interval_that_fits(make_config, capsys):
    """By FLOPs (the dry run) the eval signal costs 3 x 256 val tokens / (3 x m x 8 x 32) = 1/m of a step: at
    m = 1 reweighting takes half the run; m = 3 brings it to a quarter, which is not over the bar."""
    from velocitune.overhead import overhead_warning

    train(make_config(mixing={"interval": 1}), dry_run=True)
    assert ("warning: reweighting is estimated to take 50% of the run's time (100% of the training steps' time: an "
            "evaluation every 1 step(s)); set mixing.interval=3 or more, mixing.signal=train (no extra cost), or a "
            "smaller eval.max_tokens (now 256)") in capsys.readouterr().err
    for interval in (3, 4):
        train(make_config(f"m{interval}", mixing={"interval": interval}), dry_run=True)
        assert "warning" not in capsys.readouterr().err
    train(make_config("sig", mixing={"interval": 1, "signal": "train"}), dry_run=True)
    assert "warning" not in capsys.readouterr().err  # the train signal costs nothing
    assert overhead_warning(1 / 3, 10, 1) is None
    assert "take 61% of the run's time (159% of" in overhead_warning(1.59, 1, 32768)
    assert "mixing.interval=5 or more" in overhead_warning(1.59, 1, 32768)  # 1.59 / 5 < 1/3
