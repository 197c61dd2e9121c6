"""Tests for velocitune.model: loading, building, vocabulary checks, sizes, unwrapping."""

from __future__ import annotations

import pytest
import torch

from velocitune.errors import ConfigError, TrainingError
from velocitune.model import (
    build_model,
    check_vocab,
    load_model,
    load_tokenizer,
    num_params,
)

transformers = pytest.importorskip("transformers")

V, H, L, HEADS, KV, FF = 97, 32, 2, 4, 2, 48


def tiny(tie=True, seed=0):
    return build_model(
        V, H, L, HEADS, intermediate_size=FF, n_kv_heads=KV, tie_embeddings=tie, seed=seed, max_seq_len=64
    )


# ------------------------------------------------------------------------------------------ build


def test_build_model_is_deterministic_and_leaves_global_rng_alone():
    before = torch.get_rng_state()
    a, b, c = tiny(seed=0), tiny(seed=0), tiny(seed=1)
    assert torch.equal(torch.get_rng_state(), before)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.embed_tokens.weight"], sc["model.embed_tokens.weight"])


def test_build_model_sizes_and_defaults():
    m = build_model(V, 96, 3, 6, n_kv_heads=2, tie_embeddings=False, max_seq_len=128)
    cfg = m.config
    assert isinstance(m, transformers.LlamaForCausalLM)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (V, 96, 3)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.max_position_embeddings) == (6, 2, 128)
    assert cfg.intermediate_size == 256  # 8/3 · 96 = 256, already a multiple of 32
    assert build_model(V, 32, 1, 4).config.intermediate_size == 96  # 85.3 rounded up to 96
    assert m.lm_head.weight is not m.model.embed_tokens.weight
    tied = tiny(tie=True)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight


@pytest.mark.parametrize(
    "kwargs",
    [dict(hidden_size=30, n_heads=4), dict(hidden_size=32, n_heads=4, n_kv_heads=3), dict(hidden_size=32, n_heads=0)],
)
def test_build_model_rejects_inconsistent_sizes(kwargs):
    with pytest.raises(ConfigError):
        build_model(V, n_layers=1, **kwargs)


# ------------------------------------------------------------------------------------------ load


def test_save_and_load_round_trip(tmp_path):
    model = tiny(tie=False, seed=3).eval()
    model.save_pretrained(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)
    assert next(loaded.parameters()).dtype == torch.float32
    half = load_model(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}


def test_load_model_errors(tmp_path):
    with pytest.raises(ConfigError, match="local directories only"):
        load_model(tmp_path / "missing")
    with pytest.raises(ConfigError, match="Hub id") as err:
        load_model("HuggingFaceTB/SmolLM2-135M")
    assert "save_pretrained" in str(err.value) and "velocitune[smollm]" in str(err.value)
    (tmp_path / "file.bin").write_bytes(b"x")
    with pytest.raises(ConfigError, match="is a file"):
        load_model(tmp_path / "file.bin")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_model(tmp_path / "empty")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    tiny().config.to_json_file(no_weights / "config.json")
    with pytest.raises(ConfigError, match="could not load"):
        load_model(no_weights)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="could not load"):
        load_model(bad)


@pytest.fixture
def no_hub(monkeypatch):
    """Online settings (HF_HUB_OFFLINE and TRANSFORMERS_OFFLINE unset) with every outgoing connection refused, so a
    load that reached for the Hub would fail with this AssertionError instead of our ConfigError."""
    import socket

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("a model load tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", ["models/base", "HuggingFaceTB/SmolLM2-135M", "base-model", "./models/base"])
def test_a_missing_local_path_is_our_error_never_a_download(name, tmp_path, monkeypatch, no_hub):
    import time

    from velocitune.model import make_model

    monkeypatch.chdir(tmp_path)  # the usage.md Trainer snippet's relative `models/base`, absent here
    for load, what in ((load_model, "model"), (load_tokenizer, "tokenizer")):
        t0 = time.perf_counter()
        with pytest.raises(ConfigError) as err:
            load(name)
        assert time.perf_counter() - t0 < 1.0  # no retries, no time-outs: nothing was attempted
        msg = str(err.value)
        assert msg.startswith(f"{what} path '{name}' does not exist.")
        assert "loads models from local directories only (it never downloads)" in msg
    # The run's own path: make_model loads model.path before it looks at the data.
    cfg = type("Cfg", (), {"model": type("M", (), {"path": name, "attn_implementation": "sdpa"})()})()
    with pytest.raises(ConfigError, match="does not exist"):
        make_model(cfg, data=None)


def save_tiny_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "velocity": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    fast.save_pretrained(path)
    return fast


def test_tokenizer_round_trip_and_errors(tmp_path):
    saved = save_tiny_tokenizer(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    text = "hello velocity world nope"
    assert loaded(text)["input_ids"] == saved(text)["input_ids"] == [1, 3, 2, 0]
    with pytest.raises(ConfigError, match="local directories only"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="tokenizer"):
        load_tokenizer(tmp_path / "empty")


# ------------------------------------------------------------------------------------------ vocab


def test_check_vocab_accepts_fitting_data():
    model = tiny()
    check_vocab(model, V, "abc", "abc", max_token_id=V - 1)
    check_vocab(model, 50)  # a smaller data vocabulary fits too


@pytest.mark.parametrize(
    "args, match",
    [
        (dict(data_vocab_size=V + 1), f"only {V} rows"),
        (dict(data_vocab_size=V, max_token_id=V), f"token id {V}"),
        (dict(data_vocab_size=V, tokenizer_hash_model="aaa", tokenizer_hash_data="bbb"), "different tokenizer"),
    ],
)
def test_check_vocab_errors(args, match):
    with pytest.raises(TrainingError, match=match) as err:
        check_vocab(tiny(tie=False), **args)
    assert "velocitune prepare" in str(err.value)


def test_check_vocab_uses_the_smaller_of_embedding_and_head():
    model = tiny(tie=False)
    model.lm_head = torch.nn.Linear(H, V - 10, bias=False)  # a head narrower than the embedding
    with pytest.raises(TrainingError, match=f"only {V - 10} rows"):
        check_vocab(model, V)


# ------------------------------------------------------------------------------------------ sizes


def llama_layer_params(h=H, ff=FF, heads=HEADS, kv=KV):
    head_dim = h // heads
    attention = h * h + 2 * h * (kv * head_dim) + h * h  # q, k, v, o (no biases)
    mlp = 3 * h * ff  # gate, up, down
    norms = 2 * h
    return attention + mlp + norms


def test_num_params_hand_count_llama():
    body = L * llama_layer_params() + H  # layers + final norm
    table = V * H
    tied, untied = tiny(tie=True), tiny(tie=False)
    assert num_params(tied) == body + table
    assert num_params(untied) == body + 2 * table
    # the head is a matmul and stays in the non-embedding count, tied or not
    assert num_params(tied, exclude_embeddings=True) == body + table
    assert num_params(untied, exclude_embeddings=True) == body + table


def test_num_params_hand_count_gpt2_excludes_position_table():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=V, n_positions=64)
    model = transformers.GPT2LMHeadModel(cfg)
    layer = 2 * 2 * 32 + (32 * 96 + 96) + (32 * 32 + 32) + (32 * 128 + 128) + (128 * 32 + 32)  # lns, attn, mlp
    body = 2 * layer + 2 * 32  # + ln_f
    assert num_params(model) == body + V * 32 + 64 * 32
    assert num_params(model, exclude_embeddings=True) == body + V * 32  # wpe out, tied wte/head in


# ------------------------------------------------------------------------------------------ SmolLM
