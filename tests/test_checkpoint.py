"""Tests for velocitune.checkpoint: round trips, retention, damage detection, a full disk, RNG, and that a
checkpoint is data: nothing in one can run code when it is loaded."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from velocitune import checkpoint as ck
from velocitune.checkpoint import (
    CheckpointWarning,
    list_checkpoints,
    load_checkpoint,
    load_latest,
    read_meta,
    rng_state,
    save_checkpoint,
    set_rng_state,
    verify_checkpoint,
)
from velocitune.errors import CheckpointError, ConfigError

REPO = Path(__file__).resolve().parents[1]


def _train_state(seed: int = 0, steps: int = 2):
    """A tiny model + AdamW after `steps` updates, so the optimizer has exp_avg/exp_avg_sq/step state."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        _step(model, opt)
    return model, opt


def _step(model, opt, seed: int = 123):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(5, 4, generator=g)
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    opt.step()


def _state(step: int, model=None, opt=None) -> dict:
    if model is None:
        model, opt = _train_state()
    return {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "sampler": {"seed": 7, "schedule": [(0, [0.5, 0.3, 0.2]), (30, [0.51, 0.19, 0.30])]},
        "arrays": {"counts": torch.arange(6, dtype=torch.int64) * 3, "w": torch.tensor([0.1, 0.9], dtype=torch.float32)},
        "rng": rng_state(),
        "step": step,
        "config": {"train": {"steps": 100, "lr": 1e-3}, "mixing": {"rule": "velocitune"}},
    }


