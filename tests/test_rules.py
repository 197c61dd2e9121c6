"""The rule registry (velocitune/rules.py): every rule builds from the config, the old tables' values hold,
typos are refused with the closest name, and a rule registered in one place is accepted everywhere."""

import json

import numpy as np
import pytest

from velocitune import mixing, rules, runfiles, schedule
from velocitune.config import Config, MixingConfig, from_dict, help_text, load_config
from velocitune.errors import ConfigError

NAMES = ["code", "math", "web"]
W0 = np.array([0.5, 0.3, 0.2])
COUNTS = np.array([500.0, 300.0, 200.0])

# The tables the registry replaced, written out literally (config.RULES/RULE_TIMING/pace_default,
# schedule.ADAPTIVE_RULES, before issue 26).
OLD_RULES = ("static", "uniform", "temperature", "velocitune", "velocitune-no-target", "dbl", "odm", "replay")
OLD_ADAPTIVE = ("velocitune", "velocitune-no-target", "dbl", "odm")
OLD_TIMING = {"odm": {"signal": "train", "interval": 1, "warmup": 0.02},
              "dbl": {"signal": "eval", "interval": None, "warmup": 0.0}}
OLD_DEFAULT_TIMING = {"signal": "eval", "interval": None, "warmup": None}
# Issue 27 moved the velocity rules to the train signal on purpose (docs/design.md §3, "The signal").
OLD_TIMING.update({name: {"signal": "train", "interval": None, "warmup": None}
                   for name in ("velocitune", "velocitune-no-target")})


def _replay_dir(tmp_path):
    """A run directory whose mixture.jsonl holds two records (weights held 100 and 300 tokens)."""
    recs = [{"step": 0, "tokens": 0, "sampling_weights": {"code": 0.2, "math": 0.3, "web": 0.5}},
            {"step": 1, "tokens": 100, "sampling_weights": {"code": 0.6, "math": 0.2, "web": 0.2}}]
    full = []
    for r in recs:
        full.append({**r, "signal": "eval", "losses": None,
                     "init": dict(zip(NAMES, [3.0] * 3)), "targets": None, "velocity": None,
                     "weights": r["sampling_weights"], "tokens_per_domain": dict.fromkeys(NAMES, 0), "guarded": []})
    (tmp_path / runfiles.MIXTURE_FILE).write_text("".join(json.dumps(r) + "\n" for r in full))
    return tmp_path


def _build(mc, tmp_path=None):
    src = rules.run_log_input(mc)
    records = runfiles.read_log(src, runfiles.MIXTURE, NAMES) if src is not None else None
    return rules.build_rule(mc, W0, NAMES, COUNTS, records)


def test_the_old_tables_are_what_the_registry_says():
    assert rules.rule_names()[:len(OLD_RULES)] == OLD_RULES  # newer rules (aioli, ...) come after
    assert tuple(n for n in OLD_RULES if rules.is_adaptive(n)) == OLD_ADAPTIVE
    assert rules.rule_names()[len(OLD_RULES):] == ("aioli", "ado") and rules.is_adaptive("ado")  # issue 27
    for name in OLD_RULES:
        assert rules.timing(name) == OLD_TIMING.get(name, OLD_DEFAULT_TIMING), name
        for preset in ("faithful", "robust"):
            old_pace = name in ("velocitune", "velocitune-no-target") and preset == "robust"
            assert rules.pace_default(name, preset) == old_pace, (name, preset)
    assert [n for n in OLD_RULES if rules.spec(n).needs_targets] == ["velocitune", "dbl"]
    assert [n for n in OLD_RULES if rules.spec(n).needs_init] == ["velocitune", "velocitune-no-target"]
    assert rules.MIXTURE_FILE == runfiles.MIXTURE_FILE


