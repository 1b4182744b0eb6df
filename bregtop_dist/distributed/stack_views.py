"""Where a stack's rows sit in this rank's own parameters, as few strided views as the tiling
allows: one foreach copy then fills a stack's gradient buffer, and one foreach add returns its
update, instead of one copy and one add per block (on a GPU, one launch each per block).

Used where the owner already holds its blocks whole (one process, and the local side of
replicated layouts). A *piece* is a run of consecutive stack rows that are neighbouring tiles
of one parameter, side by side in a tile row (stride: the tile width) or one above the other
in a tile column (stride: the tile height times the row length), so that one 3-D strided view
of the parameter covers the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bregtop_dist.core.descend import descend_
from bregtop_dist.distributed.assignment import Block
from bregtop_dist.distributed.layout import ParamShard


@dataclass(frozen=True)
class Piece:
    """Rows ``rows`` of a stack: ``count`` tiles of parameter ``shard``, the first at element
    ``offset`` of its row-major flattening, ``stride`` elements apart."""

    shard: int
    rows: int
    count: int
    offset: int
    stride: int
    tile: tuple[int, int]
    cols: int  # the parameter's 2-D row length

    def covers(self, numel: int) -> bool:
        """Whether the piece is all of a parameter of ``numel`` elements, in its own order (a
        column of full-width tiles): then the parameter's tensor itself is the piece's source."""
        m, n = self.tile
        return self.offset == 0 and n == self.cols and self.count * m * n == numel and (
            self.count == 1 or self.stride == m * n)

    def view(self, flat: Tensor) -> Tensor:
        """The (count, m, n) strided view of these tiles in ``flat`` (the parameter's elements)."""
        m, n = self.tile
        return torch.as_strided(flat, (self.count, m, n), (self.stride, self.cols, 1),
                                flat.storage_offset() + self.offset)


def _extends(piece: Piece, last: Block, blk: Block) -> int | None:
    """The stride at which ``blk`` continues a piece ending in ``last``, or None."""
    if blk.shard != last.shard:
        return None
    s, t = last.slice, blk.slice
    right = t.r0 == s.r0 and t.c0 == s.c1  # next tile of the tile row
    below = t.c0 == s.c0 and t.r0 == s.r1  # next tile of the tile column
    stride = (t.r0 - s.r0) * blk.cols + (t.c0 - s.c0)
    if (right or below) and (piece.count == 1 or stride == piece.stride):
        return stride
    return None


def stack_pieces(block_ids: Sequence[int], blocks: Sequence[Block]) -> list[Piece]:
    """The pieces of a stack, in row order (their ``rows`` add up to ``len(block_ids)``)."""
    pieces: list[Piece] = []
    last: Block | None = None
    for b in block_ids:
        blk = blocks[b]
        stride = None if last is None or not pieces else _extends(pieces[-1], last, blk)
        if stride is None:
            offset = blk.slice.r0 * blk.cols + blk.slice.c0
            pieces.append(Piece(blk.shard, 1, 1, offset, 0, blk.shape, blk.cols))
        else:
            p = pieces[-1]
            pieces[-1] = Piece(p.shard, p.rows + 1, p.count + 1, p.offset, stride, p.tile, p.cols)
        last = blk
    return pieces


class StackViews:
    """The pieces of every owned stack of a plan, with the parameter views cached (a
    parameter's storage does not move between steps; a moved one is looked up again)."""

    def __init__(self, stacks: dict[tuple[int, int], list[int]], blocks: Sequence[Block]) -> None:
        self.pieces = {shape: stack_pieces(ids, blocks) for shape, ids in stacks.items()}
        self.sizes = {shape: [p.rows for p in ps] for shape, ps in self.pieces.items()}
        self._values: dict[tuple[int, int], tuple[tuple[int, ...], list[Tensor]]] = {}
        self._buffers: dict[tuple[int, int], tuple[Tensor, list[Tensor]]] = {}

    def gather(self, shards: Sequence[ParamShard], buffers: dict[tuple[int, int], Tensor]) -> None:
        """Copy every stack's gradients into ``buffers[shape]`` (B, m, n), one foreach copy.
        The buffers must be the same tensors every step (their views are kept)."""
        dsts: list[Tensor] = []
        srcs: list[Tensor] = []
        for shape, buffer in buffers.items():
            dsts += self._buffer_views(shape, buffer, shards)
            for p in self.pieces[shape]:
                grad = shards[p.shard].grad
                assert grad is not None
                srcs.append(grad if p.covers(grad.numel()) and grad.is_contiguous() else p.view(grad))
        if dsts:  # a rank may own no block
            torch._foreach_copy_(dsts, srcs)

    def _buffer_views(self, shape: tuple[int, int], buffer: Tensor, shards: Sequence[ParamShard]) -> list[Tensor]:
        """Per piece, its rows of ``buffer``, shaped like the parameter where the piece covers it."""
        cached = self._buffers.get(shape)
        if cached is None or cached[0] is not buffer:
            views = []
            for chunk, p in zip(buffer.split(self.sizes[shape]), self.pieces[shape]):
                grad = shards[p.shard].grad
                assert grad is not None
                views.append(chunk.view(grad.shape) if p.covers(grad.numel()) else chunk)
            cached = (buffer, views)
            self._buffers[shape] = cached
        return cached[1]

    def apply(self, shards: Sequence[ParamShard], updates: dict[tuple[int, int], Tensor], lr: float) -> None:
        """``value -= lr * update`` for every stack's rows (:func:`~bregtop_dist.core.descend.descend_`,
        the same roundings as the exchange's per-piece path)."""
        dsts: list[Tensor] = []
        srcs: list[Tensor] = []
        for shape, update in updates.items():
            dsts += self._value_views(shape, shards)
            srcs += list(update.split(self.sizes[shape]))
        descend_(dsts, srcs, lr)

    def _value_views(self, shape: tuple[int, int], shards: Sequence[ParamShard]) -> list[Tensor]:
        pieces = self.pieces[shape]
        where = tuple(shards[p.shard].value.data_ptr() for p in pieces)
        cached = self._values.get(shape)
        if cached is None or cached[0] != where:
            cached = (where, [p.view(shards[p.shard].value) for p in pieces])
            self._values[shape] = cached
        return cached[1]
