"""The plan at scale, on paper: what BregTop asks of each rank for real model shapes.

For GPT-2 XL, Llama-3-8B and Llama-3-70B (built on the meta device: nothing is allocated) and
each layout at each world size W, the optimizer's own plan is built exactly as a rank builds
it at its first step: the Kronecker blocks of ``param_groups(model)``'s matrices
(``max_precond_dim`` 1024, staggered refresh phases over T = 10 steps) and their owners
(:func:`bregtop_dist.distributed.assignment.plan_blocks`), and every rank's box of every
parameter from the layout's placements (:func:`bregtop_dist.distributed.mesh.placement_boxes`):

- ``ddp``: every parameter replicated on W ranks;
- ``fsdp``: FSDP2, ``Shard(0)`` over W;
- ``hsdp``: a (W/8, 8) ("replicate", "shard") mesh, ``(Replicate(), Shard(0))``;
- ``fsdp_tp``: FSDP2 over tensor parallelism on a (W/8, 8) ("dp", "tp") mesh: torchtitan's plan
  (q, k, v and the MLP's gate/up projections column-wise, o and the down projection row-wise;
  GPT-2's fused attention and MLP likewise; the token embedding and the head by rows over "tp"),
  everything else sharded over "dp".

Per rank it reports the optimizer state (the Kronecker blocks it owns plus the AdamW side of
its own pieces) beside torch's AdamW on the same pieces, the elements it sends and receives
per step in the exchange (fp32 on the wire), the block FLOPs of a step and of its heaviest
refresh step (the cost model the owners are balanced with), and the balance (largest rank
over mean, on the heaviest step). Every figure is computed from the plan, none measured on a
device; the time to build the plan (on one CPU core, as every rank does once) is measured.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bregtop_dist import param_groups
from bregtop_dist.block_plan import is_kron_shape
from bregtop_dist.core.block_state import KronBlockState
from bregtop_dist.distributed.assignment import Block, plan_blocks, refresh_cost, step_cost
from bregtop_dist.distributed.layout import Box
from bregtop_dist.distributed.mesh import placement_boxes
from launch.bench import code_version, machine_info, write_json
from launch.models import GPT

HELP = "per-rank state, exchange traffic, block FLOPs and balance of BregTop's plan for GPT-2 XL and Llama-3 8B/70B"
DEFAULT_OUT = Path("runs/bench/plan.json")
LAYOUTS = ("ddp", "fsdp", "hsdp", "fsdp_tp")
WORLDS = (8, 64, 1024)
NODE = 8  # ranks per node: HSDP's shard group and the tensor-parallel degree
MAX_DIM, FREQUENCY = 1024, 10
WIRE_BYTES = 4  # fp32 on the wire
ADAMW_BYTES = 8  # two float32 moments per element


class _LlamaBlock(nn.Module):
    def __init__(self, dim: int, kv: int, ffn: int) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, d, bias=False) for d in (dim, kv, kv, dim))
        self.w1, self.w3 = nn.Linear(dim, ffn, bias=False), nn.Linear(dim, ffn, bias=False)
        self.w2 = nn.Linear(ffn, dim, bias=False)
        self.attention_norm, self.ffn_norm = nn.RMSNorm(dim), nn.RMSNorm(dim)


class _Llama(nn.Module):
    """Llama-3's parameter shapes (grouped-query attention with 8 key/value heads of 128)."""

    def __init__(self, layers: int, dim: int, ffn: int, vocab: int = 128256) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(_LlamaBlock(dim, 1024, ffn) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)


MODELS: dict[str, Callable[[], nn.Module]] = {
    "gpt2-xl": lambda: GPT(50257, 48, 25, 1600, 1024),
    "llama3-8b": lambda: _Llama(32, 4096, 14336),
    "llama3-70b": lambda: _Llama(80, 8192, 28672),
}
# tensor parallelism's column-wise weights (torchtitan also shards the token embedding and the
# output head by rows over "tp") and row-wise ones
COLWISE = ("q", "k", "v", "w1", "w3", "qkv", "mlp.0", "tok_embeddings", "lm_head", "wte")
ROWWISE = ("o", "w2", "proj", "mlp.2")


