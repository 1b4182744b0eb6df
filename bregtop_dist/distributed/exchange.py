"""Gradients to block owners, preconditioned updates back to every rank that holds them.

Sharded layouts (FSDP2, ZeRO) move each rank's part of every block with one
``all_to_all_single`` each way: the intersection of the rank's piece (a flat range) with the
block, which is at most three rectangles (a partial first row, whole rows, a partial last
row). Replicated layouts (one device, DDP) need nothing on the way in, since the owner
already holds its blocks, and return updates with one ``all_gather_into_tensor``. Both sides
derive the same rectangle lists from the plan, so only values travel. The exchange only moves
data: it returns (parameter view, update) pairs, and
:func:`~bregtop_dist.update.apply_update` does the arithmetic.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

from bregtop_dist.distributed.assignment import Block
from bregtop_dist.distributed.layout import Piece, Range, rect_view


@dataclass(frozen=True)
class Rect:
    """The part of block ``block`` in rows ``rows`` and columns ``cols`` of its parameter's
    2-D view."""

    block: int
    rows: Range
    cols: Range

    @property
    def numel(self) -> int:
        return (self.rows[1] - self.rows[0]) * (self.cols[1] - self.cols[0])


def whole_block(index: int, block: Block) -> Rect:
    return Rect(index, (block.slice.r0, block.slice.r1), (block.slice.c0, block.slice.c1))


def intersect(index: int, block: Block, held: Range) -> list[Rect]:
    """The rectangles of ``block`` that fall in the flat range ``held`` of its parameter."""
    a, b = held
    if a >= b:
        return []
    c = block.cols
    s = block.slice
    first_full, end_full = -(-a // c), b // c  # rows entirely inside [a, b)
    if first_full > end_full:  # [a, b) lies inside one row
        parts = [((a // c, a // c + 1), (a % c, a % c + b - a))]
    else:
        parts = [((first_full, end_full), (0, c))]
        if a % c:
            parts.insert(0, ((first_full - 1, first_full), (a % c, c)))
        if b % c:
            parts.append(((end_full, end_full + 1), (0, b % c)))
    out = []
    for (i0, i1), (j0, j1) in parts:
        rows = (max(i0, s.r0), min(i1, s.r1))
        cols = (max(j0, s.c0), min(j1, s.c1))
        if rows[0] < rows[1] and cols[0] < cols[1]:
            out.append(Rect(index, rows, cols))
    return out


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
    """This rank's side of a plan's communication.

    ``send[d]``: rectangles of this rank's elements that owner ``d`` needs; ``recv[s]``: rectangles
    this rank, as owner, gets from rank ``s``; ``owned[r]``: the blocks rank ``r`` owns.
    """

    rank: int
    world: int
    replicated: bool
    blocks: list[Block]
    send: list[list[Rect]]
    recv: list[list[Rect]]
    owned: list[list[int]]
    traffic: Traffic = field(default_factory=Traffic)

    @classmethod
    def build(
        cls, blocks: list[Block], ranges: Sequence[Sequence[Range]], rank: int, world: int, replicated: bool
    ) -> Exchange:
        send: list[list[Rect]] = [[] for _ in range(world)]
        recv: list[list[Rect]] = [[] for _ in range(world)]
        owned: list[list[int]] = [[] for _ in range(world)]
        for i, blk in enumerate(blocks):
            owned[blk.owner].append(i)
            if replicated:
                if blk.owner == rank:
                    send[rank].append(whole_block(i, blk))
                    recv[rank].append(whole_block(i, blk))
                continue
            for src in range(world):
                rects = intersect(i, blk, ranges[blk.param][src])
                if src == rank:
                    send[blk.owner].extend(rects)
                if blk.owner == rank:
                    recv[src].extend(rects)
        return cls(rank, world, replicated, blocks, send, recv, owned)

    # ------------------------------------------------------------------- helpers
    def _local(self, pieces: Sequence[Piece], rect: Rect, tensor_of: str) -> Tensor:
        blk = self.blocks[rect.block]
        piece = pieces[blk.param]
        tensor = getattr(piece, tensor_of)
        return rect_view(tensor, piece.ranges[self.rank][0], blk.cols, rect.rows, rect.cols)

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
        send = [self._stepped(r, stepped) for r in self.send]
        recv = [self._stepped(r, stepped) for r in self.recv]
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
            rects = self._stepped(self.send[self.rank], stepped)
            return [self._local(pieces, r, "value") for r in rects], [updates[r.block] for r in rects]
        if self.replicated:
            return self._gathered_pairs(pieces, stepped, updates, comm_dtype, pg)
        recv = [self._stepped(r, stepped) for r in self.recv]
        send = [self._stepped(r, stepped) for r in self.send]
        parts = [[self._in_block(updates, r) for r in rects] for rects in recv]
        sizes = [sum(r.numel for r in rs) for rs in send]
        received = self._all_to_all(parts, sizes, comm_dtype, pieces[0].value.device, pg)
        dsts: list[Tensor] = []
        srcs: list[Tensor] = []
        for rects, data in zip(send, received):
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
