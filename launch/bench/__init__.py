"""Benchmarks, ``python -m launch.bench <suite>``, and the helpers every suite shares.

Each suite module exposes ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; ``launch.bench.__main__`` turns them into subcommands.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import time
import timeit
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import benchmark


def machine_info() -> dict[str, Any]:
    """What a timing depends on: CPU, core count, torch build and threads, when (UTC), and the
    load average (1, 5, 15 min) when called: other processes on the machine skew timings."""
    return {
        "processor": platform.processor() or platform.machine(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "load_average": list(os.getloadavg()),
    }


def code_version() -> str | None:
    """``git describe --always --dirty`` of the checkout (the code being timed), or None."""
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, check=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` as indented JSON, creating the parent folders."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


@dataclass(frozen=True)
class Timing:
    """How a figure is timed: ``warmup`` untimed calls, then ``repeats`` samples, each the time of
    ``inner`` back-to-back calls divided by ``inner``; the figure is the median sample. On a GPU
    ``inner > 1`` keeps the synchronisation around a sample from counting as part of a call of a
    few tens of microseconds."""

    repeats: int
    inner: int = 1
    warmup: int = 2


def device_clock(device: torch.device) -> Callable[[], float]:
    """Seconds, read once ``device`` has done its queued work: torch.utils.benchmark's timer
    (which synchronises the accelerator first) off the CPU, ``time.perf_counter`` on it."""
    return time.perf_counter if device.type == "cpu" else benchmark.timer


def samples(fn: Callable[[], Any], device: torch.device, timing: Timing,
            setup: Callable[[], Any] | None = None) -> tuple[list[float], Any]:
    """Seconds per call of each sample of ``fn`` (see :class:`Timing`; ``timeit.Timer.repeat`` on
    :func:`device_clock`, garbage collection off within a sample, ``setup`` run untimed before
    each sample), and the result of the last call."""
    last = None
    for _ in range(timing.warmup):
        last = fn()

    def call() -> None:
        nonlocal last
        last = fn()

    raw = timeit.Timer(call, setup or "pass", timer=device_clock(device)).repeat(timing.repeats, timing.inner)
    return [t / timing.inner for t in raw], last


def timed(fn: Callable[[], Any], device: torch.device, timing: Timing) -> tuple[float, Any]:
    """The median seconds per call of ``fn`` (see :class:`Timing`), and its last result."""
    times, last = samples(fn, device, timing)
    return statistics.median(times), last
