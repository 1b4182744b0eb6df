"""Host-device synchronisations of BregTop steps on GPT-2 small, counted by file:line.

Builds the project's GPT (:class:`launch.models.GPT`; GPT-2 small's 12 layers at width
768 / ``--scale``, ``max_precond_dim`` 1024 / ``--scale``: 48 matrices, stacks of 48, 36 and 36
blocks), gives every parameter a fixed random gradient and steps ``bregtop-vn-v2`` with the
paper's grouping (the matrices in blocks, the rest on the AdamW side): one step to initialise,
one refresh period to reach the steady state, then ``--steps`` counted steps (one refresh
period by default, so refresh steps are among them), then the same steps timed.

Two counts, each by the innermost line of the project (bregtop_dist, triton_kernels, launch)
that led to the event:

* on CUDA, every synchronising call torch reports under
  ``torch.cuda.set_sync_debug_mode("warn")`` (the host waits for the device);
* on any device, every scalar read of a tensor (``aten._local_scalar_dense``: ``item()``,
  ``bool()``, ``float()``, ``int()``): on a GPU those of device tensors are syncs; on a CPU,
  where the first count does not exist, this one says where the syncs would be (run it with
  ``BREGTOP_ACCELERATOR_PATHS=1`` for the code paths CUDA takes, as scripts/gpu_check.sh does).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: the project's packages first

from bregtop_dist import BregTop, param_groups  # noqa: E402
from bregtop_dist.core.dispatch import accelerator_paths  # noqa: E402
from launch.bench import Timing, device_clock, samples  # noqa: E402
from launch.bench.counters import OpCounter, cuda_syncs  # noqa: E402
from launch.bench.kernels import model_stacks  # noqa: E402
from launch.models import GPT  # noqa: E402


def build(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, BregTop, list[list[torch.Tensor]]]:
    """GPT-2 small at 1/scale width, BregTop on it, and two sets of gradients to alternate."""
    dim, max_dim = 768 // args.scale, 1024 // args.scale
    torch.manual_seed(0)
    with torch.device(device):
        model = GPT(args.vocab, 12, max(1, dim // 64), dim, 64)
    opt = BregTop(param_groups(model), lr=1e-4, method=args.method, max_precond_dim=max_dim)
    gen = torch.Generator().manual_seed(1)
    grads = [[(torch.randn(p.shape, generator=gen) * 1e-3).to(device) for p in model.parameters()] for _ in range(2)]
    return model, opt, grads


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Warm up, count syncs and scalar reads over ``args.steps`` steps, then time them."""
    device = torch.device(args.device)
    model, opt, grads = build(args, device)
    params = list(model.parameters())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step(k: int) -> None:
        for p, g in zip(params, grads[k % 2]):
            p.grad = g
        opt.step()

    period = int(opt.param_groups[0]["precondition_frequency"])
    clock = device_clock(device)
    start = clock()
    for k in range(1 + period):
        step(k)
    warmup_s = clock() - start
    reads = OpCounter(by_line=True)
    with cuda_syncs(device.type == "cuda") as syncs, reads:
        for k in range(args.steps):
            step(k)
        sync()
    counted = iter(range(args.steps))
    times = samples(lambda: step(next(counted)), device, Timing(args.steps, warmup=0))[0]
    kron = [p for g in opt.param_groups if g.get("bregtop") for p in g["params"]]
    return {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "method": args.method,
        "model": {"layers": 12, "dim": 768 // args.scale, "vocab": args.vocab, "scale": args.scale,
                  "max_precond_dim": 1024 // args.scale, "matrices": len(kron),
                  "stacks": model_stacks(model, 1024 // args.scale)},
        "steps": args.steps,
        "warmup_s": warmup_s,
        "accelerator_paths": accelerator_paths(device),
        "sync_debug_mode": device.type == "cuda",
        "syncs_total": sum(syncs.values()) if device.type == "cuda" else None,
        "syncs_per_step": sum(syncs.values()) / args.steps if device.type == "cuda" else None,
        "syncs_by_line": dict(syncs.most_common()),
        "scalar_reads_total": sum(reads.by_line.values()),
        "scalar_reads_per_step": sum(reads.by_line.values()) / args.steps,
        "scalar_reads_by_line": dict(reads.by_line.most_common()),
        "step_ms_median": 1e3 * statistics.median(times),
        "step_ms_mean": 1e3 * statistics.fmean(times),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=int, default=1, help="divide width and max_precond_dim by this (16: tiny)")
    parser.add_argument("--vocab", type=int, default=50257)
    parser.add_argument("--method", default="bregtop-vn-v2")
    parser.add_argument("--steps", type=int, default=10, help="counted steps (default: one refresh period)")
    parser.add_argument("--out", type=Path, default=Path("runs/gpu_check/syncs.json"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = measure(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    per_step = result["syncs_per_step"]
    print(f"{result['device']}: {result['model']['matrices']} matrices, stacks {result['model']['stacks']}; "
          f"step {result['step_ms_median']:.1f} ms median, {result['step_ms_mean']:.1f} ms mean")
    print(f"syncs per step: {'n/a (not CUDA)' if per_step is None else f'{per_step:.1f}'}; "
          f"scalar reads per step: {result['scalar_reads_per_step']:.1f}")
    for kind in ("syncs_by_line", "scalar_reads_by_line"):
        for line, n in list(result[kind].items())[:10]:
            print(f"  {kind.split('_by')[0]:>12} {n:>5}  {line}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
