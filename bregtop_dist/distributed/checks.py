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

from bregtop_dist.distributed.layout import ParamShard


def check_same_on_all_ranks(what: dict[str, Any], group: dist.ProcessGroup | None, world: int) -> None:
    """Raise ValueError on every rank unless every rank passed an equal ``what``."""
    if world == 1:
        return
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, what, group=group)
    for rank, theirs in enumerate(gathered):
        for key in sorted(set(theirs) | set(gathered[0])):
            if theirs.get(key) != gathered[0].get(key):
                raise ValueError(
                    f"BregTop settings differ across ranks: {key} is {theirs.get(key)!r} on rank {rank} "
                    f"but {gathered[0].get(key)!r} on rank 0; every rank must build the optimizer "
                    "with the same settings and parameter shapes"
                )


@dataclass(frozen=True)
class GradVerdict:
    """What every rank agrees on about this step's gradients."""

    active: list[bool]  # per shard: a gradient exists on some rank
    non_finite: int | None  # first shard whose gradient holds NaN or inf on some rank
    too_large: int | None  # first shard whose largest |g| (on some rank) exceeds its limit
    largest: list[float]  # per shard: the largest |g| over the ranks (inf where non-finite)


def grad_verdict(
    shards: Sequence[ParamShard], group: dist.ProcessGroup | None, world: int,
    limits: Sequence[float] | None = None,
) -> GradVerdict:
    """Which gradients exist, whether any is non-finite and whether any exceeds its ``limits``
    entry (default: no limit), agreed by every rank. One small all_reduce when ``world > 1``."""
    if not shards:
        return GradVerdict([], None, None, [])
    device = shards[0].value.device
    flags = torch.zeros(2, len(shards), dtype=torch.float32, device=device)
    present = [i for i, s in enumerate(shards) if s.grad is not None]
    if present:
        idx = torch.tensor(present, device=device)
        flags[0].index_fill_(0, idx, 1.0)
        largest = torch.stack([_largest(shards[i].grad) for i in present])  # type: ignore[arg-type]
        flags[1].index_copy_(0, idx, largest.nan_to_num(nan=torch.inf, posinf=torch.inf))
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    host = flags.cpu()
    big = host[1].tolist()
    non_finite = next((i for i, v in enumerate(big) if not math.isfinite(v)), None)
    bounds = [math.inf] * len(shards) if limits is None else list(limits)
    too_large = next((i for i, (v, lim) in enumerate(zip(big, bounds)) if math.isfinite(v) and v > lim), None)
    return GradVerdict([v != 0.0 for v in host[0].tolist()], non_finite, too_large, big)


def _largest(grad: Tensor) -> Tensor:
    """max |g| in float32 (NaN if g holds one); 0 for an empty shard."""
    if grad.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=grad.device)
    return torch.linalg.vector_norm(grad, float("inf"), dtype=torch.float32)
