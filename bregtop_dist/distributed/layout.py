"""Who holds which elements of each parameter: one description for every engine.

A :class:`Piece` says, for one parameter, which contiguous range of its row-major
flattening every rank holds, and gives this rank's tensors for its own range. Plain tensors
(one device, DDP) are replicated: every rank holds the whole range. FSDP2 ``Shard(0)``
DTensors hold a row range each (uneven, possibly empty). DeepSpeed ZeRO hands the optimizer
flat fragments; ``bregtop_dist.integrations.deepspeed`` describes those with the same class.
The optimizer plans block ownership and communication from these ranges alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Range = tuple[int, int]


@dataclass(frozen=True)
class Piece:
    """One parameter as this rank sees it: the piece of it this rank holds.

    ``ranges[r]`` is the ``[start, stop)`` of the row-major flattening rank ``r`` holds;
    ``value`` and ``grad`` are this rank's elements (contiguous, ``numel == stop - start``),
    and writes to ``value`` reach the model (or the engine's fp32 master copy).
    """

    param: Tensor  # the model parameter: the key of its optimizer state
    name: str
    shape: tuple[int, ...]  # global shape
    ranges: tuple[Range, ...]
    value: Tensor
    grad: Tensor | None

    def held(self, rank: int) -> Range:
        return self.ranges[rank]


@dataclass(frozen=True)
class GroupPieces:
    """The parameters of one param group visible to one ``step`` call.

    ``key`` names the plan (``"0"`` for group 0; DeepSpeed partitions get ``"0.0"``,
    ``"0.1"`` and so on).
    """

    key: str
    group_index: int
    settings: dict[str, Any]  # the param group dict: its settings are the group's config
    pieces: list[Piece]


def chunk_rows(rows: int, world: int) -> list[Range]:
    """Row ranges of ``torch.chunk`` over ``world`` ranks, as FSDP2's ``Shard(0)`` cuts them:
    ``ceil(rows / world)`` rows each, the last ranks shorter or empty."""
    size = math.ceil(rows / world) if rows else 0
    return [(min(r * size, rows), min((r + 1) * size, rows)) for r in range(world)]


def replicated_piece(param: Tensor, name: str, world: int) -> Piece:
    """A plain tensor every rank holds in full."""
    _require_contiguous(param, name)
    return Piece(param, name, tuple(param.shape), ((0, param.numel()),) * world, param, _dense(param.grad))


def dtensor_piece(param: Tensor, name: str) -> Piece:
    """An FSDP2 parameter: a DTensor on a 1-D mesh placed ``Shard(0)`` or ``Replicate()``."""
    from torch.distributed.tensor import Replicate, Shard

    mesh = param.device_mesh  # type: ignore[attr-defined]
    placements = tuple(param.placements)  # type: ignore[attr-defined]
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], (Shard, Replicate)):
        raise ValueError(
            f"{name}: BregTop supports DTensor parameters on a 1-D device mesh placed Shard(0) or "
            f"Replicate(); got mesh shape {tuple(mesh.shape)} with placements {placements}"
        )
    place = placements[0]
    world = mesh.size()
    shape = tuple(param.shape)
    numel = math.prod(shape)
    if isinstance(place, Replicate):
        ranges: tuple[Range, ...] = ((0, numel),) * world
    else:
        if place.dim != 0:
            raise ValueError(f"{name}: DTensor parameters must be sharded on dim 0, got Shard({place.dim})")
        per_row = numel // shape[0] if shape[0] else 0
        ranges = tuple((a * per_row, b * per_row) for a, b in chunk_rows(shape[0], world))
    local = param.to_local()  # type: ignore[attr-defined]
    start, stop = ranges[mesh.get_local_rank()]
    if local.numel() != stop - start:
        raise ValueError(
            f"{name}: local piece has {local.numel()} elements, expected {stop - start} from "
            f"torch.chunk row semantics over {world} ranks"
        )
    _require_contiguous(local, name)
    grad = None if param.grad is None else _dense(param.grad.to_local())  # type: ignore[attr-defined]
    return Piece(param, name, shape, ranges, local, grad)


def _dense(grad: Tensor | None) -> Tensor | None:
    """A gradient as the step reads it; a sparse one counts as absent here, so that what reads
    no gradient (``state_dict``, the plans) works with one attached: the step itself refuses
    sparse gradients, naming the parameter, before it reads any piece."""
    if grad is None or grad.layout != torch.strided:
        return None
    return grad.contiguous()


def is_dtensor(param: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(param, DTensor)


def global_shape(p: Tensor) -> tuple[int, ...]:
    """A parameter's shape as the model sees it (a ZeRO-3 parameter keeps it in ``ds_shape``)."""
    return tuple(getattr(p, "ds_shape", p.shape))


def _require_contiguous(tensor: Tensor, name: str) -> None:
    if not tensor.is_contiguous():
        raise ValueError(f"{name}: BregTop needs contiguous parameters, got strides {tensor.stride()}")


def rect_view(local: Tensor, start: int, cols: int, rows: Range, col_range: Range) -> Tensor:
    """The 2-D view of rows ``rows`` and columns ``col_range`` of a (?, cols) matrix, taken
    from ``local``, which holds its flattened elements from ``start`` on."""
    (i0, i1), (j0, j1) = rows, col_range
    offset = local.storage_offset() + i0 * cols + j0 - start
    return torch.as_strided(local, (i1 - i0, j1 - j0), (cols, 1), offset)
