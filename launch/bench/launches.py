"""What one optimizer step issues: ATen ops, Triton launches and scalar reads of tensors.

On a GPU a step's cost at this model size is set by how many kernels it launches (one every
5-10 microseconds from Python) and by how often the host waits for the device, not by its
arithmetic. This counts both on the CPU, on GPT-2-small's block structure at 1/16 scale
(12 layers; per layer a 144x48 qkv, a 48x48 projection, a 192x48 and a 48x192 MLP matrix and
8 vectors; ``max_precond_dim=64``: stacks of 48 blocks 48x48, 36 of 64x48 and 36 of 48x64, and
96 tensors on the AdamW side), for each method, with the accelerator code paths off and on
(``BREGTOP_ACCELERATOR_PATHS=1``: batched linear algebra, fixed-pass selection).

Counted over one refresh period after a warm-up period, per step: every ATen op the
dispatcher sees and every host read of a tensor (:mod:`launch.bench.counters`), and every
Triton kernel launch (the kernels' wrappers). On a GPU the reads of device tensors are the
host syncs; on this CPU the count also includes reads of the CPU-resident step counters, so it
is an upper bound on the syncs.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bregtop_dist import METHODS, BregTop
from bregtop_dist.core.dispatch import PATHS_ENV_VAR
from launch.bench import code_version, machine_info, write_json
from launch.bench.counters import OpCounter, count_tolist
from launch.cli import positive_int

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


class _CountedKernel:
    """A Triton kernel whose every ``kernel[grid](...)`` launch goes through ``on_launch(run)``."""

    def __init__(self, kernel: Any, on_launch: Callable[[Callable[[], None]], None]) -> None:
        self.kernel, self.on_launch = kernel, on_launch

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        launch = self.kernel[grid]
        return lambda *args, **kwargs: self.on_launch(lambda: launch(*args, **kwargs))


@contextmanager
def _count_launches(counter: OpCounter, stand_ins: bool) -> Iterator[list[int]]:
    """Counts launches of the Triton kernels; with ``stand_ins`` the kernels are replaced by
    their torch references, run with counting paused (see ``kernel_stand_ins``)."""
    count = [0]

    def on_launch(run: Any) -> None:
        count[0] += 1
        counter.paused = True
        try:
            run()
        finally:
            counter.paused = False

    if stand_ins:
        from launch.bench.kernel_stand_ins import stand_in_kernels

        with stand_in_kernels(on_launch):
            yield count
        return
    patched = []
    for module_name, fn_name in (("triton_kernels.masked_scale", "_masked_scale_kernel"),
                                 ("triton_kernels.rotated_stats", "_rotated_stats_kernel"),
                                 ("triton_kernels.top_set", "_top_set_kernel")):
        try:
            module = __import__(module_name, fromlist=[fn_name])
        except ImportError:
            continue
        original = getattr(module, fn_name)
        setattr(module, fn_name, _CountedKernel(original, on_launch))
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
    kernels: str  # "none" (torch backend), "stand-in" (references, counted as launches) or "triton"
    steps: int
    ops_per_step: float
    triton_launches_per_step: float
    scalar_reads_per_step: float

    @property
    def ops_and_launches(self) -> float:
        return self.ops_per_step + self.triton_launches_per_step


def _set_environ(values: dict[str, str | None]) -> None:
    """Set (or, for None, remove) environment variables."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@contextmanager
def _environ(**values: str | None) -> Iterator[None]:
    """The environment variables ``values`` within the block, the old ones restored after."""
    old = {k: os.environ.get(k) for k in values}
    try:
        _set_environ(values)
        yield
    finally:
        _set_environ(old)


def count_step(method: str, accelerator_paths: bool, backend: str = "auto", layers: int = LAYERS,
               seed: int = 0, device: str = "cpu") -> Counts:
    """Counts per step over one refresh period, after a warm-up period. ``backend="triton"``
    on the CPU runs the kernels' stand-ins (see ``kernel_stand_ins``) unless TRITON_INTERPRET=1
    is set, in which case the interpreter runs them (slowly)."""
    dev = torch.device(device)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    stand_ins = backend == "triton" and dev.type == "cpu" and not interpreted
    kernels = "none" if backend == "torch" or (backend == "auto" and dev.type == "cpu") else (
        "stand-in" if stand_ins else "triton")
    with _environ(**{PATHS_ENV_VAR: "1" if accelerator_paths else "0",
                     "TRITON_INTERPRET": "1" if stand_ins or interpreted else None}):
        g = torch.Generator().manual_seed(seed)
        params = [nn.Parameter((torch.randn(s, generator=g) * 0.02).to(dev)) for s in layout(layers)]
        grads = [[torch.randn(p.shape, generator=g).to(dev) for p in params] for _ in range(2)]
        opt = BregTop(params, method=method, lr=1e-3, max_precond_dim=MAX_DIM, precondition_frequency=FREQUENCY,
                      backend=backend)

        def step(k: int) -> None:
            for p, gr in zip(params, grads[k % 2]):
                p.grad = gr
            opt.step()

        counter = OpCounter()
        with _count_launches(counter, stand_ins) as launches:
            for k in range(FREQUENCY + 1):
                step(k)
            launches[0] = 0
            with count_tolist(counter), counter:
                for k in range(FREQUENCY):
                    step(k)
    return Counts(method, accelerator_paths, backend, kernels, FREQUENCY, counter.ops / FREQUENCY,
                  launches[0] / FREQUENCY, counter.scalar_reads / FREQUENCY)


ROWS = (("cpu", False, "auto"), ("accel/torch", True, "torch"), ("accel/triton", True, "triton"))
"""(label, accelerator paths, backend) of each row: the CPU's own paths; the accelerator paths
with the torch fallback (Triton absent); and with the Triton kernels, what CUDA runs."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated methods to count (default: all ten)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="where the parameters live; on cuda the CPU-paths row is left out")
    parser.add_argument("--layers", type=positive_int, default=LAYERS,
                        help="transformer layers of the layout (default 12, GPT-2 small's)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON goes")


def run(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise SystemExit(f"python -m launch.bench launches: error: unknown method(s) {unknown}; use {', '.join(METHODS)}")
    kinds = [r for r in ROWS if args.device == "cpu" or r[1]]
    rows = [count_step(m, paths, backend, args.layers, device=args.device) for m in methods for _, paths, backend in kinds]
    print(f"{'method':<15}{'paths/backend':>14}{'kernels':>10}{'ops/step':>10}{'launches':>10}{'reads':>8}")
    for r in rows:
        label = next(lab for lab, paths, backend in ROWS if (paths, backend) == (r.accelerator_paths, r.backend))
        print(f"{r.method:<15}{label:>14}{r.kernels:>10}{r.ops_per_step:>10.0f}"
              f"{r.triton_launches_per_step:>10.1f}{r.scalar_reads_per_step:>8.1f}")
    write_json(args.out, {"suite": "launches", "machine": machine_info(), "code": code_version(),
                          "layout": {"layers": args.layers, "dim": DIM, "max_precond_dim": MAX_DIM,
                                     "precondition_frequency": FREQUENCY, "device": args.device},
                          "rows": [asdict(r) for r in rows]})
    print(f"wrote {args.out}")
    return 0
