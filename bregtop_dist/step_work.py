"""One optimizer step on this rank, both sides of every param group: computed with nothing
written (:func:`compute_step`), judged by :func:`bregtop_dist.verdict.judge`, then committed
(:func:`commit_step`) through the one update path, :func:`~bregtop_dist.core.descend.apply_update`.

A gradient's way: the source says which piece of which parameter this rank holds; a Kronecker
parameter's blocks go to their owners and through Algorithm 1 there (:mod:`bregtop_dist.kron_side`),
anything else gets its AdamW update; the verdict refuses the step on every rank alike or lets
it through; the commit keeps the new states and applies every update with the decay.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bregtop_dist.adamw import adamw_updates
from bregtop_dist.block_plan import is_kron_shape
from bregtop_dist.config import BregTopConfig
from bregtop_dist.core.descend import apply_update
from bregtop_dist.distributed.checks import agree_stepped, grad_maxima
from bregtop_dist.distributed.layout import Piece
from bregtop_dist.distributed.source import Source
from bregtop_dist.group_settings import GroupSettings
from bregtop_dist.kron_side import KronSide, PendingKron
from bregtop_dist.verdict import ADAMW_GRAD_LIMIT


@dataclass
class GroupWork:
    """One param group's computed step."""

    config: BregTopConfig
    pieces: list[Piece]  # zeros stand in for a gradient another rank has and this one lacks
    pending: PendingKron | None  # the Kronecker side, if the group has one


@dataclass
class StepWork:
    """Everything this rank computed for one step, waiting for the verdict."""

    groups: list[GroupWork]
    pieces: list[Piece]  # every group's pieces, as the source gave them
    limits: list[float]  # per piece: the largest gradient entry its side takes
    grad_max: Tensor  # per piece: its largest |gradient entry| (on the device)
    pg: dist.ProcessGroup | None
    rank: int
    world: int

    @property
    def pending(self) -> list[PendingKron]:
        return [g.pending for g in self.groups if g.pending is not None]


def compute_step(source: Source, settings: GroupSettings, kron: KronSide, state: dict[Tensor, Any]) -> StepWork:
    """Every group's step on this rank, nothing written: the Kronecker side's gradients
    exchanged and Algorithm 1 run on the owned blocks; the AdamW side waits for the commit
    (its update is a few elementwise operations, checked through its gradients' size)."""
    pg, (rank, world) = source.pg(), source.world()
    views = source.pieces(False)
    resolved = [settings.of(view.settings) for view in views]  # every group, before any steps
    every = [s for view in views for s in view.pieces]
    limits = [float("inf") if is_kron_shape(s.shape, r.config.bregtop) else ADAMW_GRAD_LIMIT
              for view, r in zip(views, resolved) for s in view.pieces]
    stepped = iter(agree_stepped(every, pg, world))
    grad_max = grad_maxima(every)
    groups = []
    for view, r in zip(views, resolved):
        pieces = [_with_zero_grad(s) if a and s.grad is None else s for s, a in zip(view.pieces, stepped)]
        matrices = [s for s in pieces if is_kron_shape(s.shape, r.config.bregtop)]
        pending = kron.compute(view, matrices, r.config, r.hyper, (rank, world, pg), state) if matrices else None
        groups.append(GroupWork(r.config, pieces, pending))
    return StepWork(groups, every, limits, grad_max, pg, rank, world)


def commit_step(work: StepWork, kron: KronSide, state: dict[Tensor, Any]) -> None:
    """Keep every computed Kronecker state and apply every update of each group, both sides,
    with its decoupled decay."""
    for group in work.groups:
        cfg = group.config
        decaying: list[Tensor] = []
        views: list[Tensor] = []
        updates: list[Tensor] = []
        if group.pending is not None:
            pairs = kron.commit(group.pending, work.pg, work.world)
            decaying, views, updates = pairs.pieces, pairs.views, pairs.updates
        # an empty piece (a rank whose FSDP2 shard of a short parameter has no rows) steps too, as
        # torch's AdamW steps it: its step count then agrees across ranks, which DCP needs (it
        # saves a plain tensor such as ``step`` from one rank, any rank, and loads it on all)
        side = [s for s in group.pieces if s.grad is not None and not is_kron_shape(s.shape, cfg.bregtop)]
        grads: list[Tensor] = [s.grad for s in side if s.grad is not None]
        if cfg.maximize and grads:
            grads = list(torch._foreach_neg(grads))
        values = [s.value for s in side]
        side_updates = adamw_updates(values, grads, [state[s.param] for s in side],
                                     betas=cfg.resolved_adam_betas, eps=cfg.adam_eps)
        apply_update(decaying + values, views + values, updates + side_updates, cfg.lr, cfg.weight_decay)


def _with_zero_grad(piece: Piece) -> Piece:
    """``piece`` with zeros for a gradient it lacks on this rank but has on another."""
    return dataclasses.replace(piece, grad=torch.zeros_like(piece.value))
