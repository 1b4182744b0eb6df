"""A param group's Kronecker work as this rank runs it: every block of the group (with its
owner and refresh offset), the communication that feeds the owners, and this rank's owned
blocks stacked by shape so that one step runs a few batched kernels per shape.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bregtop_dist.core.block_step import KronBlockState
from bregtop_dist.distributed.assignment import Block, plan_blocks
from bregtop_dist.distributed.exchange import Exchange
from bregtop_dist.distributed.layout import ParamShard

HOST_FIELDS = ("step", "ready")
"""Block state fields kept on the CPU: the host schedules from them without a device sync."""


@dataclass
class BlockStack:
    """This rank's owned blocks of one plan that share a shape, with their stacked state."""

    plan: str
    shape: tuple[int, int]
    block_ids: list[int]  # indices into the plan's blocks
    offsets: Tensor  # (B,) int64 refresh offsets, on the CPU
    state: KronBlockState | None = field(default=None)

    @property
    def key(self) -> str:
        m, n = self.shape
        return f"{self.plan}:{m}x{n}"

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of every state field of this stack, as :meth:`empty_state` makes them."""
        bsz = len(self.block_ids)
        m, n = self.shape
        f32 = torch.float32
        return {
            "momentum": ((bsz, m, n), f32),
            "L": ((bsz, m, m), f32),
            "R": ((bsz, n, n), f32),
            "U_L": ((bsz, m, m), f32),
            "U_R": ((bsz, n, n), f32),
            "lam_L": ((bsz, m), f32),
            "lam_R": ((bsz, n), f32),
            "step": ((bsz,), torch.int64),
            "ready": ((bsz,), torch.bool),
        }

    def empty_state(self, device: torch.device | str = "cpu") -> KronBlockState:
        """Zero state for every block, none of them ready (initialised by its first non-zero
        gradient): identity bases and unit eigenvalue estimates."""
        fields = {
            name: torch.zeros(shape, dtype=dtype, device="cpu" if name in HOST_FIELDS else device)
            for name, (shape, dtype) in self.state_shapes().items()
        }
        for basis in ("U_L", "U_R"):
            fields[basis] += torch.eye(fields[basis].shape[-1], device=device)
        for lam in ("lam_L", "lam_R"):
            fields[lam] += 1.0
        return KronBlockState(**fields)


@dataclass
class KronPlan:
    """All blocks of one group's Kronecker parameters and this rank's part in them."""

    key: str
    blocks: list[Block]
    exchange: Exchange
    stacks: dict[tuple[int, int], BlockStack]
    device: torch.device  # where the state and the exchanged gradients live


def is_kron_shape(shape: tuple[int, ...], bregtop_group: bool) -> bool:
    """Matrices (ndim >= 2) of a BregTop group; everything else runs on the AdamW side."""
    return bregtop_group and len(shape) >= 2


def build_plan(
    key: str, shards: list[ParamShard], max_dim: int, frequency: int, stagger: bool,
    rank: int, world: int,
) -> KronPlan:
    """Cut ``shards`` into blocks, pick owners, and stack this rank's owned blocks by shape."""
    blocks = plan_blocks([s.shape for s in shards], max_dim, frequency, stagger, world)
    replicated = all(r == (0, math.prod(s.shape)) for s in shards for r in s.ranges)
    exchange = Exchange.build(blocks, [s.ranges for s in shards], rank, world, replicated)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, blk in enumerate(blocks):
        if blk.owner == rank:
            by_shape.setdefault(blk.shape, []).append(i)
    stacks = {
        shape: BlockStack(key, shape, ids, torch.tensor([blocks[i].offset for i in ids], dtype=torch.int64))
        for shape, ids in by_shape.items()
    }
    return KronPlan(key, blocks, exchange, stacks, shards[0].value.device)
