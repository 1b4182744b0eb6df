"""Accelerate's save_state and the Trainer's checkpoints under DDP (2 processes, torchrun on
gloo), continued on 1, 2 and 4 processes (see rank0_savers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("transformers")

SCRIPT = Path(__file__).with_name("rank0_savers.py")
ROOT = SCRIPT.parent.parent


def _torchrun(world: int, mode: str, out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world),
         str(SCRIPT), mode, str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, f"{mode} on {world} processes:\n" + done.stdout[-3000:] + done.stderr[-5000:]


def test_accelerate_save_state_resumes_on_1_2_and_4_processes(tmp_path):
    """save_state after 4 steps on 2 processes (with consolidate_on_save), load_state on W
    processes, 3 more steps: the single-process run's weights (checked in the script)."""
    _torchrun(2, "accelerate-save", tmp_path)
    assert {"optimizer.bin", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    for world in (1, 2, 4):
        _torchrun(world, "accelerate-resume", tmp_path)


def test_trainer_checkpoint_resumes_exactly_and_on_other_process_counts(tmp_path):
    """A 2-process Trainer run with ConsolidateOnSave; resumed from its step-4 checkpoint on 2
    processes it ends on the same weights; on 1 and 4 processes every saved block is loaded
    bit for bit (the data order, and so the weights, depend on the process count there)."""
    _torchrun(2, "trainer", tmp_path)
    _torchrun(2, "trainer-resume", tmp_path)
    first = torch.load(tmp_path / "first" / "final.pt", weights_only=True)
    again = torch.load(tmp_path / "resumed-2" / "final.pt", weights_only=True)
    assert all(torch.equal(first[k], again[k]) for k in first)
    for world in (1, 4):
        _torchrun(world, "trainer-resume", tmp_path)
