"""Gradients to block owners, preconditioned updates back to every rank that holds them.

Sharded layouts (FSDP2, HSDP, tensor parallelism, ZeRO) move each rank's part of every block
with one ``all_to_all_single`` each way: the intersections of the block with the boxes the
rank holds (:mod:`bregtop_dist.distributed.layout`). Where several ranks hold the same box
(HSDP's replicas, a tensor-parallel group's replicated parameters), one of them sends the
gradient (the owner itself when it is one of them, else one chosen by the block, which
spreads the load) and every one of them receives the update. Replicated layouts (one device,
DDP) need nothing on the way in, since the owner already holds its blocks, and return
updates with one ``all_gather_into_tensor``. Every rank derives the same rectangle lists
from the plan, so only values travel. The exchange only moves data: it returns (parameter
view, update) pairs, and :func:`~bregtop_dist.core.descend.apply_update` does the arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from bregtop_dist.distributed.assignment import Block
from bregtop_dist.distributed.layout import Box, Piece, Range, rect_view


@dataclass(frozen=True)
class Rect:
    """The part of block ``block`` in rows ``rows`` and columns ``cols`` of its parameter's
    2-D view, found in its holder's local tensor from element ``at`` on, rows ``stride``
    apart."""

    block: int
    rows: Range
    cols: Range
    at: int
    stride: int

    @property
    def numel(self) -> int:
        return (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0])

    @property
    def shape(self) -> tuple[int, int]:
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]


def whole_block(index: int, block: Block) -> Rect:
    """Block ``index`` as a rank holding its whole (replicated) parameter finds it."""
    s = block.slice
    return Rect(index, (s.r0, s.r1), (s.c0, s.c1), s.r0 * block.cols + s.c0, block.cols)


def intersect(index: int, block: Block, held: Sequence[Box]) -> list[Rect]:
    """The rectangles of ``block`` that fall in the boxes ``held`` of its parameter."""
    s = block.slice
    out = []
    for box in held:
        rows = (max(box.rows[0], s.r0), min(box.rows[1], s.r1))
        cols = (max(box.cols[0], s.c0), min(box.cols[1], s.c1))
        if rows[0] < rows[1] and cols[0] < cols[1]:
            out.append(Rect(index, rows, cols, box.at(rows[0], cols[0]), box.stride))
    return out


def holder_classes(held: Sequence[Sequence[Box]]) -> list[tuple[tuple[Box, ...], list[int]]]:
    """The ranks that hold each distinct set of boxes of one parameter, in rank order."""
    classes: dict[tuple[Box, ...], list[int]] = {}
    for rank, boxes in enumerate(held):
        classes.setdefault(tuple(boxes), []).append(rank)
    return list(classes.items())


@dataclass
class Traffic:
    """Elements this rank sent and received in collectives (self-copies excluded)."""

    sent: int = 0
    received: int = 0

    def add(self, sent: int, received: int) -> None:
        self.sent += sent
        self.received += received


@dataclass
class Exchange:
    """This rank's side of a plan's communication, as rectangle lists by peer rank.

    ``grads_to[d]``: the rectangles of this rank's elements whose gradient owner ``d`` needs;
    ``grads_from[s]``: those this rank, as owner, gets from rank ``s``; ``updates_to[d]``: the
    rectangles of rank ``d``'s elements this rank, as owner, returns updates for;
    ``updates_from[s]``: those rank ``s`` returns to this rank; ``owned[r]``: the blocks rank
    ``r`` owns. Without shared boxes the updates retrace the gradients' way.
    """

    rank: int
    world: int
    replicated: bool
    blocks: list[Block]
    grads_to: list[list[Rect]]
    grads_from: list[list[Rect]]
    updates_to: list[list[Rect]]
    updates_from: list[list[Rect]]
    owned: list[list[int]]
    traffic: Traffic = field(default_factory=Traffic)

    @classmethod
    def build(
        cls, blocks: list[Block], held: Sequence[Sequence[Sequence[Box]]], rank: int, world: int, replicated: bool
    ) -> Exchange:
        """``held[p][r]``: the boxes of parameter ``p`` rank ``r`` holds."""
        lists: list[list[list[Rect]]] = [[[] for _ in range(world)] for _ in range(4)]
        grads_to, grads_from, updates_to, updates_from = lists
        owned: list[list[int]] = [[] for _ in range(world)]
        classes = [holder_classes(h) for h in held]
        for i, blk in enumerate(blocks):
            owned[blk.owner].append(i)
            if replicated:
                if blk.owner == rank:
                    grads_to[rank].append(whole_block(i, blk))
                    grads_from[rank].append(whole_block(i, blk))
                continue
            for boxes, ranks in classes[blk.param]:
                rects = intersect(i, blk, boxes)
                if not rects:
                    continue
                source = blk.owner if blk.owner in ranks else ranks[i % len(ranks)]
                if source == rank:
                    grads_to[blk.owner].extend(rects)
                if blk.owner == rank:
                    grads_from[source].extend(rects)
                    for r in ranks:
                        updates_to[r].extend(rects)
                if rank in ranks:
                    updates_from[blk.owner].extend(rects)
        return cls(rank, world, replicated, blocks, grads_to, grads_from, updates_to, updates_from, owned)

    # ------------------------------------------------------------------- helpers
    def _local(self, pieces: Sequence[Piece], rect: Rect, tensor_of: str) -> Tensor:
        piece = pieces[self.blocks[rect.block].param]
        return rect_view(getattr(piece, tensor_of), rect.at, rect.stride, rect.shape)

    def _in_block(self, buffers: dict[int, Tensor], rect: Rect) -> Tensor:
        s = self.blocks[rect.block].slice
        return buffers[rect.block][
            rect.rows[0] - s.r0 : rect.rows[1] - s.r0, rect.cols[0] - s.c0 : rect.cols[1] - s.c0
        ]

    def _stepped(self, rects: list[Rect], stepped: Sequence[bool]) -> list[Rect]:
        return [r for r in rects if stepped[self.blocks[r.block].param]]

    def _all_to_all(self, parts: list[list[Tensor]], recv_sizes: list[int], dtype: torch.dtype,
                    device: torch.device, pg: dist.ProcessGroup | None) -> list[Tensor]:
        send_sizes = [sum(t.numel() for t in p) for p in parts]
        flat = [t.reshape(-1).to(dtype) for p in parts for t in p]
        out_buf = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        in_buf = torch.cat(flat) if flat else out_buf.new_empty(0)
        dist.all_to_all_single(out_buf, in_buf, recv_sizes, send_sizes, group=pg)
        self.traffic.add(sum(send_sizes) - send_sizes[self.rank], sum(recv_sizes) - recv_sizes[self.rank])
        return list(out_buf.split(recv_sizes))

    # ---------------------------------------------------------------------- in
    def gather_grads(
        self, pieces: Sequence[Piece], stepped: Sequence[bool], buffers: dict[int, Tensor],
        comm_dtype: torch.dtype, pg: dist.ProcessGroup | None,
    ) -> None:
        """Fill ``buffers[block]`` (fp32, one per owned block that steps) with the block's gradient."""
        send = [self._stepped(r, stepped) for r in self.grads_to]
        recv = [self._stepped(r, stepped) for r in self.grads_from]
        if self.world == 1 or self.replicated:
            for rect in send[self.rank]:
                self._in_block(buffers, rect).copy_(self._local(pieces, rect, "grad"))
            return
        parts = [[self._local(pieces, r, "grad") for r in rects] for rects in send]
        sizes = [sum(r.numel for r in rs) for rs in recv]
        received = self._all_to_all(parts, sizes, comm_dtype, pieces[0].value.device, pg)
        for rects, data in zip(recv, received):
            for rect, chunk in zip(rects, data.split([r.numel for r in rects])):
                dst = self._in_block(buffers, rect)
                dst.copy_(chunk.view(dst.shape))

    # --------------------------------------------------------------------- out
    def update_pairs(
        self, pieces: Sequence[Piece], stepped: Sequence[bool], updates: dict[int, Tensor],
        comm_dtype: torch.dtype, pg: dist.ProcessGroup | None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(views of this rank's elements, their updates) for every element it holds of a
        parameter that steps, from the owners' ``updates[block]``."""
        if self.world == 1:
            rects = self._stepped(self.grads_to[self.rank], stepped)
            return [self._local(pieces, r, "value") for r in rects], [updates[r.block] for r in rects]
        if self.replicated:
            return self._gathered_pairs(pieces, stepped, updates, comm_dtype, pg)
        outgoing = [self._stepped(r, stepped) for r in self.updates_to]
        incoming = [self._stepped(r, stepped) for r in self.updates_from]
        parts = [[self._in_block(updates, r) for r in rects] for rects in outgoing]
        sizes = [sum(r.numel for r in rs) for rs in incoming]
        received = self._all_to_all(parts, sizes, comm_dtype, pieces[0].value.device, pg)
        dsts: list[Tensor] = []
        srcs: list[Tensor] = []
        for rects, data in zip(incoming, received):
            for rect, chunk in zip(rects, data.split([r.numel for r in rects])):
                dsts.append(self._local(pieces, rect, "value"))
                srcs.append(chunk.view(dsts[-1].shape))
        return dsts, srcs

    def _gathered_pairs(
        self, pieces: Sequence[Piece], stepped: Sequence[bool], updates: dict[int, Tensor],
        comm_dtype: torch.dtype, pg: dist.ProcessGroup | None,
    ) -> tuple[list[Tensor], list[Tensor]]:
        owned = [[b for b in blocks if stepped[self.blocks[b].param]] for blocks in self.owned]
        sizes = [sum(self.blocks[b].numel for b in blocks) for blocks in owned]
        width = max(sizes)
        if width == 0:
            return [], []
        device = pieces[0].value.device
        mine = torch.zeros(width, dtype=comm_dtype, device=device)
        if sizes[self.rank]:
            mine[: sizes[self.rank]].copy_(torch.cat([updates[b].reshape(-1) for b in owned[self.rank]]))
        gathered = torch.empty(self.world * width, dtype=comm_dtype, device=device)
        dist.all_gather_into_tensor(gathered, mine, group=pg)
        self.traffic.add(width * (self.world - 1), width * (self.world - 1))
        dsts: list[Tensor] = []
        srcs: list[Tensor] = []
        for r, blocks in enumerate(owned):
            data = gathered[r * width : r * width + sizes[r]]
            for b, chunk in zip(blocks, data.split([self.blocks[b].numel for b in blocks])):
                dsts.append(self._local(pieces, whole_block(b, self.blocks[b]), "value"))
                srcs.append(chunk.view(dsts[-1].shape))
        return dsts, srcs
