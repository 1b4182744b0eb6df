"""Benchmarks, ``python -m launch.bench <suite>``, and the helpers every suite shares.

Each suite module exposes ``HELP`` (one line), ``add_arguments(parser)`` and
``run(args) -> int``; ``launch.bench.__main__`` turns them into subcommands.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (the message names the bad value and what is allowed)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed; allowed: an integer >= 1")
    return value


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


def timer(device: torch.device) -> Callable[[Callable[[], Any]], float]:
    """Seconds of one call of a function, synchronising the device around it."""

    def run(fn: Callable[[], Any]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    return run


def median_seconds(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after two untimed ones."""
    fn()
    fn()
    run = timer(device)
    return statistics.median(run(fn) for _ in range(repeats))