def _placements(layout: str, name: str, ndim: int) -> tuple[Any, ...]:
    """The placements of parameter ``name`` (one per mesh dimension: 1-D for ddp and fsdp,
    (W/8, 8) for hsdp and fsdp_tp)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    leaf = name.rsplit(".", 1)[0].split("layers.")[-1].split("blocks.")[-1].split(".", 1)[-1]
    matrix = ndim == 2 and name.endswith("weight")
    if layout == "ddp":
        return (Replicate(),)
    if layout == "fsdp":
        return (Shard(0),)
    if layout == "hsdp":
        return (Replicate(), Shard(0))
    if matrix and leaf.endswith(COLWISE):
        return (_StridedShard(0, split_factor=NODE), Shard(0))
    if matrix and leaf.endswith(ROWWISE):
        return (Shard(0), Shard(1))
    return (Shard(0), Replicate())


def held_boxes(layout: str, name: str, shape: tuple[int, ...], world: int) -> list[Box]:
    """Every rank's box of parameter ``name`` under ``layout`` at ``world`` ranks."""
    placements = _placements(layout, name, len(shape))
    return _boxes(shape, placements, world)


@functools.cache
def _boxes(shape: tuple[int, ...], placements: tuple[Any, ...], world: int) -> list[Box]:
    mesh = (world,) if len(placements) == 1 else (world // NODE, NODE)
    return placement_boxes(shape, mesh, placements, mesh, list(range(len(mesh))), lambda: f"{shape} {placements}")


class _Grid:
    """The distinct boxes of one parameter as row bands of column ranges, each with the ranks
    that hold it, for finding the boxes a block meets without visiting every rank."""

    def __init__(self, boxes: list[Box]) -> None:
        classes: dict[Box, list[int]] = {}
        for rank, box in enumerate(boxes):
            if box.numel:
                classes.setdefault(box, []).append(rank)
        bands: dict[tuple[int, int], list[tuple[int, int, tuple[int, ...]]]] = {}
        for box, ranks in classes.items():
            bands.setdefault(box.rows, []).append((box.cols[0], box.cols[1], tuple(ranks)))
        self.rows = sorted(bands)
        self.starts = [r[0] for r in self.rows]
        self.cols = [sorted(bands[r], key=lambda c: c[0]) for r in self.rows]
        self.col_starts = [[c[0] for c in cols] for cols in self.cols]

    def meet(self, r0: int, r1: int, c0: int, c1: int) -> list[tuple[int, tuple[int, ...]]]:
        """(elements, holders) of every distinct box that meets rows [r0, r1) x cols [c0, c1)."""
        out = []
        k = max(bisect.bisect_right(self.starts, r0) - 1, 0)
        while k < len(self.rows) and self.rows[k][0] < r1:
            rows = min(r1, self.rows[k][1]) - max(r0, self.rows[k][0])
            if rows > 0:
                cols, starts = self.cols[k], self.col_starts[k]
                j = max(bisect.bisect_right(starts, c0) - 1, 0)
                while j < len(cols) and cols[j][0] < c1:
                    width = min(c1, cols[j][1]) - max(c0, cols[j][0])
                    if width > 0:
                        out.append((rows * width, cols[j][2]))
                    j += 1
            k += 1
        return out


def _block_state_bytes(m: int, n: int) -> int:
    return sum(math.prod(shape) * dtype.itemsize for shape, dtype in KronBlockState.shapes(m, n, 1).values())


def exchange_elements(blocks: list[Block], grids: list[_Grid], replicated: bool, world: int) -> tuple[np.ndarray, np.ndarray]:
    """Elements each rank sends and receives per step, as the exchange moves them: each
    gradient element from one holder to the block's owner (none when the owner holds it), each
    update element from the owner to every holder; replicated layouts all-gather the owners'
    updates, padded to the largest owner's."""
    sent, received = np.zeros(world), np.zeros(world)
    if replicated:
        owned = np.zeros(world)
        for blk in blocks:
            owned[blk.owner] += blk.numel
        width = owned.max()
        return sent + width * (world - 1), received + width * (world - 1)
    for i, blk in enumerate(blocks):
        s, o = blk.slice, blk.owner
        for count, ranks in grids[blk.param].meet(s.r0, s.r1, s.c0, s.c1):
            if o not in ranks:
                source = ranks[i % len(ranks)]
                sent[source] += count
                received[o] += count
            others = [r for r in ranks if r != o]
            sent[o] += count * len(others)
            for r in others:
                received[r] += count
    return sent, received


@functools.lru_cache(maxsize=4)
def _plan(shapes: tuple[tuple[int, ...], ...], world: int) -> tuple[list[Block], float]:
    """The blocks with their owners and phases, and the seconds building them took (what every
    rank spends once, at its first step)."""
    started = time.perf_counter()
    blocks = plan_blocks(list(shapes), MAX_DIM, FREQUENCY, True, world)
    return blocks, time.perf_counter() - started


def plan_figures(model_name: str, layout: str, world: int) -> dict[str, Any]:
    """The per-rank figures of one model, layout and world size."""
    with torch.device("meta"):
        model = MODELS[model_name]()
    names = {id(p): n for n, p in model.named_parameters()}
    kron: list[tuple[str, tuple[int, ...]]] = []
    side: list[tuple[str, tuple[int, ...]]] = []
    for group in param_groups(model):
        for p in group["params"]:
            (kron if is_kron_shape(tuple(p.shape), group["bregtop"]) else side).append((names[id(p)], tuple(p.shape)))
    blocks, plan_s = _plan(tuple(s for _, s in kron), world)
    kron_boxes = [held_boxes(layout, n, s, world) for n, s in kron]
    side_local = np.zeros(world)
    for n, s in side:
        side_local += [b.numel for b in held_boxes(layout, n, s, world)]
    kron_local = np.zeros(world)
    for boxes in kron_boxes:
        kron_local += [b.numel for b in boxes]
    state = np.zeros(world)
    step_flops = np.zeros(world)
    refresh = np.zeros((world, FREQUENCY))
    for blk in blocks:
        state[blk.owner] += _block_state_bytes(*blk.shape)
        step_flops[blk.owner] += step_cost(*blk.shape)
        refresh[blk.owner, blk.phase] += refresh_cost(*blk.shape)
    grids: dict[int, _Grid] = {}
    for b in kron_boxes:
        grids.setdefault(id(b), _Grid(b))
    sent, received = exchange_elements(blocks, [grids[id(b)] for b in kron_boxes], layout == "ddp", world)
    peak = step_flops + refresh.max(axis=1)
    largest = max(blocks, key=lambda b: b.numel)
    return {
        "model": model_name, "layout": layout, "world": world,
        "parameters": int(sum(math.prod(s) for _, s in kron + side)), "blocks": len(blocks),
        "plan_s": plan_s,
        "bregtop_state_gb": float((state + ADAMW_BYTES * side_local).max() / 1e9),
        "adamw_state_gb": float((ADAMW_BYTES * (side_local + kron_local)).max() / 1e9),
        "exchange_mb": float(((sent + received) * WIRE_BYTES).max() / 1e6),
        "step_tflop": float(step_flops.max() / 1e12),
        "refresh_step_tflop": float(peak.max() / 1e12),
        "balance": float(peak.max() / peak.mean()),
        "largest_block": list(largest.shape), "largest_block_mb": _block_state_bytes(*largest.shape) / 1e6,
        "ranks_without_blocks": int((step_flops == 0).sum()),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated subset of {', '.join(MODELS)}")
    parser.add_argument("--layouts", default=",".join(LAYOUTS), help=f"comma-separated subset of {', '.join(LAYOUTS)}")
    parser.add_argument("--worlds", default=",".join(map(str, WORLDS)), help="comma-separated world sizes (multiples of 8)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, metavar="PATH.json", help=f"JSON output (default {DEFAULT_OUT})")


def _choices(text: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    chosen = [t for t in text.split(",") if t]
    bad = [t for t in chosen if allowed is not None and t not in allowed]
    if bad or not chosen:
        raise SystemExit(f"--{what}: {bad or text!r} not among {', '.join(allowed or ())}")
    return chosen


def run(args: argparse.Namespace) -> int:
    models = _choices(args.models, tuple(MODELS), "models")
    layouts = _choices(args.layouts, LAYOUTS, "layouts")
    worlds = [int(w) for w in _choices(args.worlds, None, "worlds")]
    if any(w < NODE or w % NODE for w in worlds):
        raise SystemExit(f"--worlds: {worlds} must be multiples of {NODE} (HSDP's and tensor parallelism's node)")
    rows = [plan_figures(m, lay, w) for m in models for w in worlds for lay in layouts]
    header = (f"{'model':<11} {'layout':<8} {'W':>5} {'blocks':>6} {'state GB':>9} {'AdamW GB':>9} {'exch MB':>9} "
              f"{'TFLOP/step':>10} {'refresh':>8} {'balance':>7} {'plan s':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['model']:<11} {r['layout']:<8} {r['world']:>5} {r['blocks']:>6} {r['bregtop_state_gb']:>9.3f} "
              f"{r['adamw_state_gb']:>9.3f} {r['exchange_mb']:>9.1f} {r['step_tflop']:>10.3f} "
              f"{r['refresh_step_tflop']:>8.3f} {r['balance']:>7.2f} {r['plan_s']:>7.1f}")
    write_json(args.out, {"machine": machine_info(), "code": code_version(), "rows": rows})
    print(f"wrote {args.out}")
    return 0