def _assert_same_tree(a, b):
    """Bit-identical comparison of nested containers of tensors/arrays/scalars."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same_tree(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same_tree(x, y)
    else:
        assert a == b


def _steps(root: Path) -> list[int]:
    return [int(p.name.split("_")[1]) for p in list_checkpoints(root)]


# --------------------------------------------------------------------------------------------------
# Round trip


def test_round_trip_is_bit_identical_and_resumes_training_exactly(tmp_path):
    model, opt = _train_state()
    state = _state(5, model, opt)
    path = save_checkpoint(tmp_path / "ckpt", 5, state, meta={"arm": "velocitune"})
    assert path == tmp_path / "ckpt" / "step_00000005"

    step, loaded = load_checkpoint(path)
    assert step == 5
    _assert_same_tree(state, loaded)

    # Continuing from the loaded copy must give the same parameters as continuing the original.
    model2 = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optimizer"])
    for _ in range(3):
        _step(model, opt)
        _step(model2, opt2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)


def test_checksums_and_meta_match_an_independent_computation(tmp_path):
    state = _state(12)
    path = save_checkpoint(tmp_path, 12, state, meta={"arm": "static"})
    checksums = json.loads((path / "checksums.json").read_text())["files"]
    assert set(checksums) == {
        "model.pt",
        "optimizer.pt",
        "sampler.json",
        "arrays.pt",
        "rng.pt",
        "step.json",
        "config.json",
        "meta.json",
    }
    for name, entry in checksums.items():
        data = (path / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    meta = read_meta(path)
    assert meta["step"] == 12 and meta["arm"] == "static" and meta["format"] == "velocitune-checkpoint"
    expected_hash = hashlib.sha256(json.dumps(state["config"], sort_keys=True).encode()).hexdigest()
    assert meta["config_hash"] == expected_hash
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_every_part_loads_without_the_full_unpickler(tmp_path):
    """Plain values are JSON; every torch file loads with weights_only=True (tensors, optimizer, RNG)."""
    path = save_checkpoint(tmp_path, 1, _state(1))
    for name in ("model.pt", "optimizer.pt", "rng.pt", "arrays.pt"):
        torch.load(path / name, weights_only=True)
    assert json.loads((path / "sampler.json").read_text()) == {"seed": 7, "schedule": [[0, [0.5, 0.3, 0.2]],
                                                                                      [30, [0.51, 0.19, 0.30]]]}
    assert json.loads((path / "step.json").read_text()) == 1
    assert read_meta(path)["version"] == 2


class _Payload:
    """What an attacker would put in a shared checkpoint: unpickling it runs code (here, it writes a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def _replace_part(path: Path, name: str, obj) -> None:
    """Swap in a part and re-sign the checkpoint, as someone crafting the whole directory could."""
    with open(path / name, "wb") as f:
        pickle.dump(obj, f) if name.endswith(".pkl") else torch.save(obj, f)
    sums = json.loads((path / "checksums.json").read_text())
    data = (path / name).read_bytes()
    sums["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "checksums.json").write_text(json.dumps(sums))


def test_a_checkpoint_holding_a_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    path = save_checkpoint(tmp_path / "ckpt", 3, _state(3))
    marker = tmp_path / "pwned.txt"
    _replace_part(path, "rng.pt", {"torch": _Payload(marker)})
    verify_checkpoint(path)  # checksums match: integrity checks alone cannot tell
    with pytest.raises(CheckpointError, match=r"refused to load .*rng\.pt: it holds Python objects other than "
                                              r"tensors and plain values.*would run code.*it names GLOBAL "):
        load_checkpoint(path)
    assert not marker.exists()
    # load_latest falls back to nothing: the only checkpoint is refused, never half-loaded.
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints"), \
            pytest.warns(CheckpointWarning, match="refused to load"):
        load_latest(tmp_path / "ckpt")
    assert not marker.exists()


def test_a_format_1_checkpoint_with_numpy_arrays_says_how_to_proceed(tmp_path):
    path = save_checkpoint(tmp_path, 4, {"x": torch.tensor([1.0])})
    _replace_part(path, "x.pt", {"init": np.array([1.0, 2.0])})  # how velocitune 0.1 stored ℓ_init
    meta = json.loads((path / "meta.json").read_text())
    meta["version"] = 1
    (path / "meta.json").write_text(json.dumps(meta))
    _replace_part_checksum_only(path, "meta.json")
    with pytest.raises(CheckpointError, match=r"written by velocitune 0\.1 \(checkpoint format 1\).*start it over"):
        load_checkpoint(path)


def _replace_part_checksum_only(path: Path, name: str) -> None:
    sums = json.loads((path / "checksums.json").read_text())
    data = (path / name).read_bytes()
    sums["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    (path / "checksums.json").write_text(json.dumps(sums))


def test_same_step_is_replaced(tmp_path):
    save_checkpoint(tmp_path, 10, {"x": torch.tensor([1.0])})
    save_checkpoint(tmp_path, 10, {"x": torch.tensor([2.0])})
    assert _steps(tmp_path) == [10]
    assert torch.equal(load_latest(tmp_path)[1]["x"], torch.tensor([2.0]))
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000010"]


def test_bad_arguments(tmp_path):
    with pytest.raises(ConfigError, match="keep"):
        save_checkpoint(tmp_path, 1, {"x": 1}, keep=0)
    with pytest.raises(ValueError, match="file name"):
        save_checkpoint(tmp_path, 1, {"../x": 1})
    with pytest.raises(ValueError, match="reserved"):
        save_checkpoint(tmp_path, 1, {"x": 1}, meta={"step": 3})
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "step_00000001")


# --------------------------------------------------------------------------------------------------
# Retention


@pytest.mark.parametrize("keep", [1, 3])
def test_keeps_the_newest_k(tmp_path, keep):
    for step in (10, 20, 30, 40, 50):
        save_checkpoint(tmp_path, step, {"step": step}, keep=keep)
        assert _steps(tmp_path)[-1] == step
    assert _steps(tmp_path) == [10, 20, 30, 40, 50][-keep:]


def test_damaged_checkpoints_do_not_count_towards_keep(tmp_path):
    for step in (10, 20):
        save_checkpoint(tmp_path, step, {"step": step}, keep=2)
    (tmp_path / "step_00000020" / "checksums.json").unlink()
    with pytest.warns(CheckpointWarning, match="step_00000020.*checksums.json is missing"):
        save_checkpoint(tmp_path, 30, {"step": 30}, keep=2)
    assert _steps(tmp_path) == [10, 30]


def test_checkpoints_after_the_resume_point_are_removed(tmp_path):
    for step in (100, 200):
        save_checkpoint(tmp_path, step, {"step": step})
    with pytest.warns(CheckpointWarning, match="step_00000200"):
        save_checkpoint(tmp_path, 150, {"step": 150})
    assert _steps(tmp_path) == [100, 150]
    assert load_latest(tmp_path)[0] == 150


# --------------------------------------------------------------------------------------------------
# Damage


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 7])


