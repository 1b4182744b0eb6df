"""A param group's Kronecker work as this rank runs it: every block of the group (with its
owner and refresh phase), the communication that feeds the owners, and this rank's owned
blocks stacked by shape, each stack stepping its blocks with a few batched kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bregtop_dist.core.block_state import KronBlockState
from bregtop_dist.core.block_step import (
    BlockHyper,
    BlockStepResult,
    Schedule,
    kron_block_step,
    with_graft_moment,
)
from bregtop_dist.distributed.assignment import Block, plan_blocks
from bregtop_dist.distributed.exchange import Exchange
from bregtop_dist.distributed.layout import Piece
from bregtop_dist.distributed.stack_views import StackViews


@dataclass
class BlockStack:
    """This rank's owned blocks of one plan that share a shape, with their stacked state."""

    plan: str
    shape: tuple[int, int]
    block_ids: list[int]  # indices into the plan's blocks
    phases: Tensor  # (B,) int64 refresh phases, on the CPU
    state: KronBlockState | None = field(default=None)
    _schedules: dict[tuple[int, int, torch.device], Schedule] = field(default_factory=dict, repr=False)
    _grad: Tensor | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        m, n = self.shape
        return f"{self.plan}:{m}x{n}"

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of every state field of this stack."""
        return KronBlockState.shapes(*self.shape, len(self.block_ids))

    def schedule(self, base: KronBlockState, rows: list[int], frequency: int, device: torch.device) -> Schedule:
        """Which of ``rows`` refresh their bases at this step: this stack is the one place that
        decides it. A whole stack whose blocks are all ready at one step count takes its
        phase's schedule, built once per phase and kept (a steady step neither reads the host
        counts nor uploads an index); otherwise every row's own count decides."""
        taken = base.uniform_step() if len(rows) == len(self.block_ids) else None
        if taken is None:
            idx = torch.tensor(rows, dtype=torch.int64)  # CPU, like the step counts
            return Schedule.at(base.step.index_select(0, idx) + 1, self.phases.index_select(0, idx), frequency, device)
        key = ((taken + 1) % frequency, frequency, device)
        if key not in self._schedules:
            self._schedules[key] = Schedule.at(torch.tensor(taken + 1), self.phases, frequency, device, every_ready=True)
        return self._schedules[key]

    def grad_buffer(self, device: torch.device) -> Tensor:
        """The stack's gradients (B, m, n) float32, one buffer kept across steps: the step's
        foreach copy writes into fixed views of it."""
        if self._grad is None or self._grad.device != device:
            self._grad = torch.empty((len(self.block_ids), *self.shape), dtype=torch.float32, device=device)
        return self._grad

    def empty_state(self, device: torch.device | str = "cpu") -> KronBlockState:
        """State for every block of the stack, none of them ready (see :meth:`KronBlockState.empty`)."""
        return KronBlockState.empty(*self.shape, len(self.block_ids), device)

    def step(self, rows: list[int], grad: Tensor, hyper: BlockHyper) -> StackStep:
        """Algorithm 1 on the blocks ``rows`` of the stack (gradients ``grad``) with the
        refreshes of :meth:`schedule`, nothing committed."""
        base = with_graft_moment(self.state if self.state is not None else self.empty_state(grad.device), hyper)
        whole = len(rows) == len(self.block_ids)
        schedule = self.schedule(base, rows, hyper.frequency, grad.device)
        result = kron_block_step(base if whole else base.select(torch.tensor(rows, dtype=torch.int64)), grad, hyper, schedule)
        if schedule.every_ready:
            taken = base.uniform_step()
            assert taken is not None  # what made the schedule every_ready
            result.state.remember_uniform_step(taken + 1)
            return StackStep(self, base, rows, whole, grad, result, schedule.rows is not None)
        return StackStep(self, base, rows, whole, grad, result, result.failed is not None)

    def commit(self, done: StackStep) -> None:
        """Keep the state ``done`` computed (for its rows)."""
        if done.whole:
            self.state = done.result.state
        else:
            done.base.assign(torch.tensor(done.rows, dtype=torch.int64), done.result.state)
            self.state = done.base


@dataclass
class StackStep:
    """One stack's computed step: the state it started from, the rows it ran, the result."""

    stack: BlockStack
    base: KronBlockState
    rows: list[int]  # rows of the stack
    whole: bool
    grad: Tensor
    result: BlockStepResult
    refreshed: bool  # some basis was recomputed (or initialised): the bases changed


@dataclass
class KronPlan:
    """All blocks of one group's Kronecker parameters and this rank's part in them."""

    key: str
    blocks: list[Block]
    exchange: Exchange
    stacks: dict[tuple[int, int], BlockStack]
    device: torch.device  # where the state and the exchanged gradients live
    params: list[Tensor]  # the Kronecker parameters, indexed by Block.param: their state's keys
    names: list[str]
    views: StackViews | None = None  # the owned stacks in this rank's own parameters (replicated layouts)


def is_kron_shape(shape: tuple[int, ...], bregtop_group: bool) -> bool:
    """Matrices (ndim >= 2) of a BregTop group; everything else runs on the AdamW side."""
    return bregtop_group and len(shape) >= 2


def build_plan(
    key: str, pieces: list[Piece], max_dim: int, frequency: int, stagger: bool,
    rank: int, world: int, parts: tuple[int, int] = (1, 0), graft: bool = False,
) -> KronPlan:
    """Cut ``pieces``' parameters into blocks (``parts``: equal parts along a side first), pick
    owners, and stack this rank's owned blocks by shape (their state starts empty: no block is
    ready before its first non-zero gradient; ``graft``: with the grafting's moments, so that a
    checkpoint template made before the first step has them)."""
    blocks = plan_blocks([s.shape for s in pieces], max_dim, frequency, stagger, world, parts)
    replicated = all(s.everywhere for s in pieces)
    exchange = Exchange.build(blocks, [s.held for s in pieces], rank, world, replicated)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, blk in enumerate(blocks):
        if blk.owner == rank:
            by_shape.setdefault(blk.shape, []).append(i)
    device = pieces[0].value.device
    stacks = {
        shape: BlockStack(
            key, shape, ids, torch.tensor([blocks[i].phase for i in ids], dtype=torch.int64),
            KronBlockState.empty(*shape, len(ids), device, graft),
        )
        for shape, ids in by_shape.items()
    }
    views = StackViews({shape: st.block_ids for shape, st in stacks.items()}, blocks) if replicated else None
    return KronPlan(key, blocks, exchange, stacks, device, [s.param for s in pieces], [s.name for s in pieces], views)
