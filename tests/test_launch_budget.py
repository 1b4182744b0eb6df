"""The accelerator step's launch budget (issue 14), held in CI on the CPU.

On GPT-2-small's block structure at 1/16 scale (``launch.bench.launches``), one step on the
accelerator code paths with the Triton kernels, averaged over a refresh period, issues at
most 500 ATen ops plus kernel launches and reads the device at most once: the verdict that
decides, before anything is written, whether the step commits. The kernels are stood in by
their torch references here (uncounted, one launch each), since the interpreter takes seconds
per launch; they are tested against those references in tests/test_triton_*.py.
"""

from __future__ import annotations

import pytest

from bregtop_dist import METHODS
from launch.bench.launches import count_step

pytest.importorskip("triton")

OPS_AND_LAUNCHES = 500
READS = 1.0


@pytest.mark.parametrize("method", METHODS)
def test_accelerator_step_holds_the_launch_budget(monkeypatch, method):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # stand-ins, not the interpreter
    counts = count_step(method, accelerator_paths=True, backend="triton")
    assert counts.kernels == "stand-in"
    assert counts.triton_launches_per_step >= 3  # the kernels do run: one per stack at least
    assert counts.ops_and_launches <= OPS_AND_LAUNCHES, counts
    assert counts.scalar_reads_per_step <= READS, counts

