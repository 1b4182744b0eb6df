"""Who holds which elements of each parameter: one description for every engine.

A :class:`Piece` says, for one parameter, which boxes of its 2-D view (dim 0 by the rest,
row-major) every rank holds and where each box lies in that rank's local tensor, and gives
this rank's tensors. Plain tensors (one device, DDP) are replicated: every rank holds the
whole matrix. DTensors hold one box each, from their placements on a mesh of any dimension
(:mod:`bregtop_dist.distributed.mesh`: FSDP2's ``Shard(0)``, HSDP's replicated shards, tensor
parallelism's columns); several ranks may hold the same box. DeepSpeed ZeRO hands the
optimizer flat fragments, at most three boxes each (:func:`flat_piece`). The optimizer plans
block ownership and communication from these boxes alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

Range = tuple[int, int]


@dataclass(frozen=True)
class Box:
    """Rows ``rows`` and columns ``cols`` of a parameter's 2-D view, as its holder keeps them:
    element ``(rows[0], cols[0])`` at ``start`` of the local tensor, ``stride`` elements from
    one row to the next."""

    rows: Range
    cols: Range
    start: int
    stride: int

    @property
    def numel(self) -> int:
        return max(self.rows[1] - self.rows[0], 0) * max(self.cols[1] - self.cols[0], 0)

    def at(self, row: int, col: int) -> int:
        """Where element (row, col) of the 2-D view lies in the holder's local tensor."""
        return self.start + (row - self.rows[0]) * self.stride + (col - self.cols[0])


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """The 2-D view a parameter is read as: dim 0 by the rest (a 1-D tensor is a column, a
    scalar one element)."""
    if not shape:
        return 1, 1
    return shape[0], math.prod(shape[1:])


def flat_boxes(held: Range, cols: int) -> tuple[Box, ...]:
    """The flat range ``held`` of a (?, cols) matrix's row-major flattening, kept contiguously
    from element 0 on, as at most three boxes: a partial first row, whole rows, a partial
    last row."""
    a, b = held
    if a >= b:
        return ()
    first_full, end_full = -(-a // cols), b // cols  # rows entirely inside [a, b)
    if first_full > end_full:  # [a, b) lies inside one row
        parts = [((a // cols, a // cols + 1), (a % cols, a % cols + b - a))]
    else:
        parts = [((first_full, end_full), (0, cols))] if first_full < end_full else []
        if a % cols:
            parts.insert(0, ((first_full - 1, first_full), (a % cols, cols)))
        if b % cols:
            parts.append(((end_full, end_full + 1), (0, b % cols)))
    return tuple(Box(rows, cols_, rows[0] * cols + cols_[0] - a, cols) for rows, cols_ in parts)


@dataclass(frozen=True)
class Piece:
    """One parameter as this rank sees it: the part of it this rank holds.

    ``held[r]`` are the boxes rank ``r`` holds (their ``start``/``stride`` in r's own local
    tensor); ``value`` and ``grad`` are this rank's local tensors, and writes to ``value``
    reach the model (or the engine's fp32 master copy).
    """

    param: Tensor  # the model parameter: the key of its optimizer state
    name: str
    shape: tuple[int, ...]  # global shape
    held: tuple[tuple[Box, ...], ...]
    value: Tensor
    grad: Tensor | None

    @property
    def everywhere(self) -> bool:
        """Every rank holds the whole parameter (replicated: one device, DDP)."""
        rows, cols = matrix_shape(self.shape)
        whole = (Box((0, rows), (0, cols), 0, cols),)
        return all(boxes == whole for boxes in self.held) or rows * cols == 0

    def local_of(self, full: Tensor, rank: int) -> Tensor:
        """Rank ``rank``'s part of ``full`` (a tensor of the parameter's shape), shaped and laid
        out as its local tensor."""
        matrix = full.reshape(matrix_shape(self.shape))
        out = torch.empty(self.value.numel(), dtype=full.dtype, device=full.device)
        for box in self.held[rank]:
            (i0, i1), (j0, j1) = box.rows, box.cols
            torch.as_strided(out, (i1 - i0, j1 - j0), (box.stride, 1), box.start).copy_(matrix[i0:i1, j0:j1])
        return out.reshape(self.value.shape)


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
    rows, cols = matrix_shape(tuple(param.shape))
    whole = (Box((0, rows), (0, cols), 0, cols),)
    return Piece(param, name, tuple(param.shape), (whole,) * world, param, _dense(param.grad))


def flat_piece(param: Tensor, name: str, shape: tuple[int, ...], ranges: tuple[Range, ...], value: Tensor,
               grad: Tensor | None) -> Piece:
    """A parameter every rank holds a flat range of (``ranges[r]`` of the row-major
    flattening; DeepSpeed ZeRO's fragments)."""
    cols = matrix_shape(shape)[1]
    return Piece(param, name, shape, tuple(flat_boxes(r, cols) for r in ranges), value, grad)


def dtensor_piece(param: Tensor, name: str, held: tuple[tuple[Box, ...], ...]) -> Piece:
    """A DTensor parameter whose ranks hold ``held`` (:func:`~bregtop_dist.distributed.mesh.mesh_boxes`)."""
    local = param.to_local()  # type: ignore[attr-defined]
    _require_contiguous(local, name)
    grad = None if param.grad is None else _dense(param.grad.to_local())  # type: ignore[attr-defined]
    return Piece(param, name, tuple(param.shape), held, local, grad)


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


def rect_view(local: Tensor, at: int, stride: int, shape: tuple[int, int]) -> Tensor:
    """The 2-D view of ``shape`` whose first element is element ``at`` of ``local`` and whose
    rows are ``stride`` elements apart."""
    return torch.as_strided(local, shape, (stride, 1), local.storage_offset() + at)
