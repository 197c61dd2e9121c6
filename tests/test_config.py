"""Config: defaults, YAML + dotted overrides, and the errors a user gets for typos, types and ranges."""

import json

import pytest
import yaml

from velocitune.config import (
    Config,
    MixingConfig,
    dump_yaml,
    from_dict,
    help_text,
    load_config,
    parse_override,
    to_dict,
    valid_keys,
)
from velocitune.errors import ConfigError


def test_defaults_are_valid_and_round_trip_through_yaml(tmp_path):
    cfg = Config()
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(cfg))
    assert to_dict(load_config(p)) == to_dict(cfg)


def test_file_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump({"train": {"lr": 0.01, "steps": 50}, "mixing": {"rule": "static"}}))
    cfg = load_config(p, ["--train.lr=3e-4", "--mixing.rule=dbl", "--mixing.target_values={a: 1.5}"])
    assert cfg.train.lr == pytest.approx(3e-4)
    assert cfg.train.steps == 50
    assert cfg.mixing.rule == "dbl"
    assert cfg.mixing.target_values == {"a": 1.5}


@pytest.mark.parametrize(
    "override, message",
    [
        ("--train.lrr=1", "unknown config key 'train.lrr'. Did you mean 'train.lr'?"),
        ("--trian.lr=1", "Did you mean 'train.lr'?"),
        ("--mixing.intreval=5", "Did you mean 'mixing.interval'?"),
        ("--train.lr=-1", "config key 'train.lr' must be > 0, got -1.0"),
        ("--train.steps=abc", "config key 'train.steps' must be an integer, got 'abc'"),
        ("--train.compile=3", "config key 'train.compile' must be true or false"),
        ("--mixing.rule=dbll", "Did you mean 'dbl'?"),
        ("--mixing.weights={a: 0.5, b: 0.6}", "must sum to 1, they sum to 1.1"),
        ("--mixing.weights={a: -0.5, b: 1.5}", "must be non-negative"),
        ("--data.subsample=0", "config key 'data.subsample' must be in (0, 1]"),
        ("--mixing.rule=replay", "config key 'mixing.replay_from' is required by rule 'replay'"),
        ("train.lr", "must look like --section.key=value"),
        ("--log.wandb_projet=cpt", "unknown config key 'log.wandb_projet'. Did you mean 'log.wandb_project'?"),
        ("--log.wandb_mode=ofline", "config key 'log.wandb_mode' is 'ofline'; allowed: auto, online, offline, disabled. "
                                    "Did you mean 'offline'?"),
        ("--log.wandb_tags=cpt", "config key 'log.wandb_tags' must be a list, got 'cpt'"),
        ("--log.wandb=yes please", "config key 'log.wandb' must be true or false"),
        ("--log.wandb_project=", "config key 'log.wandb_project' must be a string, got None"),
        ("--log.wandb_project='  '", "config key 'log.wandb_project' must name a W&B project"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert message in str(e.value)


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("train:\n  batchsize: 8\n")
    with pytest.raises(ConfigError, match="Did you mean 'train.batch_size'"):
        load_config(p)


def test_missing_and_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_int_accepted_for_float_and_float_for_int_only_when_whole():
    assert from_dict({"train": {"lr": 1}}).train.lr == 1.0
    assert from_dict({"train": {"steps": 10.0}}).train.steps == 10
    with pytest.raises(ConfigError):
        from_dict({"train": {"steps": 10.5}})


def test_parse_override_types():
    assert parse_override("--a.b=1e-3") == ("a.b", 1e-3)
    assert parse_override("--a.b=true") == ("a.b", True)
    assert parse_override("--a.b=null") == ("a.b", None)
    assert parse_override("--a.b=x") == ("a.b", "x")


def test_wandb_keys_parse_from_the_command_line():
    cfg = load_config(None, ["--log.wandb=true", "--log.wandb_project=cpt", "--log.wandb_tags=[a, b]",
                             "--log.wandb_mode=offline", "--log.wandb_entity=team"])
    log = cfg.log
    assert (log.wandb, log.wandb_project, log.wandb_tags, log.wandb_mode, log.wandb_entity, log.wandb_name) == \
        (True, "cpt", ["a", "b"], "offline", "team", None)
    assert "wandb_mode: 'auto'   # one of: auto, online, offline, disabled" in help_text()


def test_help_lists_every_key():
    text = help_text()
    for key in valid_keys():
        assert f"  {key.split('.')[1]}:" in text


def test_resume_check_reads_a_key_missing_from_an_older_config_as_its_default():
    from velocitune.config import check_resume_config

    now = to_dict(Config(mixing=MixingConfig(pace=False)))
    saved = json.loads(json.dumps(now))
    del saved["mixing"]["pace"], saved["mixing"]["warmup"]  # keys added after that checkpoint was written
    check_resume_config(saved, now)  # no error: warmup had its default then, and no run paced before pace
    changed = json.loads(json.dumps(now))
    changed["mixing"]["pace"] = True  # today's default for velocitune: still not what the old run did
    with pytest.raises(ConfigError, match=r"mixing.pace: False -> True"):
        check_resume_config(saved, changed)


@pytest.mark.parametrize(("rule", "preset", "paced"), [
    ("velocitune", "robust", True), ("velocitune-no-target", "robust", True), ("velocitune", "faithful", False),
    ("static", "robust", False), ("uniform", "robust", False), ("odm", "robust", False), ("dbl", "robust", False),
    ("replay", "robust", False), ("temperature", "robust", False)])
def test_pace_defaults_on_for_the_robust_velocity_rules_only(rule, preset, paced):
    """Unset, mixing.pace resolves on construction (so config.yaml records it); set, it is left alone."""
    assert MixingConfig(rule=rule, preset=preset).pace is paced
    assert MixingConfig(rule=rule, preset=preset, pace=not paced).pace is (not paced)
    if rule != "replay":  # (which needs a run to replay)
        assert load_config(None, [f"--mixing.rule={rule}", f"--mixing.preset={preset}"]).mixing.pace is paced


def test_fsdp_cpu_offload_needs_fsdp2():
    assert from_dict({"dist": {"strategy": "fsdp2", "fsdp_cpu_offload": True}}).dist.fsdp_cpu_offload is True
    with pytest.raises(ConfigError, match=r"dist.fsdp_cpu_offload.*needs dist.strategy=fsdp2"):
        from_dict({"dist": {"fsdp_cpu_offload": True}})