@pytest.mark.parametrize(
    "damage, filename, pattern",
    [
        (_flip_byte, "model.pt", r"model\.pt has sha256 .* \(corrupted\)"),
        (_flip_byte, "meta.json", r"meta\.json has sha256"),
        (_truncate, "optimizer.pt", r"optimizer\.pt is \d+ bytes, expected \d+"),
        (lambda p: p.unlink(), "checksums.json", r"checksums\.json is missing"),
        (lambda p: p.unlink(), "rng.pt", r"rng\.pt is missing"),
    ],
)
def test_damaged_newest_falls_back_to_previous(tmp_path, damage, filename, pattern):
    first = _state(100)
    save_checkpoint(tmp_path, 100, first)
    save_checkpoint(tmp_path, 200, _state(200))
    damage(tmp_path / "step_00000200" / filename)

    with pytest.warns(CheckpointWarning, match=r"step_00000200 is damaged: " + pattern) as record:
        step, state = load_latest(tmp_path)
    assert step == 100
    _assert_same_tree(first, state)
    assert len(record) == 1
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(tmp_path / "step_00000200")


def test_truncation_message_gives_sizes(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"x": torch.arange(100)})
    size = (path / "x.pt").stat().st_size
    _truncate(path / "x.pt")
    with pytest.raises(CheckpointError, match=rf"x\.pt is {size - 7} bytes, expected {size}"):
        verify_checkpoint(path)


def test_leftover_temp_dir_from_a_crash_is_ignored_then_removed(tmp_path):
    save_checkpoint(tmp_path, 100, {"step": 100})
    # What a crash during the write of step 200 leaves: a temp dir with some parts and no checksums.
    # pid 99999999 is above any pid_max, so no live process owns it.
    crashed = tmp_path / ".tmp-step_00000200-99999999"
    crashed.mkdir()
    (crashed / "model.pt").write_bytes(b"\x00" * 50)
    with pytest.warns(CheckpointWarning, match=r"\.tmp-step_00000200-99999999"):
        step, state = load_latest(tmp_path)
    assert (step, state) == (100, {"step": 100})

    save_checkpoint(tmp_path, 200, {"step": 200})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000100", "step_00000200"]


def test_temp_dir_of_a_live_process_is_not_removed(tmp_path):
    alive = tmp_path / f".tmp-step_00000300-{os.getppid()}"
    alive.mkdir()
    save_checkpoint(tmp_path, 100, {"step": 100})
    assert alive.exists()


def test_no_valid_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    assert load_latest(tmp_path / "missing") is None
    assert load_latest(tmp_path) is None
    save_checkpoint(tmp_path, 100, {"step": 100})
    (tmp_path / "step_00000100" / "meta.json").write_text("{}")
    with pytest.warns(CheckpointWarning), pytest.raises(CheckpointError, match="none of the 1 checkpoints"):
        load_latest(tmp_path)


# --------------------------------------------------------------------------------------------------
# Full disk


class _FailingFile:
    """A file wrapper that accepts `budget` bytes then fails like a full disk."""

    def __init__(self, f, budget: int):
        self._f, self._left = f, budget

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._left:
            self._f.write(bytes(memoryview(data).cast("B")[: self._left]))
            self._left = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._left -= n
        return self._f.write(data)

    def flush(self) -> None:
        self._f.flush()