@pytest.mark.parametrize("name", OLD_RULES)
def test_every_rule_builds_from_a_default_config_as_before(name, tmp_path):
    """build_rule gives what the old controller.make_rule gave: mixing.make_rule with these parameters."""
    mc = MixingConfig(rule=name, replay_from=str(_replay_dir(tmp_path)) if name == "replay" else None)
    rule = _build(mc)
    assert rule.name == name
    assert rule.needs_targets == rules.spec(name).needs_targets and rule.needs_init == rules.spec(name).needs_init
    old_params = {
        "static": {}, "uniform": {}, "dbl": {}, "odm": {},
        "temperature": {"temperature": 2.0, "token_counts": COUNTS},
        "velocitune": {"preset": "robust"}, "velocitune-no-target": {"preset": "robust"},
        # average of [.2,.3,.5] held 100 tokens (the last record counts for nothing)
        "replay": {"replay_weights": np.array([0.2, 0.3, 0.5])},
    }[name]
    old = mixing.make_rule(name, W0, NAMES, **old_params)
    assert np.array_equal(rule.initial_weights(), old.initial_weights())
    assert rule.state_dict() == old.state_dict()
    for attr in ("eta", "smoothing", "floor", "alpha"):
        assert getattr(rule, attr, None) == getattr(old, attr, None)
    if name == "velocitune":
        assert rule.smoothing == 0.2  # the robust preset, the config's default
    if name == "temperature":  # w ∝ n^(1/2)
        np.testing.assert_allclose(rule.initial_weights(), np.sqrt(COUNTS) / np.sqrt(COUNTS).sum())


def test_shared_keys_reach_adaptive_rules_only():
    """A fixed rule ignores mixing.eta (a sweep may cross static with it); an adaptive rule that does not take
    it refuses it; one that takes it uses it."""
    assert np.array_equal(_build(MixingConfig(rule="static", eta=0.5)).initial_weights(), W0)
    assert _build(MixingConfig(rule="dbl", eta=0.5)).eta == 0.5
    assert _build(MixingConfig(rule="velocitune", preset="faithful", smoothing=0.3)).smoothing == 0.3
    with pytest.raises(ConfigError, match="rule 'odm' has no parameter 'eta'"):
        _build(MixingConfig(rule="odm", eta=0.5))


def test_replay_needs_its_records_and_its_directory(tmp_path):
    mc = MixingConfig(rule="replay", replay_from=str(tmp_path))
    with pytest.raises(ConfigError, match="mixture.jsonl' does not exist"):
        rules.run_log_input(mc)
    with pytest.raises(ConfigError, match="read it first"):
        rules.build_rule(mc, W0, NAMES, COUNTS)
    with pytest.raises(ConfigError, match="'mixing.replay_from' is required by rule 'replay'"):
        from_dict({"mixing": {"rule": "replay"}})


def test_unknown_rule_names_the_closest():
    with pytest.raises(ConfigError, match="unknown mixing rule 'odn'.*Did you mean 'odm'"):
        rules.spec("odn")
    with pytest.raises(ConfigError, match="config key 'mixing.rule' is 'velocitun'.*Did you mean 'velocitune'"):
        load_config(None, ["--mixing.rule=velocitun"])


def test_rule_parameter_typo_names_the_closest_key():
    with pytest.raises(ConfigError, match="mixing.params.alpah.*rule 'odm' has no parameter 'alpah'; did you mean 'alpha'"):
        load_config(None, ["--mixing.rule=odm", "--mixing.params.alpah=0.5"])
    with pytest.raises(ConfigError, match="mixing.params.alpha.*set it as mixing.alpha"):
        load_config(None, ["--mixing.rule=odm", "--mixing.params.alpha=0.5"])
    with pytest.raises(ConfigError, match="rule 'static' has no parameter 'eta'"):
        load_config(None, ["--mixing.rule=static", "--mixing.params.eta=0.5"])


