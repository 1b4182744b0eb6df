"""Sharded BregTop against the world size: bytes per rank, optimizer time per rank, jitter.

For each world size W (CPU processes on gloo, one torch thread each) and each layout, the
matrices of a small transformer are stepped by BregTop:

- replicated: plain tensors, as under DDP; owners all-gather their updates;
- sharded: ``Shard(0)`` DTensors, as under FSDP2; one all_to_all each way.

Per configuration it reports the elements each rank receives per step against the theory
(sharded ``2 (W-1) P / W^2``, replicated ``(W-1) P / W``; P the parameter count), the rank's
own CPU time in ``opt.step()`` (the work it does: it should fall like 1/W), the wall time of
a step (the slowest rank; meaningful only while W <= cores), its max/median with staggered
and with synchronised refreshes, and the Kronecker state bytes per rank. The method is
``bregtop-vn-v2`` (the top-set selection on top of the step; the figures in docs/benchmarks.md).

All configurations of one world size are warmed up together (set-up step and one refresh
period), then timed in interleaved windows of ``--steps`` steps, ``--repeats`` times, so a
slow spell of the machine hits each of them alike. Medians are over all timed steps (CPU)
or over windows (wall: the window's median step; max: the window's largest step).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bregtop_dist import BregTop
from bregtop_dist.distributed.layout import chunk_rows
from launch.bench import code_version, machine_info, write_json
from launch.bench.optimizer import make_grad_pool, make_params, transformer_shapes
from launch.cli import positive_int

HELP = "bytes per rank, per-rank optimizer time and step jitter of sharded BregTop vs world size"
DEFAULT_OUT = Path("runs/bench/dist.json")
LAYOUTS = ("replicated", "sharded")
GRAD_POOL = 4
METHOD = "bregtop-vn-v2"  # the method the figures in docs/benchmarks.md were measured with


@dataclass(frozen=True)
class Sizes:
    layers: int
    dim: int
    steps: int
    frequency: int
    repeats: int
    worlds: tuple[int, ...]


FULL = Sizes(layers=4, dim=256, steps=20, frequency=10, repeats=3, worlds=(1, 2, 4))
QUICK = Sizes(layers=1, dim=32, steps=4, frequency=2, repeats=1, worlds=(1, 2))


def _params(layout: str, world: int, rank: int, sizes: Sizes) -> tuple[list[nn.Parameter], Any]:
    """The model's matrices as this rank holds them, and a function that installs a gradient
    set (full tensors) the same way."""
    shapes = transformer_shapes(sizes.layers, sizes.dim)
    full = make_params(shapes, seed=0)
    if layout == "replicated" or world == 1:

        def set_grads(grads: list[torch.Tensor]) -> None:
            for p, g in zip(full, grads):
                p.grad = g.clone()

        return full, set_grads

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))

    def local(t: torch.Tensor) -> DTensor:
        a, b = chunk_rows(t.shape[0], world)[rank]
        return DTensor.from_local(t[a:b].clone(), mesh, [Shard(0)], run_check=False, shape=t.shape, stride=t.stride())

    params = [nn.Parameter(local(p.detach())) for p in full]

    def set_grads_sharded(grads: list[torch.Tensor]) -> None:
        for p, g in zip(params, grads):
            p.grad = local(g)

    return params, set_grads_sharded


@dataclass
class _Config:
    """One optimizer being measured on this rank, with its per-window timings."""

    layout: str
    stagger: bool
    opt: BregTop
    set_grads: Any
    n_params: int
    cpus: list[float]
    walls: list[float]


def _start(layout: str, stagger: bool, rank: int, world: int, sizes: Sizes, pool: list[list[torch.Tensor]]) -> _Config:
    params, set_grads = _params(layout, world, rank, sizes)
    opt = BregTop(params, lr=1e-3, method=METHOD, precondition_frequency=sizes.frequency, max_precond_dim=sizes.dim,
                  stagger_refresh=stagger)
    for step in range(sizes.frequency + 1):  # set-up step and one refresh of every block
        set_grads(pool[step % GRAD_POOL])
        opt.step()
    return _Config(layout, stagger, opt, set_grads, sum(p.numel() for p in params), [], [])  # global numel


def _window(cfg: _Config, world: int, sizes: Sizes, pool: list[list[torch.Tensor]]) -> None:
    """``sizes.steps`` timed steps: this rank's CPU time in ``step()``, and the wall time until
    the slowest rank is done."""
    for step in range(sizes.steps):
        cfg.set_grads(pool[step % GRAD_POOL])
        if world > 1:
            dist.barrier()
        wall0, cpu0 = time.perf_counter(), time.thread_time()
        cfg.opt.step()
        cfg.cpus.append(time.thread_time() - cpu0)
        if world > 1:
            dist.barrier()
        cfg.walls.append(time.perf_counter() - wall0)


def _summary(cfg: _Config, sizes: Sizes, rank: int, world: int) -> dict[str, Any]:
    per_window = [cfg.walls[i : i + sizes.steps] for i in range(0, len(cfg.walls), sizes.steps)]
    _, received = cfg.opt.traffic()
    state = sum(
        t.numel() * t.element_size()
        for s in cfg.opt.kron_stacks.values() if s.state is not None
        for t in s.state.tensors().values()
    )
    return {
        "layout": cfg.layout, "stagger": cfg.stagger, "world": world, "rank": rank,
        "received_per_step": received / (sizes.frequency + 1 + len(cfg.walls)),
        "cpu_median_s": statistics.median(cfg.cpus),
        "wall_median_s": statistics.median(statistics.median(w) for w in per_window),
        "wall_mean_s": statistics.fmean(cfg.walls),
        "wall_max_s": statistics.median(max(w) for w in per_window),
        "state_bytes": state,
        "n_params": cfg.n_params,
    }


def _worker(rank: int, world: int, workdir: str, sizes: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world)
    sz = Sizes(**{**sizes, "worlds": tuple(sizes["worlds"])})
    pool = make_grad_pool(transformer_shapes(sz.layers, sz.dim), GRAD_POOL, seed=1)
    configs = [_start(layout, stagger, rank, world, sz, pool) for layout in LAYOUTS for stagger in (True, False)]
    for _ in range(sz.repeats):  # interleaved, so a slow spell of the machine hits every configuration
        for cfg in configs:
            _window(cfg, world, sz, pool)
    rows = [_summary(cfg, sz, rank, world) for cfg in configs]
    Path(workdir, f"rank{rank}.json").write_text(json.dumps(rows))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, sizes: Sizes) -> list[dict[str, Any]]:
    """Every configuration on ``world`` processes; one row per configuration, combined over
    ranks (worst rank for times and bytes)."""
    with tempfile.TemporaryDirectory() as workdir:
        mp.start_processes(_worker, args=(world, workdir, asdict(sizes)), nprocs=world, start_method="spawn")
        per_rank = [json.loads(Path(workdir, f"rank{r}.json").read_text()) for r in range(world)]
    rows = []
    for configs in zip(*per_rank):
        first = configs[0]
        p = first["n_params"]  # global: a DTensor's numel is its global size
        theory = (world - 1) * p / world if first["layout"] == "replicated" else 2 * (world - 1) * p / world**2
        rows.append({
            "layout": first["layout"], "stagger": first["stagger"], "world": world, "n_params": p,
            "received_per_step": max(c["received_per_step"] for c in configs),
            "theory_per_step": theory,
            "cpu_median_s": max(c["cpu_median_s"] for c in configs),
            "wall_median_s": max(c["wall_median_s"] for c in configs),
            "wall_mean_s": max(c["wall_mean_s"] for c in configs),
            "wall_max_s": max(c["wall_max_s"] for c in configs),
            "state_bytes_per_rank": max(c["state_bytes"] for c in configs),
        })
    return rows


def add_ratios(rows: list[dict[str, Any]]) -> None:
    """CPU time and state per rank relative to the one-process run of the same configuration."""
    base = {(r["layout"], r["stagger"]): r for r in rows if r["world"] == 1}
    for r in rows:
        b = base.get((r["layout"], r["stagger"]))
        r["cpu_vs_world1"] = r["cpu_median_s"] / b["cpu_median_s"] if b else None
        r["state_vs_world1"] = r["state_bytes_per_rank"] / b["state_bytes_per_rank"] if b else None
        r["max_over_median"] = r["wall_max_s"] / r["wall_median_s"]


def format_table(rows: list[dict[str, Any]]) -> str:
    head = (f"{'layout':<11}{'refresh':<9}{'W':>3}{'recv elem/step':>16}{'theory':>12}{'ratio':>7}"
            f"{'cpu ms':>9}{'cpu/W=1':>9}{'wall ms':>9}{'mean ms':>9}{'max/med':>9}{'state/W=1':>11}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ratio = r["received_per_step"] / r["theory_per_step"] if r["theory_per_step"] else float("nan")
        lines.append(
            f"{r['layout']:<11}{'stagger' if r['stagger'] else 'sync':<9}{r['world']:>3}"
            f"{r['received_per_step']:>16,.0f}{r['theory_per_step']:>12,.0f}{ratio:>7.2f}"
            f"{r['cpu_median_s'] * 1e3:>9.1f}{r['cpu_vs_world1'] or float('nan'):>9.2f}"
            f"{r['wall_median_s'] * 1e3:>9.1f}{r['wall_mean_s'] * 1e3:>9.1f}{r['max_over_median']:>9.2f}{r['state_vs_world1'] or float('nan'):>11.2f}"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worlds", type=_worlds, help=f"comma-separated world sizes (default {_fmt(FULL.worlds)})")
    for flag, what in (("--layers", "transformer layers"), ("--dim", "model width (also max_precond_dim)"),
                       ("--steps", "timed steps per window, a multiple of the frequency"), ("--frequency", "precondition frequency T"),
                       ("--repeats", "interleaved timed windows per configuration")):
        field = flag[2:]
        parser.add_argument(flag, type=positive_int, help=f"{what} (default {getattr(FULL, field)}; --quick {getattr(QUICK, field)})")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="PATH.json", help=f"JSON output (default {DEFAULT_OUT})")


def _fmt(worlds: tuple[int, ...]) -> str:
    return ",".join(map(str, worlds))


def _worlds(text: str) -> tuple[int, ...]:
    try:
        worlds = tuple(sorted({int(w) for w in text.split(",") if w.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers >= 1") from None
    if not worlds or worlds[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not allowed; world sizes are integers >= 1")
    return worlds


def run(args: argparse.Namespace) -> int:
    base = QUICK if args.quick else FULL
    given = {k: getattr(args, k) for k in ("worlds", "layers", "dim", "steps", "frequency", "repeats") if getattr(args, k) is not None}
    sizes = replace(base, **given)
    if sizes.steps % sizes.frequency:
        print(f"python -m launch.bench dist: error: --steps={sizes.steps} must be a multiple of --frequency="
              f"{sizes.frequency}, so every run sees the same refresh phases", file=sys.stderr)
        return 2
    machine, version = machine_info(), code_version()
    rows = [row for world in sizes.worlds for row in run_world(world, sizes)]
    add_ratios(rows)
    result = {"machine": machine, "code_version": version, "settings": asdict(sizes), "rows": rows}
    write_json(args.out, result)
    print(f"machine: {machine['processor']} ({machine['machine']}), {machine['cpu_count']} CPUs, torch "
          f"{machine['torch']}, 1 thread per rank, {machine['date_utc']}; code {version}")
    print(f"model: {sizes.layers} layers, dim {sizes.dim} ({rows[0]['n_params']:,} matrix params), "
          f"T={sizes.frequency}; warm-up {sizes.frequency + 1} steps, then {sizes.repeats} interleaved windows of "
          f"{sizes.steps} steps per configuration; times are medians over windows")
    print()
    print(format_table(rows))
    print(f"\nwrote {args.out}")
    return 0

