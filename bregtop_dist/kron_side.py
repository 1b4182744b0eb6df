"""The Kronecker side of every param group on this rank: its plans, the step each computes
(gradients to the owners, Algorithm 1 on the owned stacks, nothing written), and the commit
that keeps the new states and returns the parameter updates as (view, update) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bregtop_dist.block_plan import BlockStack, KronPlan, StackStep, build_plan
from bregtop_dist.config import BregTopConfig
from bregtop_dist.core.block_step import BlockHyper
from bregtop_dist.core.finite import finite_rows, largest_magnitudes
from bregtop_dist.distributed.layout import GroupPieces, Piece
from bregtop_dist.state_format import KRON, KronBlocks


@dataclass
class PendingKron:
    """A param group's computed Kronecker step, waiting for the step's verdict."""

    plan: KronPlan
    pieces: list[Piece]
    stepped: list[bool]  # per parameter: it has a gradient on some rank
    steps: list[StackStep]
    whole: bool = False  # every block of every owned stack, gathered through the plan's views


@dataclass(frozen=True)
class UpdatePairs:
    """What a committed step changes: the pieces to decay, and (view, update) pairs."""

    pieces: list[Tensor]
    views: list[Tensor]
    updates: list[Tensor]


class KronSide:
    """This rank's plans, one per param group (or ZeRO partition) with Kronecker parameters."""

    def __init__(self, comm_dtype: torch.dtype) -> None:
        self.comm_dtype = comm_dtype
        self.plans: dict[str, KronPlan] = {}

    @property
    def stacks(self) -> dict[str, BlockStack]:
        return {stack.key: stack for plan in self.plans.values() for stack in plan.stacks.values()}

    def traffic(self) -> tuple[int, int]:
        return (
            sum(p.exchange.traffic.sent for p in self.plans.values()),
            sum(p.exchange.traffic.received for p in self.plans.values()),
        )

    def plan(self, view: GroupPieces, pieces: list[Piece], cfg: BregTopConfig, rank: int, world: int,
             state: dict[Tensor, Any]) -> KronPlan:
        """The plan of ``view``, made at its first use (and its blocks registered in ``state``)."""
        plan = self.plans.get(view.key)
        if plan is None:
            plan = build_plan(view.key, pieces, cfg.max_precond_dim, cfg.precondition_frequency, cfg.stagger_refresh,
                              rank, world, (cfg.parts, cfg.parts_dim), cfg.graft != "none")
            self.plans[view.key] = plan
            register_blocks(plan, state)
        return plan

    def compute(self, view: GroupPieces, pieces: list[Piece], cfg: BregTopConfig, hyper: BlockHyper,
                where: tuple[int, int, dist.ProcessGroup | None], state: dict[Tensor, Any]) -> PendingKron:
        """The step of ``view``'s Kronecker ``pieces`` (``where``: this rank, the world, the
        process group): the gradients exchanged to the blocks' owners and Algorithm 1 run on
        this rank's blocks, nothing committed."""
        rank, world, pg = where
        plan = self.plan(view, pieces, cfg, rank, world, state)
        stepped = [s.grad is not None for s in pieces]
        device = pieces[0].value.device
        if plan.views is not None and all(stepped):  # every block, from this rank's own parameters
            grads = {shape: stack.grad_buffer(device) for shape, stack in plan.stacks.items()}
            plan.views.gather(pieces, grads)
            if cfg.maximize and grads:
                torch._foreach_neg_(list(grads.values()))
            steps = [stack.step(list(range(len(stack.block_ids))), grads[shape], hyper)
                     for shape, stack in plan.stacks.items()]
            return PendingKron(plan, pieces, stepped, steps, whole=True)
        buffers: dict[int, Tensor] = {}
        gathered: list[tuple[BlockStack, list[int], Tensor]] = []
        for stack in plan.stacks.values():
            rows = [k for k, b in enumerate(stack.block_ids) if stepped[plan.blocks[b].param]]
            if not rows:
                continue
            grad = torch.empty((len(rows), *stack.shape), dtype=torch.float32, device=device)
            buffers.update((stack.block_ids[k], g) for k, g in zip(rows, grad))
            gathered.append((stack, rows, grad))
        plan.exchange.gather_grads(pieces, stepped, buffers, self.comm_dtype, pg)
        if cfg.maximize and gathered:
            torch._foreach_neg_([grad for _, _, grad in gathered])
        steps = [stack.step(rows, grad, hyper) for stack, rows, grad in gathered]
        return PendingKron(plan, pieces, stepped, steps)

    def commit(self, pending: PendingKron, pg: dist.ProcessGroup | None, world: int) -> UpdatePairs:
        """Keep the computed states; return the updates, moved to every rank that holds them."""
        for s in pending.steps:
            s.stack.commit(s)
        decaying = [piece.value for piece, a in zip(pending.pieces, pending.stepped) if a]
        plan = pending.plan
        if pending.whole and plan.views is not None and world == 1:
            views, updates = plan.views.update_pairs(pending.pieces, {s.stack.shape: s.result.update for s in pending.steps})
            return UpdatePairs(decaying, views, updates)
        by_block: dict[int, Tensor] = {}
        for s in pending.steps:
            by_block.update((s.stack.block_ids[k], u) for k, u in zip(s.rows, s.result.update))
        views, updates = plan.exchange.update_pairs(pending.pieces, pending.stepped, by_block, self.comm_dtype, pg)
        return UpdatePairs(decaying, views, updates)


def register_blocks(plan: KronPlan, state: dict[Tensor, Any]) -> None:
    """``state[p]["kron"]`` for every Kronecker parameter of ``plan`` (on every rank, so that
    every rank's state names every parameter), holding the blocks this rank owns."""
    blocks = [state[p].setdefault(KRON, KronBlocks()) for p in plan.params]
    for stack in plan.stacks.values():
        for row, bid in enumerate(stack.block_ids):
            blk = plan.blocks[bid]
            blocks[blk.param].own(blk.index, stack, row)


def step_extremes(pending: list[PendingKron], device: torch.device) -> tuple[Tensor, Tensor]:
    """On the device, no host read: the largest |x| over everything the pending Kronecker
    steps computed (NaN or inf when something is non-finite), and whether some eigenbasis
    computation failed."""
    changed = [t for p in pending for s in p.steps
               for t in (*s.result.state.changed_by_step(s.refreshed), s.result.update) if t.numel()]
    step_max = torch.zeros((), dtype=torch.float32, device=device)
    if changed:
        step_max = largest_magnitudes(changed).amax()
    fails = [s.result.failed for p in pending for s in p.steps if s.result.failed is not None]
    failed = torch.cat(fails).any() if fails else torch.zeros((), dtype=torch.bool, device=device)
    return step_max, failed


def first_non_finite(pending: list[PendingKron]) -> tuple[str, tuple[int, int], float] | None:
    """(parameter name, block shape, largest gradient entry) of this rank's first block whose
    computed state or update is non-finite, or None."""
    for plan_step in pending:
        for s in plan_step.steps:
            ok = (s.result.state.finite_blocks() & finite_rows(s.result.update)).tolist()
            if all(ok):
                continue
            first = ok.index(False)
            blk = plan_step.plan.blocks[s.stack.block_ids[s.rows[first]]]
            return plan_step.pieces[blk.param].name, blk.shape, float(s.grad[first].abs().max())
    return None


def basis_failures(pending: list[PendingKron]) -> int:
    """How many blocks' eigenbasis computation failed in this step (a host read)."""
    failed = [s.result.failed for p in pending for s in p.steps if s.result.failed is not None]
    return int(sum(int(f.sum()) for f in failed))
