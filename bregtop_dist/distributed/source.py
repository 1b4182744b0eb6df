"""The placement source: what tells the optimizer, per parameter, its name, global shape and
the piece this rank holds, and among which ranks (the pg) the Kronecker blocks are shared.

The optimizer holds one source, chosen at construction and replaced only by an engine that
takes over its tensors (DeepSpeed ZeRO, :mod:`bregtop_dist.integrations.deepspeed`). It asks
the source and never inspects engines itself. :class:`TensorSource` covers plain tensors
(one device, DDP: every rank holds the whole parameter) and DTensors on meshes of any
dimension (FSDP2, HSDP, FSDP2 x tensor parallel: :mod:`bregtop_dist.distributed.mesh`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

import torch.distributed as dist
from torch import Tensor

from bregtop_dist.distributed.layout import (
    Box,
    GroupPieces,
    dtensor_piece,
    global_shape,
    is_dtensor,
    replicated_piece,
)
from bregtop_dist.distributed.mesh import mesh_boxes, mesh_pg


class Source(Protocol):
    """Which pieces this rank holds, for the param groups a ``step`` call works on."""

    def pg(self) -> dist.ProcessGroup | None:
        """The ranks among which the Kronecker blocks are shared (None: the default pg)."""

    def world(self) -> tuple[int, int]:
        """(rank, world size) in :meth:`pg`; (0, 1) when torch.distributed is not running."""

    def pieces(self, every_group: bool) -> list[GroupPieces]:
        """The param groups visible to the current ``step`` call (every group when
        ``every_group``), each as the pieces this rank holds."""

    def parameters(self) -> list[list[Tensor]]:
        """Each group's parameters as the user added them: the keys of their state."""

    @property
    def engine_saves_state(self) -> bool:
        """The engine writes every rank's optimizer state itself (DeepSpeed ZeRO)."""


def world_of(pg: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank, world size) in ``pg``; (0, 1) when torch.distributed is not running."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(pg), dist.get_world_size(pg)


def param_name(groups: Sequence[dict[str, Any]], gi: int, pi: int, p: Tensor) -> str:
    """Parameter ``pi`` of group ``gi``: its name from the group's ``param_names``, else its
    position and shape."""
    names = groups[gi].get("param_names")
    if names and pi < len(names):
        return str(names[pi])
    return f"param_groups[{gi}]['params'][{pi}] (shape {global_shape(p)})"


class TensorSource:
    """Plain tensors (replicated on every rank of ``pg``) and DTensors (their boxes from their
    placements; their root mesh's process group is the pg). Reads the optimizer's live
    ``param_groups``, so that groups added later are seen."""

    engine_saves_state = False

    def __init__(self, groups: list[dict[str, Any]], added: list[list[Tensor]], pg: dist.ProcessGroup | None) -> None:
        self._groups = groups  # the optimizer's param_groups list itself
        self._added = added  # each group's tensors as added (to notice an engine's flat swap)
        self._pg = pg
        self._boxes: dict[int, tuple[Any, tuple[tuple[Box, ...], ...]]] = {}  # id(param) -> (its layout, boxes)

    def pg(self) -> dist.ProcessGroup | None:
        for gi, group in enumerate(self._groups):
            for pi, p in enumerate(group["params"]):
                if is_dtensor(p):
                    return mesh_pg(p, param_name(self._groups, gi, pi, p))
        return self._pg

    def world(self) -> tuple[int, int]:
        return world_of(self.pg())

    def parameters(self) -> list[list[Tensor]]:
        return [list(g["params"]) for g in self._groups]

    def pieces(self, every_group: bool) -> list[GroupPieces]:
        pg = self.pg()
        world = world_of(pg)[1]
        out = []
        for gi, group in enumerate(self._groups):
            self._check_not_flattened(gi, group)
            pieces = [
                dtensor_piece(p, name, self._held(p, name, pg)) if is_dtensor(p) else replicated_piece(p, name, world)
                for pi, p in enumerate(group["params"])
                for name in (param_name(self._groups, gi, pi, p),)
            ]
            if pieces:
                out.append(GroupPieces(str(gi), gi, group, pieces))
        return out

    def _held(self, p: Tensor, name: str, pg: dist.ProcessGroup | None) -> tuple[tuple[Box, ...], ...]:
        """Every rank's box of DTensor ``p``, worked out once per layout."""
        layout = (tuple(p.shape), tuple(p.placements), p.device_mesh, pg)  # type: ignore[attr-defined]
        known = self._boxes.get(id(p))
        if known is None or known[0] != layout:
            known = (layout, mesh_boxes(p, name, pg))
            self._boxes[id(p)] = known
        return known[1]

    def _check_not_flattened(self, gi: int, group: dict[str, Any]) -> None:
        """An engine (DeepSpeed ZeRO) that swapped a group's matrices for flat partitions
        without telling BregTop would silently turn it into AdamW: refuse instead."""
        params = group["params"]
        if (
            gi < len(self._added) and any(len(global_shape(p)) >= 2 for p in self._added[gi])
            and group.get("bregtop", True)
            and params and all(p.ndim < 2 for p in params)
        ):
            raise RuntimeError(
                f"param group {gi} had matrices when BregTop was built but now holds only flat tensors "
                f"(shapes {[tuple(p.shape) for p in params][:3]}): an engine such as DeepSpeed ZeRO replaced "
                "them. Build the engine with bregtop_dist.integrations.deepspeed.initialize, or after "
                "deepspeed.initialize call bregtop_dist.integrations.deepspeed.attach(bregtop, engine.optimizer), "
                "or after accelerator.prepare bregtop_dist.integrations.deepspeed.attach_prepared(optimizer) "
                "(in a transformers Trainer: callbacks=[bregtop_dist.integrations.hf.AttachZeroFragments()])"
            )


class FunctionSource:
    """The source an engine gave through the deprecated ``attach_shard_source(fn, pg)``:
    ``fn(every_group)`` returns the pieces."""

    engine_saves_state = True

    def __init__(self, fn: Callable[[bool], list[GroupPieces]], pg: dist.ProcessGroup | None,
                 added: list[list[Tensor]]) -> None:
        self._fn, self._pg, self._added = fn, pg, added

    def pg(self) -> dist.ProcessGroup | None:
        return self._pg

    def world(self) -> tuple[int, int]:
        return world_of(self._pg)

    def pieces(self, every_group: bool) -> list[GroupPieces]:
        return self._fn(every_group)

    def parameters(self) -> list[list[Tensor]]:
        return [list(ps) for ps in self._added]
