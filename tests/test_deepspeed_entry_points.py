"""The shipped DeepSpeed JSONs through each entry point a user takes, under torchrun on 2 CPU
processes (see deepspeed_entry_points.py): the library's initialize, plain
deepspeed.initialize with attach, and the transformers Trainer (equal to its DDP run)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).with_name("deepspeed_entry_points.py")
ROOT = SCRIPT.parent.parent


def _torchrun(mode: str, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT), mode,
         str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=400,
    )
    assert done.returncode == 0, f"{mode}:\n" + done.stdout[-3000:] + done.stderr[-5000:]


@pytest.mark.parametrize("mode", ["library", "plain"])
def test_shipped_json_equals_the_single_process_run(mode, tmp_path):
    _torchrun(mode, tmp_path)


def test_trainer_with_the_trainer_json_equals_its_ddp_run(tmp_path):
    _torchrun("trainer-deepspeed", tmp_path)
    _torchrun("trainer-ddp", tmp_path)
    zero = torch.load(tmp_path / "trainer-deepspeed.pt", weights_only=True)
    ddp = torch.load(tmp_path / "trainer-ddp.pt", weights_only=True)
    for name, want in ddp.items():
        rel = float((zero[name] - want).abs().max() / want.abs().max())
        assert rel <= 1e-5, f"{name}: ZeRO-2 Trainer differs from the DDP Trainer by {rel:.3g}"
