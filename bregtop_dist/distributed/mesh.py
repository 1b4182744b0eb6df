"""DTensor placements on device meshes of any dimension, read as the boxes every rank holds.

A DTensor parameter lives on a mesh (FSDP2: 1-D; HSDP: ("replicate", "shard"); FSDP2 over
tensor parallelism: a ("dp", "tp") mesh, or the "dp" slice of it for parameters tensor
parallelism left alone). Every rank of the mesh's root holds one box of the parameter's 2-D
view (dim 0 by the rest): ``Shard(0)`` cuts rows, ``Shard(1)`` cuts columns (dim 1 and the
dims after it), ``Replicate()`` and the root's dimensions the mesh does not have leave the box
to several ranks, uneven shards are cut as torch cuts them. Anything else (``Partial``,
``Shard(d)`` for d >= 2, boxes that are not contiguous ranges) is refused, naming the
parameter, its mesh and placements.

The ranks the optimizer shares its blocks among (its process group) are the root mesh's: the
default group when the root spans every rank, else a 1-D mesh's own group.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from torch import Tensor

from bregtop_dist.distributed.layout import Box, matrix_shape

SUPPORTED = (
    "Replicate(), Shard(0) and Shard(1) (tensor dims 0 and 1) over a mesh of any dimension, or a named "
    "slice of one (FSDP2, HSDP, FSDP2 x tensor parallel)"
)


def _describe(name: str, mesh: Any, placements: tuple[Any, ...]) -> str:
    names = f", dims {mesh.mesh_dim_names}" if mesh.mesh_dim_names else ""
    return f"{name}: mesh shape {tuple(mesh.shape)}{names}, placements {placements}"


def root_mesh(param: Tensor) -> Any:
    return param.device_mesh._get_root_mesh()  # type: ignore[attr-defined]


def mesh_pg(param: Tensor, name: str) -> dist.ProcessGroup | None:
    """The process group of ``param``'s root mesh: None (the default group) when it spans every
    rank, a 1-D root's own group otherwise; a ValueError for a multi-dimensional root that
    leaves ranks out."""
    root = root_mesh(param)
    if root.size() == dist.get_world_size():
        return None
    if root.ndim == 1:
        return root.get_group()  # type: ignore[no-any-return]
    raise ValueError(
        f"{_describe(name, root, tuple(param.placements))}: a mesh of more than one dimension must span "  # type: ignore[attr-defined]
        f"every rank ({dist.get_world_size()}), it spans {root.size()}"
    )


def mesh_boxes(param: Tensor, name: str, pg: dist.ProcessGroup | None) -> tuple[tuple[Box, ...], ...]:
    """The box of ``param``'s 2-D view every rank of ``pg`` holds (indexed by rank in ``pg``),
    each laid out as that rank's contiguous local tensor."""
    mesh = param.device_mesh  # type: ignore[attr-defined]
    placements = tuple(param.placements)  # type: ignore[attr-defined]
    shape = tuple(param.shape)
    root = mesh._get_root_mesh()
    dims = _dims_in_root(mesh, root, name, placements)
    world = dist.get_world_size(pg)
    held: list[tuple[Box, ...] | None] = [None] * world
    boxes_by_coordinate = placement_boxes(shape, tuple(mesh.shape), placements, tuple(root.shape), dims,
                                          lambda: _describe(name, mesh, placements))
    for global_rank, box in zip(root.mesh.reshape(-1).tolist(), boxes_by_coordinate):
        held[dist.get_group_rank(pg, global_rank) if pg is not None else global_rank] = (box,)
    if any(h is None for h in held):
        raise ValueError(f"{_describe(name, mesh, placements)}: the mesh does not cover every rank of the process group")
    boxes = tuple(h for h in held if h is not None)
    local = param.to_local()  # type: ignore[attr-defined]
    mine = boxes[dist.get_rank(pg)][0]
    if local.numel() != mine.numel:
        raise ValueError(
            f"{_describe(name, mesh, placements)}: the local tensor has {local.numel()} elements, the "
            f"placements give this rank {mine.numel}"
        )
    return boxes


