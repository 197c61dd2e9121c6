"""Tests for velocitune.metrics: JSON-lines logs and resume, atomic files, throughput/MFU, timers, TensorBoard."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import torch

from velocitune import metrics
from velocitune.errors import ConfigError, DataError
from velocitune.metrics import (
    JsonlWriter,
    TensorBoardLogger,
    Throughput,
    Timers,
    atomic_write_json,
    atomic_write_text,
    format_weights,
    peak_flops_for_device,
    read_jsonl,
    transformer_flops_per_token,
    truncate_after,
)


class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def _record(step: int) -> dict:
    # The kind of values a training loop logs: numpy and torch scalars, a per-domain dict.
    return {
        "step": step,
        "tokens": np.int64(step * 2048),
        "loss": torch.tensor(3.0 - 0.01 * step),
        "lr": np.float32(1e-3),
        "domain_loss": {"math": np.float64(2.5), "code": torch.tensor([1.25])},
        "weights": np.array([0.25, 0.75]),
    }


# --------------------------------------------------------------------------------------------------
# JSON lines


def test_writer_converts_scalars_and_flushes_each_record(tmp_path):
    path = tmp_path / "sub" / "metrics.jsonl"
    with JsonlWriter(path) as w:
        w.write(_record(1))
        # Flushed without closing: another reader sees the record now.
        lines = path.read_text().splitlines()
        assert len(lines) == 1
        w.write(_record(2))
        w.sync()
    recs = read_jsonl(path)
    assert recs[0] == {
        "step": 1,
        "tokens": 2048,
        "loss": pytest.approx(2.99, abs=1e-6),
        "lr": float(np.float32(1e-3)),
        "domain_loss": {"math": 2.5, "code": [1.25]},
        "weights": [0.25, 0.75],
    }
    assert [r["step"] for r in recs] == [1, 2]
    assert type(recs[0]["tokens"]) is int


def test_writer_rejects_unknown_types(tmp_path):
    with JsonlWriter(tmp_path / "m.jsonl") as w, pytest.raises(TypeError, match="object"):
        w.write({"step": 1, "x": object()})


def test_resume_truncates_to_the_checkpoint_and_matches_an_uninterrupted_run(tmp_path):
    uninterrupted = tmp_path / "a.jsonl"
    with JsonlWriter(uninterrupted) as w:
        for step in range(1, 13):
            w.write(_record(step))

    # The crashed run logged steps 1..9 after its last checkpoint at step 6, and died mid-line.
    resumed = tmp_path / "b.jsonl"
    with JsonlWriter(resumed) as w:
        for step in range(1, 10):
            w.write(_record(step))
    with open(resumed, "a") as f:
        f.write(json.dumps({"step": 10, "loss": 2.9})[:11])

    with pytest.warns(UserWarning, match=r"b\.jsonl: dropped a partial last line \(line 10"):
        assert truncate_after(resumed, 6) == 3
    with JsonlWriter(resumed) as w:
        for step in range(7, 13):
            w.write(_record(step))
    assert resumed.read_bytes() == uninterrupted.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl"]  # no temp files left


def test_truncate_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    with JsonlWriter(path) as w:
        for step in range(5):
            w.write({"step": step})
    before = path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="simulated"):
        truncate_after(path, 2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.jsonl"]


def test_truncate_edge_cases(tmp_path):
    assert truncate_after(tmp_path / "missing.jsonl", 3) == 0
    assert not (tmp_path / "missing.jsonl").exists()
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n')
    mtime = path.stat().st_mtime_ns
    assert truncate_after(path, 5) == 0
    assert path.stat().st_mtime_ns == mtime  # nothing to drop: the file is not rewritten
    path.write_text('{"step": 1}\n{"loss": 2}\n')
    with pytest.raises(DataError, match=r"line 2: the record has no numeric 'step'"):
        truncate_after(path, 5)


def test_read_jsonl_errors_and_tails(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "loss": \n{"step": 3}\n')
    with pytest.raises(DataError, match=r"m\.jsonl, line 2: not valid JSON"):
        read_jsonl(path)

    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(DataError, match=r"line 2: expected a JSON object per line, got list"):
        read_jsonl(path)

    path.write_text('{"step": 1}\n\n{"step": 2}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="partial last line"):
        assert read_jsonl(path) == [{"step": 1}, {"step": 2}]

    # A complete record that only lacks its newline is kept (and the writer adds the newline).
    path.write_text('{"step": 1}\n{"step": 2}')
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]
    with JsonlWriter(path) as w:
        w.write({"step": 3})
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'


def test_writer_drops_a_partial_tail_before_appending(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="partial last line"):
        w = JsonlWriter(path)
    w.write({"step": 2})
    w.close()
    assert read_jsonl(path) == [{"step": 1}, {"step": 2}]


# --------------------------------------------------------------------------------------------------
# Atomic files


def test_atomic_writes(tmp_path):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"loss": np.float32(0.5), "steps": np.int64(3), "w": np.array([1, 2])})
    assert json.loads(path.read_text()) == {"loss": 0.5, "steps": 3, "w": [1, 2]}
    assert path.read_text().endswith("\n")
    atomic_write_text(path, "replaced")
    assert path.read_text() == "replaced"
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]


def test_failed_atomic_write_leaves_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "old: 1\n")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        atomic_write_text(path, "new: 2\n")
    assert path.read_text() == "old: 1\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# --------------------------------------------------------------------------------------------------
# Throughput


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


def test_flops_per_token_matches_torch_flop_counter():
    """The 6N + 12·L·d·T formula against torch's own FLOP count of a small attention + MLP stack."""
    from torch.utils.flop_counter import FlopCounterMode

    d, seq, n_layers, heads = 16, 12, 2, 2

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
            self.out = torch.nn.Linear(d, d, bias=False)
            self.up = torch.nn.Linear(d, 4 * d, bias=False)
            self.down = torch.nn.Linear(4 * d, d, bias=False)

        def forward(self, x):  # x: (B, T, d)
            q, k, v = self.qkv(x).view(1, seq, 3, heads, d // heads).permute(2, 0, 3, 1, 4)  # (B, H, T, d/H)
            att = torch.softmax(q @ k.transpose(-1, -2) / (d // heads) ** 0.5, dim=-1) @ v
            x = x + self.out(att.transpose(1, 2).reshape(1, seq, d))
            return x + self.down(torch.relu(self.up(x)))

    model = torch.nn.Sequential(*[Block() for _ in range(n_layers)])
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(1, seq, d, requires_grad=True)  # so the first layer's input gradient counts too
    with FlopCounterMode(display=False) as counter:
        model(x).sum().backward()
    measured = counter.get_total_flops() / seq
    assert transformer_flops_per_token(n_params, n_layers, d, seq) == pytest.approx(measured, rel=1e-12)


def test_peak_flops_lookup_prefers_the_specific_name():
    assert peak_flops_for_device("NVIDIA H100 PCIe") == 756e12
    assert peak_flops_for_device("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops_for_device("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops_for_device("Tesla T4") is None


# --------------------------------------------------------------------------------------------------
# Timers


def test_timers_accumulate_and_share_wall_time():
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
    assert timers.shares() == {"data": 0.25, "eval": 0.25}
    assert timers.as_metrics() == {"time_data_s": 2.5, "time_eval_s": 2.5}
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
    assert resumed.wall_s() == 12.0
    assert resumed.shares() == {"eval": pytest.approx(5.0 / 12.0)}


# --------------------------------------------------------------------------------------------------
# TensorBoard and display


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


def test_format_weights():
    assert format_weights(["code", "math", "prose"], np.array([0.41, 0.2249, 0.3651])) == "code .41 math .22 prose .37"
    assert format_weights(["a", "b", "c"], [1.0, 0.0, 0.004]) == "a 1.00 b .00 c <.01"
    with pytest.raises(ValueError, match="2 names but 3 weights"):
        format_weights(["a", "b"], [0.2, 0.3, 0.5])


def test_json_default_conversions():
    assert metrics.json_default(torch.tensor(2)) == 2
    assert metrics.json_default(np.bool_(True)) is True
    with pytest.raises(TypeError, match="set"):
        metrics.json_default({1})
