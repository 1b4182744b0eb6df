"""DeepSpeed's checkpoint files are read with torch's weights-only loader: what a ZeRO
checkpoint holds loads, a file that would run code is refused naming it, and nothing runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine  # noqa: E402
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

from bregtop_dist.integrations.deepspeed_files import UnsafeCheckpointError, safe_load, using_safe_load  # noqa: E402


class _Touch:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_what_a_zero_checkpoint_holds_loads(tmp_path, gen):
    state = {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(scale=4.0),
             "dynamic": DynamicLossScaler(init_scale=2.0**8, scale_window=1000, min_scale=1.0, delayed_shift=2,
                                                 consecutive_hysteresis=False), "exp_avg": torch.randn(3, 4, generator=gen),
             "step": torch.tensor(7), "ds_version": "0.x", "fragments": [fragment_address(numel=12, start=4)]}
    torch.save(state, tmp_path / "optim_states.pt")
    got = safe_load(tmp_path / "optim_states.pt", map_location="cpu")
    assert got["zero_stage"] is ZeroStageEnum.weights and got["ds_version"] == "0.x"
    assert got["loss_scaler"].cur_scale == 4.0 and got["dynamic"].cur_scale == 2.0**8
    assert torch.equal(got["exp_avg"], state["exp_avg"]) and int(got["step"]) == 7
    assert got["fragments"] == [fragment_address(numel=12, start=4)]


def test_a_file_that_would_run_code_is_refused_naming_it(tmp_path):
    planted = tmp_path / "pwned"
    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": _Touch(planted)}, path)
    engine = TorchCheckpointEngine()
    engine.load(str(path))  # DeepSpeed's own loader runs it: the payload is live
    assert planted.exists()
    planted.unlink()
    with using_safe_load(type("Engine", (), {"checkpoint_engine": engine})()):
        with pytest.raises(UnsafeCheckpointError, match=rf"^'{path}' is refused: .*GLOBAL posix.system"):
            engine.load(str(path))
    assert not planted.exists()
    assert "load" not in vars(engine)  # DeepSpeed's method is back after the block


def test_using_safe_load_refuses_what_is_not_an_engine():
    with pytest.raises(TypeError, match="has no checkpoint_engine with a load method: not a DeepSpeed engine"):
        using_safe_load(object())