def placement_boxes(shape: tuple[int, ...], mesh_shape: tuple[int, ...], placements: tuple[Any, ...],
                    root_shape: tuple[int, ...], dims: list[int], describe: Callable[[], str]) -> list[Box]:
    """The box of a tensor of ``shape``, placed ``placements`` on a mesh of ``mesh_shape`` whose
    dimensions are the root mesh's ``dims``, at every coordinate of the root (row-major order);
    a ValueError (its text from ``describe``) for placements BregTop cannot read as boxes.
    Needs no process group: ``python -m launch.bench plan`` uses it for meshes of 1,024 ranks."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import _compute_local_shape_and_global_offset
    from torch.distributed.tensor.placement_types import _StridedShard

    for place in placements:
        sharded = isinstance(place, (Shard, _StridedShard))
        if not (isinstance(place, Replicate) or (sharded and place.dim in (0, 1) and place.dim < max(len(shape), 1))):
            raise ValueError(f"{describe()}: BregTop supports {SUPPORTED}")
    cache: dict[tuple[int, ...], Box] = {}
    out = []
    for flat in range(math.prod(root_shape)):
        coordinate = tuple(_unravel(flat, root_shape)[d] for d in dims)
        if coordinate not in cache:
            local_shape, offset = _compute_local_shape_and_global_offset(shape, mesh_shape, list(coordinate), placements)
            cache[coordinate] = _box(shape, tuple(local_shape), tuple(offset))
        out.append(cache[coordinate])
    _check_tiling(out, shape, describe)
    return out


def _dims_in_root(mesh: Any, root: Any, name: str, placements: tuple[Any, ...]) -> list[int]:
    """Which root dimension each of ``mesh``'s dimensions is."""
    if mesh is root:
        return list(range(mesh.ndim))
    names, root_names = mesh.mesh_dim_names, root.mesh_dim_names
    if not names or not root_names or any(n not in root_names for n in names):
        raise ValueError(
            f"{_describe(name, mesh, placements)}: a slice of a mesh is read through its dimension names, "
            f"and these are not among the root mesh's {root_names} (flattened mesh dimensions are not "
            f"supported); BregTop supports {SUPPORTED}"
        )
    return [root_names.index(n) for n in names]


def _unravel(flat: int, shape: tuple[int, ...]) -> list[int]:
    out = []
    for size in reversed(shape):
        out.append(flat % size)
        flat //= size
    return out[::-1]


def _box(shape: tuple[int, ...], local: tuple[int, ...], offset: tuple[int, ...]) -> Box:
    """The box a local tensor of shape ``local`` at ``offset`` covers, laid out contiguously."""
    if not shape:
        return Box((0, 1), (0, 1), 0, 1)
    rest = math.prod(shape[2:])
    r0, nr = offset[0], local[0]
    if len(shape) == 1:
        return Box((r0, r0 + nr), (0, 1), 0, 1)
    c0, nc = offset[1] * rest, local[1] * rest
    return Box((r0, r0 + nr), (c0, c0 + nc), 0, nc)


def _check_tiling(boxes: list[Box], shape: tuple[int, ...], describe: Callable[[], str]) -> None:
    """The distinct boxes tile the 2-D view as a grid (row bands, each cut into column
    ranges): a placement whose shards are not contiguous ranges, which the boxes (taken from
    the first offsets) would misread, shows as an overlap or a gap."""
    rows, cols = matrix_shape(shape)
    bands: dict[tuple[int, int], set[tuple[int, int]]] = {}
    for box in set(boxes):
        if box.numel:
            bands.setdefault(box.rows, set()).add(box.cols)
    if not _partitions(list(bands), rows) or not all(_partitions(list(c), cols) for c in bands.values()):
        raise ValueError(f"{describe()}: the shards are not contiguous boxes of the parameter; BregTop supports {SUPPORTED}")


def _partitions(ranges: list[tuple[int, int]], size: int) -> bool:
    """``ranges`` (non-empty) cut ``[0, size)`` into consecutive pieces."""
    end = 0
    for a, b in sorted(ranges):
        if a != end:
            return False
        end = b
    return end == size