def _fill_disk_in_torch_save(monkeypatch):
    # The real torch.save, on a file that fills up: torch wraps the OSError in a RuntimeError.
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(obj)
        if len(calls) == 2:
            return real_save(obj, _FailingFile(f, 300), *args, **kwargs)
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


def _fill_disk_in_write_part(monkeypatch):
    def write_part(path, obj):
        path.write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "_write_part", write_part)


def _fill_disk_in_checksums(monkeypatch):
    real = ck.write_synced

    def write_synced(path, data):
        if path.name == "checksums.json":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(ck, "write_synced", write_synced)


@pytest.mark.parametrize("fill", [_fill_disk_in_torch_save, _fill_disk_in_write_part, _fill_disk_in_checksums])
def test_full_disk_keeps_previous_checkpoints(tmp_path, monkeypatch, fill):
    first = _state(100)
    save_checkpoint(tmp_path, 100, first, keep=1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "step_00000100").iterdir()}

    fill(monkeypatch)
    with pytest.raises(CheckpointError, match=r"disk is full.*previous checkpoint at step 100 .* is intact"):
        save_checkpoint(tmp_path, 200, _state(200), keep=1)
    monkeypatch.undo()

    assert [p.name for p in tmp_path.iterdir()] == ["step_00000100"]  # temp dir removed, nothing pruned
    assert {p.name: p.read_bytes() for p in (tmp_path / "step_00000100").iterdir()} == before
    step, state = load_latest(tmp_path)
    assert step == 100
    _assert_same_tree(first, state)


def test_full_disk_on_first_checkpoint_says_there_is_none(tmp_path, monkeypatch):
    _fill_disk_in_write_part(monkeypatch)
    with pytest.raises(CheckpointError, match="no earlier checkpoint"):
        save_checkpoint(tmp_path, 1, {"x": 1})
    assert list(tmp_path.iterdir()) == []


def test_other_errors_propagate_and_clean_up(tmp_path):
    with pytest.raises(Exception) as info:
        save_checkpoint(tmp_path, 1, {"fn": lambda: 0})  # a lambda cannot be pickled
    assert not isinstance(info.value, CheckpointError)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------------
# RNG


def _draw():
    return (
        [random.random() for _ in range(3)],
        np.random.rand(3).tolist(),
        np.random.randn(),  # exercises numpy's cached second Gaussian
        torch.rand(3),
        torch.randn(2),
    )


def _assert_same_draws(a, b):
    assert a[0] == b[0] and a[1] == b[1] and a[2] == b[2]
    assert torch.equal(a[3], b[3]) and torch.equal(a[4], b[4])


def test_rng_round_trip():
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    np.random.randn()  # leave one cached Gaussian in numpy's state
    state = rng_state()
    first = _draw()
    _draw()
    set_rng_state(state)
    _assert_same_draws(first, _draw())


def test_rng_round_trip_through_a_checkpoint(tmp_path):
    random.seed(4)
    np.random.seed(5)
    torch.manual_seed(6)
    save_checkpoint(tmp_path, 1, {"rng": rng_state()})
    first = _draw()
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    set_rng_state(load_latest(tmp_path)[1]["rng"])
    _assert_same_draws(first, _draw())


def test_cuda_state_without_cuda_warns(monkeypatch):
    state = rng_state()
    state["cuda"] = [torch.get_rng_state()]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(CheckpointWarning, match="CUDA is not available"):
        set_rng_state(state)


@pytest.mark.gpu
def test_cuda_rng_round_trip_through_a_checkpoint(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.cuda.manual_seed_all(8)
    save_checkpoint(tmp_path, 1, {"rng": rng_state()})
    first = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(0)
    set_rng_state(load_latest(tmp_path)[1]["rng"])
    assert torch.equal(first, torch.rand(4, device="cuda"))
