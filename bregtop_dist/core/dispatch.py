"""Which implementation applies Algorithm 2's masked scaling: the Triton kernel or torch.

``auto`` (the default) means Triton for CUDA tensors when Triton imports, torch otherwise;
the environment variable ``BREGTOP_BACKEND`` (``auto``, ``torch`` or ``triton``) replaces
``auto``. An explicit ``triton`` on CPU tensors runs only in Triton's interpreter
(``TRITON_INTERPRET=1``). Every fallback from Triton to torch is logged once per reason.
"""

from __future__ import annotations

import logging
import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "BREGTOP_BACKEND"
PATHS_ENV_VAR = "BREGTOP_ACCELERATOR_PATHS"

_log = logging.getLogger("bregtop_dist")
_logged: set[str] = set()


def _log_once(reason: str) -> None:
    if reason not in _logged:
        _logged.add(reason)
        _log.warning("BregTop: using the torch path for the masked scaling: %s", reason)


def accelerator_paths(device: torch.device) -> bool:
    """Whether to take the code paths written for accelerators (batched linear algebra over a
    stack, fixed-pass selection that never waits for the host): always off the CPU, and on the
    CPU when ``BREGTOP_ACCELERATOR_PATHS=1``, so that tests and benchmarks can run and count
    them without a GPU. (On the CPU path a block's eigh/QR runs on its own, which makes its
    basis independent of the other blocks in its stack; batched, it may differ by rounding.)"""
    return device.type != "cpu" or os.environ.get(PATHS_ENV_VAR) == "1"


def triton_available() -> bool:
    try:
        import triton_kernels.masked_scale  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype) -> str:
    """``"torch"`` or ``"triton"`` for eigenvalues of ``dtype`` on ``device``.

    Raises ValueError for an unknown name, or for ``triton`` asked for where it cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
    if backend == "auto":
        backend = os.environ.get(ENV_VAR, "auto")
        if backend not in BACKENDS:
            raise ValueError(f"{ENV_VAR}={backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
    if backend == "torch":
        return "torch"
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    runnable = device.type == "cuda" or interpreted
    if backend == "triton":
        if not runnable:
            raise ValueError(
                f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); got device {device}"
            )
        if not triton_available():
            raise ValueError("backend='triton' needs the triton package: pip install 'bregtop_dist[triton]'")
        if dtype != torch.float32:
            raise ValueError(f"backend='triton' needs float32 eigenvalues, got {dtype}")
        return "triton"
    # auto
    if device.type != "cuda":
        return "torch"
    if not triton_available():
        _log_once("triton is not installed")
        return "torch"
    if dtype != torch.float32:
        _log_once(f"the kernel takes float32 eigenvalues, got {dtype}")
        return "torch"
    return "triton"
