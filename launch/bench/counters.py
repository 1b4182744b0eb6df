"""What a step issues, counted: ATen ops and host reads of tensors (``launch.bench launches``),
the same reads by the project line that led to them and the host-device syncs torch reports
on CUDA (``scripts/gpu_syncs.py``).

A host read is ``aten._local_scalar_dense`` (``item()``, ``bool()``, ``float()``, ``int()`` of
a tensor), plus each ``Tensor.tolist()`` inside :func:`count_tolist`. On a GPU the reads of
device tensors are the host syncs; on a CPU the count also includes reads of CPU tensors.
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[2]
PROJECT_DIRS = tuple(str(ROOT / d) + "/" for d in ("bregtop_dist", "triton_kernels", "launch"))
SYNC_MESSAGE = "synchronizing CUDA operation"


def project_line(stack: list[traceback.FrameSummary]) -> str:
    """``path:line`` (relative to the project) of the innermost frame in the project's
    packages, else of the innermost frame outside torch and the counting scripts, else ``?``."""
    for frame in reversed(stack):
        if frame.filename.startswith(PROJECT_DIRS) and frame.filename != __file__:
            return f"{Path(frame.filename).relative_to(ROOT)}:{frame.lineno}"
    for frame in reversed(stack):
        if "/torch/" not in frame.filename and not frame.filename.startswith((__file__, str(ROOT / "scripts"))):
            return f"{frame.filename}:{frame.lineno}"
    return "?"


class OpCounter(TorchDispatchMode):
    """Counts the ATen ops the dispatcher sees and the host reads among them while not
    ``paused``; with ``by_line``, also the reads by :func:`project_line`."""

    def __init__(self, by_line: bool = False) -> None:
        super().__init__()
        self.ops = 0
        self.scalar_reads = 0
        self.paused = False
        self.lines = by_line
        self.by_line: Counter[str] = Counter()

    def read(self) -> None:
        """One host read, unless paused."""
        if not self.paused:
            self.scalar_reads += 1
            if self.lines:
                self.by_line[project_line(traceback.extract_stack()[:-2])] += 1

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if not self.paused:
            self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.read()
        return func(*args, **(kwargs or {}))


@contextmanager
def count_tolist(counter: OpCounter) -> Iterator[None]:
    """``Tensor.tolist()`` reads a tensor without an op the dispatcher sees on the CPU (on a
    GPU it copies to the host): one read per call."""
    original = torch.Tensor.tolist

    def tolist(self: torch.Tensor) -> Any:
        counter.read()
        return original(self)

    torch.Tensor.tolist = tolist  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.Tensor.tolist = original  # type: ignore[method-assign]


@contextmanager
def cuda_syncs(enabled: bool) -> Iterator[Counter[str]]:
    """Counts the synchronising CUDA calls torch warns about, by project line (the warning is
    caught where it is raised, so the Python stack that led to it is still there)."""
    counts: Counter[str] = Counter()
    if not enabled:
        yield counts
        return

    def record(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if SYNC_MESSAGE in str(message):
            counts[project_line(traceback.extract_stack()[:-1])] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield counts
        finally:
            torch.cuda.set_sync_debug_mode("default")
