"""The DeepSpeed adapter's reading of a config: what it accepts and what it refuses, and why."""

from __future__ import annotations

import json
import random
import re

import pytest

from bregtop_dist import BregTopConfig
from bregtop_dist.core.validate import ArgumentTypeError
from bregtop_dist.integrations.deepspeed import fill_auto_batch, load_config, optimizer_block


def _config(**zero):
    return {
        "train_micro_batch_size_per_gpu": 2,
        "zero_optimization": {"stage": 2, **zero},
        "optimizer": {"type": "BregTop", "params": {"lr": 3e-4, "method": "kl", "betas": [0.9, 0.95]}},
    }


def test_settings_come_from_the_optimizer_block(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(_config()))
    block = optimizer_block(load_config(path))
    assert block.settings == BregTopConfig(lr=3e-4, method="kl", betas=(0.9, 0.95)) and block.comm_dtype == "fp32"


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
        optimizer_block(cfg)


@pytest.mark.parametrize("key", ["offload_optimizer", "offload_param"])
def test_offload_is_refused(key):
    with pytest.raises(ValueError, match=f'zero_optimization.{key}.device="cpu" is not supported'):
        optimizer_block(_config(**{key: {"device": "cpu"}}))


def test_offload_none_is_accepted():
    assert optimizer_block(_config(offload_optimizer={"device": "none"})).settings.lr == 3e-4


def test_bad_stage():
    with pytest.raises(ValueError, match=r"zero_optimization.stage=4 is not one of 0, 1, 2, 3"):
        optimizer_block(_config(stage=4))


@pytest.mark.parametrize("params,error,message", [
    ({"lrr": 1e-3}, ArgumentTypeError, "DeepSpeed config optimizer.params: unknown setting 'lrr'; allowed: lr, method"),
    ({"lr": "auto"}, ValueError, 'optimizer.params.lr="auto" in the DeepSpeed config: only the transformers Trainer'),
    ({"lr": -1.0}, ValueError, "lr=-1.0 is not allowed: lr must be a finite number >= 0"),
    ({"method": "soap"}, ValueError, "method='soap' is unknown; allowed: shampoo"),
    ({"comm_dtype": "fp8"}, ValueError, "comm_dtype='fp8' is not allowed"),
])
def test_the_block_is_checked_as_bregtop_checks_its_arguments(params, error, message):
    cfg = _config()
    cfg["optimizer"]["params"] = params
    with pytest.raises(error, match=re.escape(message)):
        optimizer_block(cfg)


def test_backend_auto_is_bregtop_s_own_value_and_stays():
    cfg = _config()
    cfg["optimizer"]["params"]["backend"] = "auto"
    assert optimizer_block(cfg).settings.backend == "auto"


def test_comm_dtype_is_the_optimizer_s_not_a_group_setting():
    cfg = _config()
    cfg["optimizer"]["params"]["comm_dtype"] = "bf16"
    block = optimizer_block(cfg)
    assert block.comm_dtype == "bf16" and block.as_kwargs()["comm_dtype"] == "bf16"


AUTO = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}


@pytest.mark.parametrize("world", [1, 2, 4])
def test_auto_batch_sizes_are_filled_from_the_arguments(world):
    micro, accumulation = random.randint(1, 16), random.randint(1, 4)
    filled = fill_auto_batch(dict(AUTO), micro, accumulation, world)
    assert filled == {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accumulation,
                      "train_batch_size": micro * accumulation * world}
    assert fill_auto_batch({}, micro, None, world)["train_batch_size"] == micro * world  # missing is "auto" too


def test_numbers_in_the_config_stay_and_a_global_batch_alone_is_left_to_deepspeed():
    cfg = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2, "train_batch_size": "auto"}
    assert fill_auto_batch(cfg, None, None, 2)["train_batch_size"] == 16
    assert fill_auto_batch(cfg, 4, 2, 2) == {**cfg, "train_batch_size": 16}
    only_global = fill_auto_batch({"train_batch_size": 32, "train_micro_batch_size_per_gpu": "auto"}, None, None, 2)
    assert only_global == {"train_batch_size": 32, "gradient_accumulation_steps": 1}


@pytest.mark.parametrize("cfg,micro,gas,message", [
    (AUTO, None, None, "train_micro_batch_size_per_gpu and train_batch_size are \"auto\" (or missing) in the DeepSpeed "
                       "config: pass initialize(..., micro_batch_size=N)"),
    ({"train_micro_batch_size_per_gpu": 4}, 8, None,
     "train_micro_batch_size_per_gpu=4 in the DeepSpeed config and micro_batch_size=8 disagree"),
    ({"gradient_accumulation_steps": 2}, 8, 3, "gradient_accumulation_steps=2 in the DeepSpeed config and "
                                               "gradient_accumulation_steps=3 disagree"),
    (AUTO, 0, None, "micro_batch_size=0 must be an integer >= 1"),
    (AUTO, 8, 1.5, "gradient_accumulation_steps=1.5 must be an integer >= 1"),
])
def test_batch_sizes_that_cannot_be_filled_are_refused(cfg, micro, gas, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        fill_auto_batch(dict(cfg), micro, gas, 2)