@pytest.mark.parametrize("overrides,label", [
    ([], "velocitune"),
    (["--mixing.preset=faithful"], "velocitune-faithful"),  # faithful does not pace: no -nopace
    (["--mixing.signal=eval"], "velocitune-eval"),  # issue 27: the velocity rules' own signal is train
    (["--mixing.online=false"], "velocitune-fixed"),
    (["--mixing.pace=false"], "velocitune-nopace"),
    (["--mixing.rule=odm"], "odm"),
    (["--mixing.rule=odm", "--mixing.signal=eval"], "odm-eval"),
    (["--mixing.rule=static", "--mixing.pace=true"], "static-pace"),
    (["--mixing.rule=static", "--mixing.signal=train"], "static"),  # a fixed rule has no signal to name
    (["--mixing.rule=dbl", "--mixing.preset=faithful"], "dbl"),  # dbl takes no preset
])
def test_arm_label(overrides, label):
    assert rules.arm_label(load_config(None, overrides).mixing) == label


def test_param_bounds_are_checked_for_mixing_params(monkeypatch):
    """A new rule's parameter with bounds in mixing.PARAM_BOUNDS is checked when the config loads."""
    monkeypatch.setitem(mixing.PARAM_BOUNDS, "gamma", (0.0, 4.0, True, False))
    toy = rules.RuleSpec("toy-bounded", "a toy", (rules.Param("toy-bounded", "gamma", "γ", 1.0),), adaptive=True,
                         build=lambda name, w0, names, gamma=1.0: mixing.Rule(name, w0, names))
    rules.register(toy)
    try:
        with pytest.raises(ConfigError, match=r"mixing.gamma \(rule 'toy-bounded'\) must be in \(0, 4\], got 5"):
            load_config(None, ["--mixing.rule=toy-bounded", "--mixing.params.gamma=5"])
        assert load_config(None, ["--mixing.rule=toy-bounded", "--mixing.params.gamma=4"]).mixing.params == {"gamma": 4}
        assert "gamma = 1.0 in (0, 4]: γ" in help_text()
    finally:
        rules.unregister("toy-bounded")


@pytest.fixture
def toy_rule():
    """A rule with a parameter of its own, registered for one test: w ∝ w0^gamma, updated every 3 steps."""
    spec = rules.RuleSpec(
        "toy", "w ∝ w0^gamma", (rules.Param("toy", "gamma", "the exponent", 1.0),), adaptive=True, interval=3,
        warmup=0.0, signal="train",
        build=lambda name, w0, names, gamma=1.0: mixing.Rule(name, np.asarray(w0) ** gamma, names))
    rules.register(spec)
    yield spec
    rules.unregister("toy")


def test_a_registered_rule_is_accepted_everywhere(toy_rule):
    cfg = load_config(None, ["--mixing.rule=toy", "--mixing.params.gamma=2", "--train.steps=30"])
    assert cfg.mixing.signal == "train" and cfg.mixing.pace is False and cfg.mixing.params == {"gamma": 2.0}
    rule = rules.build_rule(cfg.mixing, W0, NAMES, COUNTS)
    np.testing.assert_allclose(rule.initial_weights(), W0**2 / (W0**2).sum())
    assert schedule.update_interval(cfg.mixing, 30) == 3 and schedule.first_update_setting(cfg.mixing) == 0
    assert rules.arm_label(cfg.mixing) == "toy"
    text = help_text()
    assert "toy: w ∝ w0^gamma [signal train, interval 3, warmup 0.0]" in text
    assert "gamma = 1.0: the exponent" in text
    assert "one of: static, uniform, temperature, velocitune, velocitune-no-target, dbl, odm, replay, aioli, ado, toy" in text
    with pytest.raises(ConfigError, match="did you mean 'gamma'"):
        load_config(None, ["--mixing.rule=toy", "--mixing.params.gama=2"])
    with pytest.raises(ConfigError, match="already registered"):
        rules.register(toy_rule)


def test_unregistered_rule_is_refused_again(toy_rule):
    rules.unregister("toy")
    try:
        with pytest.raises(ConfigError, match="config key 'mixing.rule' is 'toy'"):
            load_config(None, ["--mixing.rule=toy"])
        assert "toy" not in help_text()
    finally:
        rules.register(toy_rule)  # the fixture removes it


def test_defaults_round_trip_with_params(tmp_path):
    from velocitune.config import dump_yaml, to_dict

    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(Config()))
    assert to_dict(load_config(p))["mixing"]["params"] == {}
