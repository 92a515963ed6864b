"""Typed configuration: defaults, files, overrides and errors that name the field."""

from __future__ import annotations

import json

import pytest

from twostream.core.config import ConfigError, load_config


def test_defaults_match_the_paper():
    cfg = load_config()
    assert (cfg.thresholds.p1, cfg.thresholds.p2) == (0.10, 0.20)
    r = cfg.reputation
    assert (r.threshold, r.cap, r.step_up, r.step_down) == (3, 15, 1, 1)


def test_yaml_and_json_files_with_overrides(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("thresholds:\n  p1: 0.3\nhigh:\n  model: inception_v3\n  weights: pretrained\n")
    cfg = load_config(yml, ["low.batch_size=64", "thresholds.p2=0.25"])
    assert cfg.thresholds.p1 == 0.3 and cfg.thresholds.p2 == 0.25
    assert cfg.high.model == "inception_v3" and cfg.low.batch_size == 64
    js = tmp_path / "c.json"
    js.write_text(json.dumps({"reputation": {"cap": 20}}))
    assert load_config(js).reputation.cap == 20


@pytest.mark.parametrize(
    "override, field",
    [
        ("thresholds.p1=1.5", "thresholds.p1"),
        ("high.batch_size=0", "high.batch_size"),
        ("low.device=tpu", "low.device"),
        ("reputation.nonsense=1", "reputation.nonsense"),
        ("reputation.threshold=20", "reputation"),
    ],
)
def test_bad_values_name_the_field(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert field in str(err.value)


def test_malformed_override_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["thresholds.p1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)


@pytest.mark.parametrize(
    "override, field",
    [
        ("high.batch_size=true", "high.batch_size"),  # a bool is not a number (was taken as 1)
        ("thresholds.p1='0.1'", "thresholds.p1"),  # a quoted string is not a number
        ("job.files_per_shard=2.5", "job.files_per_shard"),  # a float is not an int
        ("serve.port=abc", "serve.port"),
        ("audit.top=false", "audit.top"),
        ("simulation.runs=[1]", "simulation.runs"),
        ("eval.subset=yes", "eval.subset"),
    ],
)
def test_types_are_strict_in_every_section(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert field in str(err.value)


def test_one_loader_order_file_then_flags_then_overrides(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("eval:\n  subset: 5\n  seed: 3\nsimulation:\n  runs: 2\n")
    cfg = load_config(yml, ["eval.seed=9"], {"eval": {"subset": 7, "seed": 8, "size": None}})
    assert (cfg.eval.subset, cfg.eval.seed, cfg.eval.size) == (7, 9, 256)  # flags over file, --set last
    assert cfg.simulation.runs == 2 and cfg.serve.port == 8000  # every section in the one config
    assert load_config(None, ["thresholds.p1=1"]).thresholds.p1 == 1.0  # an int where a float is due is fine
