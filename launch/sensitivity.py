"""How much a one-ulp change of the input moves the optimizer's update (issue 25).

For every method, on single Kronecker blocks of the shapes that trouble a Kronecker optimizer
(1 x n, m x 1, square, and both rectangles), fed gradients like a Linear layer's
(``G = D^T X / b`` with a batch b smaller than the sides, so that the factors start
rank-deficient, and decaying activation spectra):

1. run ``t`` steps (``t = 0``: the perturbation hits the first gradient; later ``t``: a state
   that has seen ``t`` gradients);
2. run the same gradients again with the t-th one moved by one ulp per entry (random
   direction), or, for ``state``, with every entry of the state (momentum, factors, bases,
   estimates) moved by one ulp before step t (t >= 1: there is a state);
3. report the amplification: the largest relative change of the update over the following
   steps (two refresh periods, refreshes staggered as the optimizer staggers them), divided by
   the relative change of what was moved. A continuous, well-conditioned update gives a
   small number; a choice made by rounding (an undetermined basis, a near-tie in the top set)
   gives about 1/ulp = 1e7.

The gradients after the perturbed one are the same in both runs (open loop), so the figure is
the optimizer's own amplification, not the training dynamics'. Only the public block API is
used, so the same file measures any revision (``PYTHONPATH=<checkout> python launch/sensitivity.py``).

    python -m launch.sensitivity --out docs/results/sensitivity

Writes OUT/sensitivity.json and OUT/sensitivity.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from bregtop_dist.config import METHODS, BregTopConfig
from bregtop_dist.core.block_state import KronBlockState
from bregtop_dist.core.block_step import Schedule, kron_block_step

SHAPES = ((1, 19), (19, 1), (24, 24), (37, 19), (19, 37))
STARTS = (0, 1, 3, 150)  # gradients seen before the perturbed one
BATCH = 8  # smaller than every side above 8: the first factors are rank-deficient
FREQUENCY = 5
OFFSET = 1  # refresh phase: the first refresh comes one step after the first gradient
ULP = 2.0**-24  # float32's unit roundoff: a one-ulp change moves an entry by ULP to 2 ULP relative


def linear_gradients(m: int, n: int, count: int, gen: torch.Generator) -> Iterator[Tensor]:
    """Gradients (1, m, n) float32 of a Linear layer: ``D^T X / b`` with b = BATCH rows of
    activations and output errors whose scales decay by 1e3 and 1e2 across the sides."""
    sx = torch.logspace(0, -3, n, dtype=torch.float64)
    sd = torch.logspace(0, -2, m, dtype=torch.float64)
    for _ in range(count):
        x = torch.randn(BATCH, n, generator=gen, dtype=torch.float64) * sx
        d = torch.randn(BATCH, m, generator=gen, dtype=torch.float64) * sd
        yield (d.T @ x / BATCH).float()[None]


def one_ulp(t: Tensor, gen: torch.Generator) -> Tensor:
    """``t`` with every entry moved to its next float up or down (at random)."""
    up = torch.randint(0, 2, t.shape, generator=gen).bool()
    return torch.where(up, torch.nextafter(t, torch.full_like(t, math.inf)),
                       torch.nextafter(t, torch.full_like(t, -math.inf)))


FLOAT_FIELDS = ("momentum", "L", "R", "U_L", "U_R", "lam_L", "lam_R")


def updates(method: str, grads: list[Tensor], m: int, n: int,
            moved_state: tuple[int, torch.Generator] | None = None) -> tuple[list[Tensor], float]:
    """The block's update at every step of ``grads``; with ``moved_state = (t, gen)`` every
    float entry of the state is moved by one ulp before step t, and the relative change of
    the state (all fields together) is returned too (0.0 otherwise)."""
    hyper = BregTopConfig(method=method, precondition_frequency=FREQUENCY).block_hyper()
    state = KronBlockState.empty(m, n, 1)
    offset = torch.tensor([OFFSET])
    out, rel_in = [], 0.0
    for step, grad in enumerate(grads):
        if moved_state is not None and step == moved_state[0]:
            fields = state.tensors()
            moved = {k: one_ulp(fields[k], moved_state[1]) for k in FLOAT_FIELDS}
            before = torch.cat([fields[k].flatten() for k in FLOAT_FIELDS])
            after = torch.cat([moved[k].flatten() for k in FLOAT_FIELDS])
            rel_in = float((after - before).norm() / before.norm())
            state = KronBlockState(**{**fields, **moved})
        result = kron_block_step(state, grad, hyper, Schedule.at(state.step + 1, offset, hyper.frequency, grad.device))
        state = result.state
        out.append(result.update)
    return out, rel_in


def amplification(method: str, m: int, n: int, start: int, seed: int, what: str = "gradient") -> float:
    """Largest relative change of the update in the 2 * FREQUENCY steps from ``start`` on, over
    the relative change of what moved: gradient ``start``, or (``what="state"``) the state
    before step ``start``, by one ulp."""
    gen = torch.Generator().manual_seed(seed)
    grads = list(linear_gradients(m, n, start + 2 * FREQUENCY, gen))
    base, _ = updates(method, grads, m, n)
    if what == "state":
        other, rel_in = updates(method, grads, m, n, (start, gen))
    else:
        moved = list(grads)
        moved[start] = one_ulp(grads[start], gen)
        rel_in = float((moved[start] - grads[start]).norm() / grads[start].norm())
        other, _ = updates(method, moved, m, n)
    worst = 0.0
    for a, b in list(zip(base, other))[start:]:
        if float(a.norm()) > 0.0:
            worst = max(worst, float((b - a).norm() / a.norm()) / rel_in)
    return worst


def revision() -> str:
    """The commit of the bregtop_dist being measured (plus "+changes" for a dirty tree)."""
    import bregtop_dist

    where = Path(bregtop_dist.__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=where, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "."], capture_output=True, text=True,
                               cwd=where, check=True).stdout.strip()
        return head + ("+changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.sensitivity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated Table 4 rows (default all)")
    parser.add_argument("--seeds", type=int, default=3, help="gradient sequences per cell; the largest is reported")
    parser.add_argument("--out", type=Path, default=None, help="folder for sensitivity.json and sensitivity.md")
    args = parser.parse_args(argv)
    methods = [m for m in args.methods.split(",") if m]
    for m in methods:
        if m not in METHODS:
            parser.error(f"--methods: {m!r} is unknown; allowed: {', '.join(METHODS)}")
    if args.seeds < 1:
        parser.error(f"--seeds={args.seeds} must be at least 1")

    torch.set_num_threads(1)
    began = time.perf_counter()
    table: dict[str, dict[str, dict[str, float]]] = {}
    for method in methods:
        for what in ("gradient", "state"):
            table[f"{method}/{what}"] = {}
            for start in STARTS:
                if what == "state" and start == 0:
                    continue  # no state before the first gradient
                row = {f"{m}x{n}": max(amplification(method, m, n, start, s, what) for s in range(args.seeds))
                       for m, n in SHAPES}
                table[f"{method}/{what}"][str(start)] = row
                print(f"{method:14s} {what:8s} t={start:<4d}" + "".join(f" {k}:{v:9.2e}" for k, v in row.items()),
                      flush=True)
    header = "| method | moved | t | " + " | ".join(f"{m}x{n}" for m, n in SHAPES) + " | worst |"
    lines = [header, "|" + "---|" * (len(SHAPES) + 4)]
    for key, rows in table.items():
        method, what = key.split("/")
        for start, row in rows.items():
            lines.append(f"| {method} | {what} | {start} | " + " | ".join(f"{v:.2g}" for v in row.values())
                         + f" | {max(row.values()):.2g} |")
    summary = {"revision": revision(), "seconds": round(time.perf_counter() - began, 1), "seeds": args.seeds,
               "shapes": [list(s) for s in SHAPES], "starts": list(STARTS), "batch": BATCH,
               "frequency": FREQUENCY, "amplification": table}
    print("\n".join(lines))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sensitivity.json").write_text(json.dumps(summary, indent=1) + "\n")
        (args.out / "sensitivity.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
