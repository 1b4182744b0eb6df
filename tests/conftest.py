"""Shared fixtures. Numerical tests draw fresh random inputs every run; the seed is in the
test's report (and BREGTOP_TEST_SEED replays it)."""

from __future__ import annotations

import os
import sys
import zlib

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on the CPU
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, os.path.dirname(__file__))  # tests/reference.py

# DeepSpeed compiles its CPU shared-memory op on first init into torch's extension cache, guarded
# by a lock file. Shared with other checkouts (~/.cache/torch_extensions), a run killed mid-build
# leaves that lock behind and every later deepspeed.initialize here waits on it forever (CI hung
# so); this checkout's own cache keeps other runs' state out of the tests.
os.environ.setdefault(
    "TORCH_EXTENSIONS_DIR", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "torch_extensions")
)


def _base_seed() -> int:
    env = os.environ.get("BREGTOP_TEST_SEED")
    return int(env) if env else int.from_bytes(os.urandom(4), "little")


BASE_SEED = _base_seed()


def pytest_report_header(config):
    return f"bregtop test seed: BREGTOP_TEST_SEED={BASE_SEED}"


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded freshly per run and per test (the seed is printed on failure)."""
    seed = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    request.node.user_properties.append(("seed", seed))
    print(f"generator seed {seed} (BREGTOP_TEST_SEED={BASE_SEED})")
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def kernel_device() -> torch.device:
    """Where the Triton kernel tests run: compiled on a GPU when there is one, else in Triton's
    interpreter on the CPU (TRITON_INTERPRET=1, set above only when there is no GPU)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
