"""Agreement between ranks: the same settings at construction, and one verdict per step on
which gradients exist and whether any is non-finite, so that every rank acts alike (a NaN on
one rank makes every rank raise instead of leaving the others waiting in a collective).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

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


def grad_verdict(
    shards: Sequence[ParamShard], group: dist.ProcessGroup | None, world: int
) -> tuple[list[bool], int | None]:
    """(has a gradient on some rank, per shard; index of the first shard whose gradient is
    non-finite on some rank, or None). One small all_reduce when ``world > 1``."""
    if not shards:
        return [], None
    device = shards[0].value.device
    flags = torch.zeros(2, len(shards), dtype=torch.int32, device=device)
    present = [i for i, s in enumerate(shards) if s.grad is not None]
    if present:
        idx = torch.tensor(present, device=device)
        flags[0].index_fill_(0, idx, 1)
        finite = torch.stack([torch.isfinite(shards[i].grad).all() for i in present])  # type: ignore[arg-type]
        flags[1].index_copy_(0, idx, (~finite).to(torch.int32))
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
    host = flags.cpu()
    bad = host[1].nonzero()
    return [bool(v) for v in host[0]], (int(bad[0]) if bad.numel() else None)
