"""Validation loss per domain: the fixed val windows, token-weighted, equal to the model's own loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from velocitune.dist import DistEnv
from velocitune.errors import DataError
from velocitune.evaluate import evaluate, load_val_set
from velocitune.model import build_model
from velocitune.shards import PreparedData


def test_val_set_takes_the_first_whole_windows_up_to_the_cap(tiny_prepared):
    data = PreparedData(tiny_prepared)
    val = load_val_set(data, seq_len=32, max_tokens=96)
    for name, win in zip(val.names, val.windows):
        n = min(data.val(name).n_windows(32), 3)
        assert win.shape == (n, 33)
        np.testing.assert_array_equal(win, data.val(name).windows(np.arange(n), 32))
    assert val.tokens.tolist() == [w.shape[0] * 32 for w in val.windows]


def test_evaluate_is_the_token_weighted_mean_of_the_models_own_loss(tiny_prepared):
    data = PreparedData(tiny_prepared)
    val = load_val_set(data, seq_len=32, max_tokens=256)
    model = build_model(vocab_size=data.vocab_size, hidden_size=32, n_layers=2, n_heads=2, intermediate_size=64,
                        max_seq_len=64, seed=3)
    losses = evaluate(model, val, DistEnv(), batch_size=3)
    for d, win in enumerate(val.windows):
        x = torch.from_numpy(win)
        with torch.no_grad():
            # HF's loss over the L+1 window predicts tokens 1..L: the same targets, averaged per token.
            ref = model(input_ids=x, labels=x).loss.item()
        assert losses[d] == pytest.approx(ref, rel=1e-5)
    assert model.training  # evaluate restores the mode it found


def test_too_small_val_split_is_a_clear_error(tiny_prepared):
    with pytest.raises(DataError, match="fewer than one window of data.seq_len \\+ 1"):
        load_val_set(PreparedData(tiny_prepared), seq_len=100_000, max_tokens=256)
