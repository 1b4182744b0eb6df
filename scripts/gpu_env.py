"""Facts of the machine a GPU check ran on, one ``key: value`` line each (for scripts/gpu_check.sh).

What the figures of a check depend on, and what the Triton kernels need to run compiled: the
device, the torch/CUDA/Triton builds and the rest of ``torch.utils.collect_env``'s report (OS,
driver, cuDNN, GCC), a C compiler and ``Python.h`` (Triton builds a small C launcher on first
use), and the packages the check's steps import. Never fails: a missing piece is printed as such.
"""

from __future__ import annotations

import datetime
import importlib
import os
import platform
import shutil
import sys
import sysconfig


def package_version(name: str) -> str:
    """The version of an importable package, or why it is not there."""
    try:
        module = importlib.import_module(name)
    except Exception as err:  # noqa: BLE001 - any import failure is a fact to report
        return f"not importable ({type(err).__name__}: {err})".splitlines()[0]
    return str(getattr(module, "__version__", "installed"))


def torch_facts() -> list[tuple[str, str]]:
    """torch's build, CUDA, OS, driver and libraries as ``torch.utils.collect_env`` reports
    them, and each visible device's capability, memory and SM count."""
    try:
        import torch
        from torch.utils.collect_env import get_env_info

        env = get_env_info()
    except Exception as err:  # noqa: BLE001 - a torch that fails to import or report is a fact too
        return [("torch", f"not importable or no environment report: {type(err).__name__}: {err}")]
    facts = [("torch", env.torch_version), ("torch cuda build", str(env.cuda_compiled_version)),
             ("cuda available", str(env.is_cuda_available)), ("os", str(env.os)),
             ("nvidia driver", str(env.nvidia_driver_version)), ("cudnn", str(env.cudnn_version)),
             ("gcc", str(env.gcc_version))]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            facts.append((f"device {i}", f"{p.name}, capability {p.major}.{p.minor}, "
                                         f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"))
    return facts


def triton_launcher() -> str:
    """'ok', or what Triton lacks to build its launcher (bregtop_dist's own check)."""
    try:
        from bregtop_dist.core.dispatch import launcher_missing
    except ImportError as err:
        return f"unknown (bregtop_dist not importable: {err})"
    return launcher_missing() or "ok"


def facts() -> list[tuple[str, str]]:
    include = sysconfig.get_paths()["include"]
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    rows = [
        ("date_utc", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")),
        ("host", f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs"),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        *torch_facts(),
        ("triton", package_version("triton")),
        ("triton launcher", triton_launcher()),
        ("C compiler", compiler or "none"),
        ("Python.h", f"{'present' if os.path.isfile(os.path.join(include, 'Python.h')) else 'missing'} ({include})"),
    ]
    rows += [(name, package_version(name)) for name in ("pytest", "accelerate", "tokenizers", "deepspeed")]
    rows += [(var, os.environ.get(var, "(unset)"))
             for var in ("TRITON_INTERPRET", "BREGTOP_BACKEND", "BREGTOP_ACCELERATOR_PATHS", "OMP_NUM_THREADS")]
    return rows


if __name__ == "__main__":
    for key, value in facts():
        print(f"{key}: {value}")
