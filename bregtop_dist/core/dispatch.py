"""Which implementation applies Algorithm 2's masked scaling: the Triton kernel or torch.

``auto`` (the default) means Triton for CUDA tensors when Triton imports, torch otherwise;
the environment variable ``BREGTOP_BACKEND`` (``auto``, ``torch`` or ``triton``) replaces
``auto``. An explicit ``triton`` on CPU tensors runs only in Triton's interpreter
(``TRITON_INTERPRET=1``). ``auto`` also falls back to torch where Triton could not build its
launcher (no C compiler or no Python.h), instead of failing at the first step. Every
fallback from Triton to torch is logged once per reason.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sysconfig

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


@functools.lru_cache(maxsize=1)
def launcher_missing() -> str | None:
    """What Triton lacks to build its launcher on this machine (it compiles a small C module on
    first use: a C compiler and Python's headers), or None. A custom build hook
    (``triton.knobs.build.impl``) needs neither. Looked up once per process."""
    try:
        from triton import knobs

        if knobs.build.impl is not None:
            return None
    except (ImportError, AttributeError):
        pass
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    if not compiler:
        return "no C compiler (set CC, or install gcc or clang)"
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    if not os.path.isfile(os.path.join(include, "Python.h")):
        return f"no Python.h under {include} (install Python's development headers)"
    return None


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
        missing = None if interpreted else launcher_missing()
        if missing is not None:
            raise ValueError(f"backend='triton' cannot build Triton's launcher on this machine: {missing}")
        if dtype != torch.float32:
            raise ValueError(f"backend='triton' needs float32 eigenvalues, got {dtype}")
        return "triton"
    # auto
    if device.type != "cuda":
        return "torch"
    if not triton_available():
        _log_once("triton is not installed")
        return "torch"
    missing = launcher_missing()
    if missing is not None:
        _log_once(f"Triton cannot build its launcher: {missing}")
        return "torch"
    if dtype != torch.float32:
        _log_once(f"the kernel takes float32 eigenvalues, got {dtype}")
        return "torch"
    return "triton"
