"""What one optimizer step issues: ATen ops, Triton launches and scalar reads of tensors.

On a GPU a step's cost at this model size is set by how many kernels it launches (one every
5-10 microseconds from Python) and by how often the host waits for the device, not by its
arithmetic. This counts both on the CPU, on GPT-2-small's block structure at 1/16 scale
(12 layers; per layer a 144x48 qkv, a 48x48 projection, a 192x48 and a 48x192 MLP matrix and
8 vectors; ``max_precond_dim=64``: stacks of 48 blocks 48x48, 36 of 64x48 and 36 of 48x64, and
96 tensors on the AdamW side), for each method, with the accelerator code paths off and on
(``BREGTOP_ACCELERATOR_PATHS=1``: batched linear algebra, fixed-pass selection).

Counted over one refresh period after a warm-up period, per step: every ATen op the
dispatcher sees (a ``TorchDispatchMode``), every Triton kernel launch (the two kernels'
wrappers), and every scalar read of a tensor (``aten._local_scalar_dense``: ``item()``,
``bool()``, ``float()`` of a tensor). On a GPU those reads of device tensors are the host
syncs; on this CPU the count also includes reads of the CPU-resident step counters, so it is
an upper bound on the syncs.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bregtop_dist import METHODS, BregTop
from bregtop_dist.core.dispatch import PATHS_ENV_VAR
from launch.bench import code_version, machine_info, positive_int, write_json

HELP = "ATen ops, Triton launches and scalar reads per optimizer step (GPT-2-small structure at 1/16)"
DEFAULT_OUT = Path("runs/bench/launches.json")
LAYERS, DIM, MAX_DIM, FREQUENCY = 12, 48, 64, 10


def layout(layers: int = LAYERS, dim: int = DIM) -> list[tuple[int, ...]]:
    """The parameter shapes: per layer qkv, projection, two MLP matrices and 8 vectors."""
    shapes: list[tuple[int, ...]] = []
    for _ in range(layers):
        shapes += [(3 * dim, dim), (dim, dim), (4 * dim, dim), (dim, 4 * dim)]
        shapes += [(3 * dim,), (dim,), (4 * dim,), (dim,), (dim,), (dim,), (dim,), (dim,)]
    return shapes


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.scalar_reads = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_reads += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _count_launches() -> Iterator[list[int]]:
    """Counts calls of the two Triton kernels' wrappers (each is one launch)."""
    count = [0]
    patched = []
    for module_name, fn_name in (("triton_kernels.masked_scale", "masked_scale"),
                                 ("triton_kernels.rotated_stats", "rotated_stats")):
        try:
            module = __import__(module_name, fromlist=[fn_name])
        except ImportError:
            continue
        original = getattr(module, fn_name)

        def wrapper(*a: Any, _original: Any = original, **k: Any) -> Any:
            count[0] += 1
            return _original(*a, **k)

        setattr(module, fn_name, wrapper)
        patched.append((module, fn_name, original))
    try:
        yield count
    finally:
        for module, fn_name, original in patched:
            setattr(module, fn_name, original)


@dataclass(frozen=True)
class Counts:
    method: str
    accelerator_paths: bool
    backend: str
    steps: int
    ops_per_step: float
    triton_launches_per_step: float
    scalar_reads_per_step: float


def count_step(method: str, accelerator_paths: bool, backend: str = "auto", layers: int = LAYERS,
               seed: int = 0) -> Counts:
    """Counts per step over one refresh period, after a warm-up period."""
    old = os.environ.get(PATHS_ENV_VAR)
    os.environ[PATHS_ENV_VAR] = "1" if accelerator_paths else "0"
    try:
        g = torch.Generator().manual_seed(seed)
        params = [nn.Parameter(torch.randn(s, generator=g) * 0.02) for s in layout(layers)]
        grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(2)]
        opt = BregTop(params, method=method, lr=1e-3, max_precond_dim=MAX_DIM, precondition_frequency=FREQUENCY,
                      backend=backend)

        def step(k: int) -> None:
            for p, gr in zip(params, grads[k % 2]):
                p.grad = gr
            opt.step()

        for k in range(FREQUENCY + 1):
            step(k)
        counter = _OpCounter()
        with _count_launches() as launches, counter:
            for k in range(FREQUENCY):
                step(k)
    finally:
        if old is None:
            os.environ.pop(PATHS_ENV_VAR, None)
        else:
            os.environ[PATHS_ENV_VAR] = old
    return Counts(method, accelerator_paths, backend, FREQUENCY, counter.ops / FREQUENCY, launches[0] / FREQUENCY,
                  counter.scalar_reads / FREQUENCY)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods to count (default: all ten)")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                        help="BregTop's backend (triton on the CPU needs TRITON_INTERPRET=1)")
    parser.add_argument("--layers", type=positive_int, default=LAYERS,
                        help="transformer layers of the layout (default 12, GPT-2 small's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON goes")


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"python -m launch.bench launches: error: unknown method(s) {unknown}; use {', '.join(METHODS)}")
    rows = [count_step(m, paths, args.backend, args.layers) for m in methods for paths in (False, True)]
    print(f"{'method':<15}{'paths':>8}{'ops/step':>10}{'launches':>10}{'reads':>8}")
    for r in rows:
        print(f"{r.method:<15}{'accel' if r.accelerator_paths else 'cpu':>8}{r.ops_per_step:>10.0f}"
              f"{r.triton_launches_per_step:>10.1f}{r.scalar_reads_per_step:>8.1f}")
    write_json(args.out, {"suite": "launches", "machine": machine_info(), "code": code_version(),
                          "layout": {"layers": args.layers, "dim": DIM, "max_precond_dim": MAX_DIM,
                                     "precondition_frequency": FREQUENCY},
                          "rows": [asdict(r) for r in rows]})
    print(f"wrote {args.out}")
    return 0

