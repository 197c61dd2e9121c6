"""LR schedules, step budgets, warm-up and the update interval: the steps every path of a run agrees on."""

from __future__ import annotations

import numpy as np
import pytest

from velocitune.errors import ConfigError, DataError
from velocitune.schedule import (
    as_steps,
    default_interval,
    first_update_setting,
    is_update_step,
    lr_at,
    lr_schedule,
    main_run_steps,
    resolve_steps,
    step_lr,
    subsampled_windows,
    update_interval,
    warmup_steps,
)


def mixing_interval(cfg, steps: int) -> int:
    return update_interval(cfg.mixing, steps)


def mixing_warmup(cfg, steps: int) -> int:
    """Steps before the first update, as the controller resolves them: the setting, else the LR warm-up."""
    setting = first_update_setting(cfg.mixing)
    return warmup_steps(cfg, steps) if setting is None else as_steps(setting, steps)


def test_lr_schedules():
    peak, steps, warm = 1e-3, 100, 10
    assert lr_at(0, peak, steps, warm, "cosine", 0.1, 0.2) == pytest.approx(1e-4)
    assert lr_at(9, peak, steps, warm, "cosine", 0.1, 0.2) == pytest.approx(1e-3)
    assert lr_at(99, peak, steps, warm, "cosine", 0.1, 0.2) == pytest.approx(1e-4)
    mid = lr_at(54, peak, steps, warm, "cosine", 0.1, 0.2)
    assert mid == pytest.approx(1e-4 + 0.9e-3 * 0.5 * (1 + np.cos(np.pi * 45 / 90)))
    assert lr_at(79, peak, steps, warm, "wsd", 0.1, 0.2) == pytest.approx(1e-3)
    assert lr_at(99, peak, steps, warm, "wsd", 0.1, 0.2) == pytest.approx(1e-4)
    assert lr_at(89, peak, steps, warm, "wsd", 0.1, 0.2) == pytest.approx(1e-3 - 0.9e-3 * 10 / 20)
    assert lr_at(99, peak, steps, warm, "constant", 0.1, 0.2) == pytest.approx(1e-3)


def test_lr_schedule_is_lr_at_of_every_step(make_config):
    cfg = make_config(train={"steps": 50, "warmup_steps": 0.1, "schedule": "wsd", "lr": 2e-3})
    lrs = lr_schedule(cfg, 50)
    assert warmup_steps(cfg, 50) == 5
    assert lrs.shape == (50,) and lrs.dtype == np.float64
    assert lrs.tolist() == [lr_at(s, 2e-3, 50, 5, "wsd", 0.1, 0.2) for s in range(50)]
    assert lrs.tolist() == [step_lr(cfg, s, 50) for s in range(50)]


def test_warmup_is_a_fraction_below_one_and_steps_from_one(make_config):
    assert warmup_steps(make_config(train={"warmup_steps": 0.05}), 400) == 20
    assert warmup_steps(make_config(train={"warmup_steps": 7}), 400) == 7
    assert warmup_steps(make_config(train={"warmup_steps": 0}), 400) == 0


def test_budget_from_steps_tokens_or_one_epoch(make_config):
    # 8 sequences of 32 tokens per step
    assert resolve_steps(make_config(train={"steps": 13}), [100, 100]) == 13
    assert resolve_steps(make_config(train={"steps": None, "tokens": 2561}), [100]) == 11  # ceil(2561 / 256)
    assert resolve_steps(make_config(train={"steps": None}), [30, 20, 7]) == 57 // 8
    with pytest.raises(DataError, match="fewer than one global batch of 8"):
        resolve_steps(make_config(train={"steps": None}), [3, 4])
    assert subsampled_windows([100, 3, 1], 0.1) == [10, 1, 1]  # at least one window per domain


def test_main_run_steps_applies_the_subsample_to_the_prepared_windows(make_config):
    """One epoch of what data.subsample keeps, not of the prepared windows; train.steps / train.tokens win."""
    windows = [400, 250, 3]  # as prepared
    cfg = make_config(train={"steps": None}, data={"subsample": 0.25})
    assert main_run_steps(cfg, windows) == (100 + 63 + 1) // 8  # ceil(w × 0.25) each, one epoch of batches of 8
    assert main_run_steps(cfg, windows) != resolve_steps(cfg, windows)  # the raw windows would give 81
    assert main_run_steps(make_config(train={"steps": None}), windows) == 653 // 8  # no subsample: the raw epoch
    assert main_run_steps(make_config(train={"steps": 13}, data={"subsample": 0.25}), windows) == 13
    tokens = make_config(train={"steps": None, "tokens": 2561}, data={"subsample": 0.25})
    assert main_run_steps(tokens, windows) == 11


def test_interval_default_and_guard(make_config):
    assert default_interval(None, 400) == 4 and default_interval(None, 50) == 1 and default_interval(7, 400) == 7
    assert mixing_interval(make_config(mixing={"interval": None}), 400) == 4
    with pytest.raises(ConfigError, match="'mixing.interval' is 30 but the run has only 30 steps"):
        mixing_interval(make_config(mixing={"interval": 30}), 30)
    # A rule whose weights never move needs no update inside the run.
    assert mixing_interval(make_config(mixing={"interval": 30, "rule": "static"}), 30) == 30


def test_rules_update_when_their_authors_did(make_config):
    """odm: every step on the training loss after 2 % of the run; dbl: at every m from the start; the
    velocity rules after the LR warm-up. Explicit keys override each default."""
    odm = make_config(mixing={"rule": "odm", "interval": None, "signal": "auto"})
    assert odm.mixing.signal == "train"  # "auto" resolved when the config is read, so config.yaml records it
    assert mixing_interval(odm, 1000) == 1 and mixing_warmup(odm, 1000) == 20
    dbl = make_config(mixing={"rule": "dbl", "interval": None})
    assert dbl.mixing.signal == "eval" and mixing_interval(dbl, 1000) == 10 and mixing_warmup(dbl, 1000) == 0
    vt = make_config(mixing={"interval": None, "signal": "auto"}, train={"warmup_steps": 0.05})
    assert vt.mixing.signal == "train" and mixing_interval(vt, 1000) == 10 and mixing_warmup(vt, 1000) == 50
    own = make_config(mixing={"rule": "odm", "signal": "eval", "interval": 5, "warmup": 7})
    assert own.mixing.signal == "eval" and mixing_interval(own, 1000) == 5 and mixing_warmup(own, 1000) == 7
    assert mixing_warmup(make_config(mixing={"warmup": 0.1}), 1000) == 100
    with pytest.raises(ConfigError, match="mixing.warmup"):
        make_config(mixing={"warmup": -1})
    with pytest.raises(ConfigError, match="allowed: auto, eval, train"):
        make_config(mixing={"signal": "trian"})


def test_update_steps_start_after_warmup_and_never_at_zero():
    assert [t for t in range(0, 20) if is_update_step(t, 3, 4)] == [3, 7, 11, 15, 19]
    assert [t for t in range(0, 10) if is_update_step(t, 0, 3)] == [3, 6, 9]
