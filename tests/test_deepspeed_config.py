"""The DeepSpeed adapter's reading of a config: what it accepts and what it refuses, and why."""

from __future__ import annotations

import json

import pytest

from bregtop_dist.integrations.deepspeed import bregtop_settings, load_config


def _config(**zero):
    return {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 2, **zero},
        "optimizer": {"type": "BregTop", "params": {"lr": 3e-4, "method": "kl", "betas": [0.9, 0.95]}},
    }


def test_settings_come_from_the_optimizer_block(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_config()))
    settings = bregtop_settings(load_config(path))
    assert settings == {"lr": 3e-4, "method": "kl", "betas": (0.9, 0.95)}


def test_load_config_copies_a_dict():
    cfg = _config()
    loaded = load_config(cfg)
    loaded["optimizer"]["params"]["lr"] = 1.0
    assert cfg["optimizer"]["params"]["lr"] == 3e-4


def test_missing_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.json")


def test_config_that_is_not_an_object(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object, got list"):
        load_config(path)


@pytest.mark.parametrize("block", [None, {"type": "AdamW", "params": {}}])
def test_other_optimizers_are_refused(block):
    cfg = _config()
    cfg["optimizer"] = block
    if block is None:
        del cfg["optimizer"]
    with pytest.raises(ValueError, match=r"needs \"optimizer\": \{\"type\": \"BregTop\".*found optimizer type"):
        bregtop_settings(cfg)


@pytest.mark.parametrize("key", ["offload_optimizer", "offload_param"])
def test_offload_is_refused(key):
    with pytest.raises(ValueError, match=f'zero_optimization.{key}.device="cpu" is not supported'):
        bregtop_settings(_config(**{key: {"device": "cpu"}}))


def test_offload_none_is_accepted():
    assert bregtop_settings(_config(offload_optimizer={"device": "none"}))["lr"] == 3e-4


def test_bad_stage():
    with pytest.raises(ValueError, match=r"zero_optimization.stage=4 is not one of 0, 1, 2, 3"):
        bregtop_settings(_config(stage=4))
