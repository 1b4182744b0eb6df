"""``python -m launch.kron_regression``: the first-state candidates on a Kronecker regression,
at three loss scales (issue 28, item 3).

The problem is a stochastic, ill-conditioned matrix regression built for Kronecker
preconditioners: loss ``scale * 0.5 |B^1/2 (W X - Y)|^2 / batch`` with inputs
``X ~ N(0, A)``, so the Hessian is ``A (x) B``, both factors with condition number 1e3; W (24 x
32) starts at zero and trains 300 steps of batch 64. The figure is the final excess loss
``0.5 |B^1/2 (W - W*) A^1/2|^2`` (at scale 1, whatever the training scale).

For every loss scale, seed and optimizer (AdamW, and each BregTop method under each ``init``)
it sweeps the learning rate and reports two ratios to AdamW's best loss at that scale:

- **tuned**: the optimizer at its own best lr for that scale (what a user who sweeps gets);
- **carried**: the optimizer at the lr that was best at scale 1 (what a user gets who changes
  the loss's units, a sum instead of a mean, without sweeping again). A method whose first
  steps depend on the gradient's scale loses here; AdamW does not.

Writes OUT/results.json and OUT/table.md, and prints the table.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bregtop_dist import BregTop
from launch.bench import code_version, machine_info
from launch.cli import OneLineParser

LRS = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0)
SCALES = (1e-2, 1.0, 1e2)
MakeOpt = Callable[[list[torch.nn.Parameter], float], torch.optim.Optimizer]


def _sqrt_spd(gen: torch.Generator, d: int, cond: float) -> torch.Tensor:
    q = torch.linalg.qr(torch.randn(d, d, generator=gen)).Q
    return q @ torch.diag(torch.logspace(0, -math.log10(cond), d).sqrt()) @ q.T


def final_loss(make_opt: MakeOpt, lr: float, seed: int, loss_scale: float = 1.0, steps: int = 300,
               m: int = 24, n: int = 32, batch: int = 64) -> float:
    """The excess loss after ``steps`` steps of ``make_opt(params, lr)`` on the problem of ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    a_half, b_half = _sqrt_spd(gen, n, 1e3), _sqrt_spd(gen, m, 1e3)
    w_star = torch.randn(m, n, generator=gen)
    w = torch.nn.Parameter(torch.zeros(m, n))
    opt = make_opt([w], lr)
    for _ in range(steps):
        x = a_half @ torch.randn(n, batch, generator=gen)
        noise = 0.01 * torch.randn(m, batch, generator=gen)
        loss = loss_scale * 0.5 * (b_half @ ((w - w_star) @ x) + noise).pow(2).sum() / batch
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = float(0.5 * (b_half @ (w - w_star) @ a_half).pow(2).sum())
    return out if math.isfinite(out) else math.inf


def optimizers(methods: list[str], inits: list[str]) -> dict[str, MakeOpt]:
    """AdamW and every (method, init), by the name the table gives them."""
    out: dict[str, MakeOpt] = {"adamw": lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.0)}
    for method in methods:
        for init in inits:
            out[f"{method} {init}"] = lambda p, lr, m=method, i=init: BregTop(p, lr=lr, method=m, init=i)
    return out


def measure(names: dict[str, MakeOpt], seeds: list[int], scales: tuple[float, ...] = SCALES,
            lrs: tuple[float, ...] = LRS) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """losses[name][seed][scale][lr], every key a string (JSON)."""
    return {name: {str(seed): {str(scale): {str(lr): final_loss(make, lr, seed, scale) for lr in lrs}
                               for scale in scales} for seed in seeds} for name, make in names.items()}


def ratios(losses: dict[str, dict[str, dict[str, dict[str, float]]]]) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Per optimizer and scale, the seeds' ``tuned`` and ``carried`` ratios to AdamW's best (see
    the module docstring)."""
    out: dict[str, dict[str, dict[str, list[float]]]] = {}
    base = losses["adamw"]
    for name, per_seed in losses.items():
        out[name] = {}
        for seed, per_scale in per_seed.items():
            at_one = per_scale[str(1.0)]
            carried_lr = min(at_one, key=lambda lr: at_one[lr])
            for scale, per_lr in per_scale.items():
                adamw = min(base[seed][scale].values())
                cell = out[name].setdefault(scale, {"tuned": [], "carried": []})
                cell["tuned"].append(min(per_lr.values()) / adamw)
                cell["carried"].append(per_lr[carried_lr] / adamw)
    return out


def markdown(table: dict[str, dict[str, dict[str, list[float]]]], seeds: list[int]) -> str:
    scales = list(next(iter(table.values())))
    head = " | ".join(f"x{float(s):g} tuned | x{float(s):g} carried" for s in scales)
    lines = [f"Final excess loss over tuned AdamW's at the same loss scale: median over seeds {seeds} "
             "(min-max); tuned: the optimizer's best lr at that scale, carried: its best lr at scale 1.",
             "", f"| optimizer | {head} |", "|---|" + "---|" * (2 * len(scales))]
    for name, per_scale in table.items():
        cells = []
        for scale in scales:
            for kind in ("tuned", "carried"):
                values = per_scale[scale][kind]
                cells.append(f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m launch.kron_regression", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default="kl,vn-v2,bregtop-vn-v2", help="comma-separated BregTop methods")
    parser.add_argument("--inits", default="first-gradient,first-gradient-unit", help="comma-separated inits")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--out", type=Path, default=Path("runs/kron-regression"))
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    begin, version = time.perf_counter(), code_version()  # the code as the run starts
    losses = measure(optimizers(args.methods.split(","), args.inits.split(",")), seeds)
    table = ratios(losses)
    text = markdown(table, seeds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(
        {"losses": losses, "ratios": table, "lrs": list(LRS), "scales": list(SCALES), "seeds": seeds,
         "machine": machine_info(), "code_version": version, "wall_s": time.perf_counter() - begin},
        indent=1) + "\n")
    (args.out / "table.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
