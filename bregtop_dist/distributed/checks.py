"""Agreement between ranks: the same settings at construction, and one verdict per step on
which gradients exist and whether any is non-finite, so that every rank acts alike (a NaN on
one rank makes every rank raise instead of leaving the others waiting in a collective).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bregtop_dist.core.finite import largest_magnitudes
from bregtop_dist.distributed.layout import Piece


def check_same_on_all_ranks(what: dict[str, Any], pg: dist.ProcessGroup | None, world: int) -> None:
    """Raise ValueError on every rank unless every rank passed an equal ``what``."""
    if world == 1:
        return
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, what, group=pg)
    for rank, theirs in enumerate(gathered):
        for key in sorted(set(theirs) | set(gathered[0])):
            if theirs.get(key) != gathered[0].get(key):
                raise ValueError(
                    f"BregTop settings differ across ranks: {key} is {theirs.get(key)!r} on rank {rank} "
                    f"but {gathered[0].get(key)!r} on rank 0; every rank must build the optimizer "
                    "with the same settings and parameter shapes"
                )


def agree_stepped(pieces: Sequence[Piece], pg: dist.ProcessGroup | None, world: int) -> list[bool]:
    """Per piece: a gradient exists on some rank. Known on the host in one process; otherwise
    one small all_reduce (and its read), so that every rank steps the same blocks."""
    stepped = [s.grad is not None for s in pieces]
    if world == 1 or not pieces:
        return stepped
    flags = torch.tensor(stepped, dtype=torch.float32, device=pieces[0].value.device)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=pg)
    return [v != 0.0 for v in flags.tolist()]


def grad_maxima(pieces: Sequence[Piece]) -> Tensor:
    """(S,) float32 on the device, no host read: per piece the largest |g| (inf where the
    gradient holds NaN or inf; 0 without a gradient or elements)."""
    device = pieces[0].value.device if pieces else torch.device("cpu")
    have = [i for i, s in enumerate(pieces) if s.grad is not None and s.grad.numel() > 0]
    if not have:
        return torch.zeros(len(pieces), dtype=torch.float32, device=device)
    largest = largest_magnitudes([pieces[i].grad for i in have])  # type: ignore[misc]
    if len(have) < len(pieces):
        largest = torch.zeros(len(pieces), dtype=torch.float32, device=device).index_copy_(
            0, torch.tensor(have, device=device), largest)
    return largest.nan_to_num_(nan=torch.inf, posinf=torch.inf)


@dataclass(frozen=True)
class StepVerdict:
    """What every rank agrees on about this step, from its one read of the device."""

    non_finite: int | None  # first piece whose gradient holds NaN or inf on some rank
    too_large: int | None  # first piece whose largest |g| (on some rank) exceeds its limit
    largest: list[float]  # per piece: the largest |g| over the ranks (inf where non-finite)
    step_bad: list[bool]  # per rank: its computed Kronecker step is non-finite somewhere
    basis_failed: bool  # some rank's eigenbasis computation failed (kept the old basis)


def step_verdict(
    grad_max: Tensor, step_max: Tensor, basis_failed: Tensor, limits: Sequence[float],
    pg: dist.ProcessGroup | None, rank: int, world: int,
) -> StepVerdict:
    """The step's verdict from device values: ``grad_max`` (S,) from :func:`grad_maxima`,
    ``step_max`` the largest |x| over everything this rank's Kronecker step computed (NaN or
    inf when something is non-finite), ``basis_failed`` a flag. One all_reduce when
    ``world > 1`` and one host read: the GradScaler pattern, everything is computed before
    it and nothing is written before it."""
    slots = torch.zeros(world + 1, dtype=torch.float32, device=grad_max.device)
    slots[rank] = step_max.float()
    slots[world] = basis_failed.float()
    flags = torch.cat([grad_max, slots.nan_to_num_(nan=torch.inf, posinf=torch.inf)])
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=pg)
    host = flags.tolist()
    size = len(grad_max)
    big, steps = host[:size], host[size : size + world]
    non_finite = next((i for i, v in enumerate(big) if not math.isfinite(v)), None)
    too_large = next((i for i, (v, lim) in enumerate(zip(big, limits)) if math.isfinite(v) and v > lim), None)
    return StepVerdict(non_finite, too_large, big, [not math.isfinite(v) for v in steps], host[-1] != 0.0)
