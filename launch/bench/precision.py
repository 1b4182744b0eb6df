"""Accuracy of ``rotation_precision`` (tf32, bf16) against fp32: one step and a whole run.

Two measurements per precision, each against fp32 from the same start and the same data:

- **one step**: a BregTop step from a state warmed up for a refresh period in fp32 (so that the
  eigenbases are not the identity); the relative error of the parameter change,
  ``|d_prec - d_fp32| / |d_fp32|``, median over several warm-ups;
- **a run**: ``--steps`` (default 300) steps of a small teacher-student MLP regression
  (4 matrices of 128..256, batch 256); the relative distance of the final weights,
  ``|w_prec - w_fp32| / |w_fp32 - w_0|``, and the final training losses; beside them the same
  distance for an fp32 run from initial weights perturbed at float32's rounding level, the
  yardstick: a trajectory amplifies any perturbation, and a precision is harmless where its
  distance is of that order and its loss as low.

On CUDA ``tf32`` runs on the tensor cores. A CPU has no TF32, so on the CPU the tf32 rows
*emulate* it (operands rounded to TF32's 10-bit mantissa, float32 products): the rounding of
the operands is TF32's, the accumulation order is not the GPU's. bf16 runs as it does on a GPU.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

import bregtop_dist.core.block_step as block_step
from bregtop_dist import BregTop
from bregtop_dist.core.rotation import ROTATION_PRECISIONS
from launch.bench import code_version, machine_info, write_json
from launch.cli import positive_int

HELP = "relative error of rotation_precision tf32/bf16 against fp32 (one step, a 300-step run)"
DEFAULT_OUT = Path("runs/bench/precision.json")
PERTURB = 1e-6
"""The yardstick row: fp32 from initial weights perturbed by this relative noise (about the
size of one float32 rounding), whose distance from the fp32 run says how much any perturbation
of this size grows over the run."""


def round_to_tf32(x: Tensor) -> Tensor:
    """``x`` (float32) rounded to nearest (ties away) to TF32's 10 explicit mantissa bits."""
    bits = x.contiguous().view(torch.int32)
    rounded = (bits + 0x1000) & ~0x1FFF
    return torch.where(torch.isfinite(x), rounded.view(torch.float32), x)


@contextmanager
def emulated_tf32() -> Iterator[None]:
    """On the CPU, ``tf32`` rotations with operands rounded to TF32 (see the module docstring)."""
    original = block_step.rotate

    def rotate(a: Tensor, b: Tensor, precision: str = "fp32") -> Tensor:
        if precision == "tf32" and not a.is_cuda:
            return torch.bmm(round_to_tf32(a), round_to_tf32(b))
        return original(a, b, precision)

    block_step.rotate = rotate  # type: ignore[assignment]
    try:
        yield
    finally:
        block_step.rotate = original  # type: ignore[assignment]


def _model(device: torch.device, seed: int) -> nn.Sequential:
    g = torch.Generator().manual_seed(seed)
    layers = []
    for d_in, d_out in ((128, 256), (256, 256), (256, 192), (192, 1)):
        lin = nn.Linear(d_in, d_out)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(d_out, d_in, generator=g) / d_in**0.5)
            lin.bias.zero_()
        layers += [lin, nn.Tanh()]
    return nn.Sequential(*layers[:-1]).to(device)


def _batches(steps: int, device: torch.device, seed: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed + 1)
    teacher = _model(torch.device("cpu"), seed + 2)
    out = []
    with torch.no_grad():
        for _ in range(steps):
            x = torch.randn(256, 128, generator=g)
            out.append((x.to(device), teacher(x).to(device)))
    return out


def _flat(model: nn.Module) -> Tensor:
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _train(precision: str, steps: int, device: torch.device, seed: int, method: str,
           perturb: float = 0.0) -> tuple[Tensor, float]:
    model = _model(device, seed)
    if perturb:  # relative noise on the initial weights: the yardstick of a run's sensitivity
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1.0 + perturb * torch.randn(p.shape, generator=g).to(device))
    opt = BregTop(model.parameters(), method=method, lr=3e-3, rotation_precision=precision)
    loss = torch.zeros(())
    for x, y in _batches(steps, device, seed):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
    return _flat(model), float(loss.detach())


def _one_step_errors(precision: str, device: torch.device, seed: int, method: str, repeats: int) -> list[float]:
    errors = []
    for r in range(repeats):
        batches = _batches(11, device, seed + 100 * r)
        runs = []
        for prec in ("fp32", precision):
            model = _model(device, seed + 100 * r)
            opt = BregTop(model.parameters(), method=method, lr=3e-3)
            for k, (x, y) in enumerate(batches):
                if k == len(batches) - 1:  # the measured step
                    for group in opt.param_groups:
                        group["rotation_precision"] = prec
                    before = _flat(model)
                opt.zero_grad()
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
            runs.append(_flat(model) - before)
        errors.append(float((runs[1] - runs[0]).norm() / runs[0].norm()))
    return errors


@dataclass(frozen=True)
class PrecisionRow:
    precision: str
    emulated: bool
    one_step_rel_error_median: float
    one_step_rel_error_max: float
    run_steps: int
    run_rel_distance: float  # |w_prec - w_fp32| / |w_fp32 - w_0|
    final_loss: float
    final_loss_fp32: float


def measure(device: torch.device, steps: int, repeats: int, method: str, seed: int = 0) -> list[PrecisionRow]:
    """One row per precision but fp32, each against fp32 measured in the same call."""
    w0 = _flat(_model(device, seed))
    ref, ref_loss = _train("fp32", steps, device, seed, method)
    w, loss = _train("fp32", steps, device, seed, method, perturb=PERTURB)
    rows = [PrecisionRow(f"fp32, init x(1+{PERTURB:g} noise)", False, 0.0, 0.0, steps,
                         float((w - ref).norm() / (ref - w0).norm()), loss, ref_loss)]
    with emulated_tf32():
        for precision in ROTATION_PRECISIONS[1:]:
            errors = _one_step_errors(precision, device, seed, method, repeats)
            w, loss = _train(precision, steps, device, seed, method)
            rows.append(PrecisionRow(
                precision, precision == "tf32" and device.type != "cuda", statistics.median(errors), max(errors),
                steps, float((w - ref).norm() / (ref - w0).norm()), loss, ref_loss))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                        help="where to run (default: cuda when there is one)")
    parser.add_argument("--steps", type=positive_int, default=300, help="steps of the run (default 300)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="one-step measurements (default 5)")
    parser.add_argument("--method", default="bregtop-vn-v2", help="BregTop method (default bregtop-vn-v2)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the JSON goes")


def run(args: argparse.Namespace) -> int:
    rows = measure(torch.device(args.device), args.steps, args.repeats, args.method)
    print(f"{'precision':<24}{'one step (median / max)':>26}{'run distance':>14}{'loss':>10}{'fp32 loss':>11}")
    for r in rows:
        name = r.precision + (" (emulated)" if r.emulated else "")
        print(f"{name:<24}{r.one_step_rel_error_median:>13.2e} / {r.one_step_rel_error_max:.2e}"
              f"{r.run_rel_distance:>14.2e}{r.final_loss:>10.4g}{r.final_loss_fp32:>11.4g}")
    write_json(args.out, {"suite": "precision", "machine": machine_info(), "code": code_version(),
                          "device": args.device, "method": args.method, "rows": [asdict(r) for r in rows]})
    print(f"wrote {args.out}")
    return 0
