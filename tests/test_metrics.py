"""Tests for velocitune.metrics (FLOPs per token and named peaks, throughput/MFU, timers) and velocitune.loggers
(TensorBoard, W&B)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from velocitune.errors import ConfigError
from velocitune.loggers import TensorBoardLogger, WandbLogger, flat_scalars, new_wandb_run_id
from velocitune.metrics import Throughput, Timers, flops_per_token, format_weights, peak_flops


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.mark.parametrize("tie", [True, False])
def test_flops_per_token_matches_torch_flop_counter(tie):
    """6N + 12·L·A·T against torch's own count of a Llama's forward and backward (eager attention, no causal
    discount). torch counts matmul-like ops only: the RMSNorm scales are parameters the 6N convention
    charges 6 FLOPs each, so measured + 6·(norm parameters) must equal the formula exactly."""
    from torch.utils.flop_counter import FlopCounterMode

    from velocitune.model import build_model

    T = 16
    model = build_model(vocab_size=64, hidden_size=32, n_layers=2, n_heads=2, intermediate_size=64, max_seq_len=64,
                        tie_embeddings=tie)
    model.config._attn_implementation = "eager"
    with FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 64, (1, T))).logits.sum().backward()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert counter.get_total_flops() / T + 6 * norms == flops_per_token(model, T)


def test_peak_flops_named_gpus(monkeypatch):
    assert peak_flops("cpu")[0] is None
    names = {
        "NVIDIA H100 80GB HBM3": 989.5e12,
        "NVIDIA H100 PCIe": 756e12,
        "NVIDIA H200": 989.5e12,
        "NVIDIA A100-SXM4-80GB": 312e12,
        "NVIDIA L4": 121e12,
        "NVIDIA L40S": 362.05e12,
        "NVIDIA A10G": 125e12,
        "Tesla T4": None,
    }
    for name, want in names.items():
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda _d, n=name: n)
        flops, what = peak_flops(torch.device("cuda", 0))
        assert flops == want, name
        assert name in what


def test_throughput_windows_overall_and_mfu():
    clock = FakeClock()
    tp = Throughput(flops_per_token=6e9, peak_flops=1e14, n_ranks=2, clock=clock)
    tp.add(1000)
    tp.add(1000)
    clock.t += 2.0
    s1 = tp.log_point()
    assert (s1.window_tokens, s1.window_s, s1.tok_per_s) == (2000, 2.0, 1000.0)
    # 6e9 FLOP/token × 1000 tok/s over 2 devices of 1e14 FLOP/s.
    assert s1.mfu == pytest.approx(6e12 / 2e14)

    tp.add(4000)
    clock.t += 1.0
    s2 = tp.log_point()
    assert (s2.window_tokens, s2.tok_per_s) == (4000, 4000.0)
    assert (s2.total_tokens, s2.elapsed_s, s2.avg_tok_per_s) == (6000, 3.0, 2000.0)
    assert s2.mfu == pytest.approx(6e9 * 4000 / 2e14)

    assert Throughput(flops_per_token=6e9, clock=clock).log_point().mfu is None
    tp.start()
    clock.t += 1.0
    assert tp.log_point().total_tokens == 0


def test_timers_accumulate_per_name():
    clock = FakeClock()
    timers = Timers(clock=clock)
    with timers("data"):
        clock.t += 1.0
    with timers("eval"):
        clock.t += 2.0
        with timers("data"):  # different names may nest
            clock.t += 0.5
    with pytest.raises(ZeroDivisionError), timers("data"):
        clock.t += 1.0
        1 / 0  # noqa: B018 - time up to an exception still counts
    clock.t += 5.5  # untimed work
    assert timers.seconds() == {"data": 2.5, "eval": 2.5}
    assert (timers.total("data"), timers.total("reweight")) == (2.5, 0.0)
    with pytest.raises(RuntimeError, match="already running"), timers("eval"), timers("eval"):
        pass


def test_timers_sync_only_where_asked_and_count_the_wait_at_the_end():
    clock = FakeClock()
    calls = []

    def sync():  # stands for torch.cuda.synchronize: waiting for queued device work takes 3 s
        calls.append(clock.t)
        clock.t += 3.0

    timers = Timers(sync_fn=sync, clock=clock)
    with timers("data"):
        clock.t += 1.0
    assert calls == []
    with timers("eval", sync=True):
        clock.t += 1.0
    # The first sync drains earlier work (not eval's); the second waits for eval's own kernels.
    assert len(calls) == 2
    assert timers.seconds() == {"data": 1.0, "eval": 4.0}


def test_timers_state_survives_a_resume():
    clock = FakeClock()
    timers = Timers(clock=clock)
    with timers("eval"):
        clock.t += 3.0
    clock.t += 7.0
    state = timers.state_dict()

    clock2 = FakeClock(5000.0)
    resumed = Timers(clock=clock2)
    resumed.load_state_dict(state)
    with resumed("eval"):
        clock2.t += 2.0
    assert resumed.seconds() == {"eval": 5.0}


def test_tensorboard_disabled_is_a_no_op(tmp_path):
    with TensorBoardLogger(tmp_path / "tb", enabled=False) as tb:
        tb.scalars("train", {"loss": 1.0}, step=1)
        tb.scalar("x", 2.0, step=1)
        tb.flush()
    assert not (tmp_path / "tb").exists()


def test_tensorboard_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with TensorBoardLogger(tmp_path / "tb", enabled=True) as tb:
        for step in (10, 20):
            record = {
                "loss": torch.tensor(3.0 - step / 100),
                "rule": "velocitune",
                "guarded": [],
                "mfu": None,
                "weights": {"math": np.float64(0.25), "code": 0.75},
            }
            tb.scalars("", record, step=step)
            tb.scalars("velocity", {"math": 0.5}, step=step)
        tb.scalar("lr", 1e-3, step=20)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["loss", "lr", "velocity/math", "weights/code", "weights/math"]
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("loss")] == [(10, 2.9), (20, 2.8)]
    assert [e.value for e in acc.Scalars("weights/math")] == [0.25, 0.25]
    assert [(e.step, e.value) for e in acc.Scalars("velocity/math")] == [(10, 0.5), (20, 0.5)]


def test_tensorboard_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(ConfigError, match=r"pip install 'velocitune\[tensorboard\]'"):
        TensorBoardLogger(tmp_path / "tb", enabled=True)
    TensorBoardLogger(tmp_path / "tb", enabled=False)  # fine when off


def test_flat_scalars_names_as_tensorboard_does():
    record = {"loss": torch.tensor(2.5), "rule": "velocitune", "mfu": None, "flag": True, "guarded": ["a"],
              "weights": {"math": np.float64(0.25), "code": 0.75, "gone": None}}
    assert flat_scalars("train", record) == {"train/loss": 2.5, "train/weights/math": 0.25, "train/weights/code": 0.75}
    assert flat_scalars("", {"lr": 1e-3}) == {"lr": 1e-3}


def test_wandb_disabled_is_a_no_op_and_missing_package_a_config_error(monkeypatch):
    wb = WandbLogger(enabled=False)
    wb.scalars("train", {"loss": 1.0}, step=1)
    wb.summary("final", {"a": 1.0})
    wb.images({"plots/x": ("missing.png", "")}, step=1)
    wb.close()
    assert wb.run_id is None
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` fail
    with pytest.raises(ConfigError, match=r"log.wandb: true.*pip install 'velocitune\[wandb\]', or set log.wandb=false"):
        WandbLogger(enabled=True, run_id=new_wandb_run_id())
    WandbLogger(enabled=False)  # fine when off
    ids = {new_wandb_run_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 12 and i == i.lower() and i.isalnum() for i in ids)


def test_wandb_refusing_to_start_is_a_config_error_saying_what_to_do(monkeypatch, tmp_path):
    wandb = pytest.importorskip("wandb")

    def refuse(**kwargs):
        raise wandb.errors.UsageError("api_key not configured (no-tty)")

    monkeypatch.setattr(wandb, "init", refuse)
    with pytest.raises(ConfigError, match=r"could not start the run \(api_key not configured \(no-tty\)\); run "
                                          r"`wandb login`.*log.wandb_mode=offline"):
        WandbLogger(enabled=True, run_id="abc", local_dir=tmp_path / "w")


def test_format_weights():
    assert format_weights(["code", "math", "prose"], np.array([0.41, 0.2249, 0.3651])) == "code .41 math .22 prose .37"
    assert format_weights(["a", "b", "c"], [1.0, 0.0, 0.004]) == "a 1.00 b .00 c <.01"
    with pytest.raises(ValueError, match="2 names but 3 weights"):
        format_weights(["a", "b"], [0.2, 0.3, 0.5])


