"""Where a stack's rows sit in this rank's own parameters, as few strided views as the tiling
allows: one foreach copy then fills a stack's gradient buffer, and the update returns through
one view per run instead of one per block (on a GPU, one launch each per block).
Used where the owner already holds its blocks whole (one process, and the local side of
replicated layouts). A *run* is a sequence of consecutive stack rows that are neighbouring
blocks of one parameter, side by side in a block row (stride: the block width) or one above
the other in a block column (stride: the block height times the row length), so that one 3-D
strided view of the parameter covers the run.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from bregtop_dist.distributed.assignment import Block
from bregtop_dist.distributed.layout import Piece


@dataclass(frozen=True)
class Run:
    """Rows ``rows`` of a stack: ``count`` blocks of shape ``shape`` of parameter ``param``
    (its index in the plan), the first at element ``start`` of its row-major flattening,
    ``stride`` elements apart."""

    param: int
    rows: int
    count: int
    start: int
    stride: int
    shape: tuple[int, int]
    cols: int  # the parameter's 2-D row length

    def covers(self, numel: int) -> bool:
        """Whether the run is all of a parameter of ``numel`` elements, in its own order (a
        column of full-width blocks): then the parameter's tensor itself is the run's source."""
        m, n = self.shape
        return self.start == 0 and n == self.cols and self.count * m * n == numel and (
            self.count == 1 or self.stride == m * n)

    def view(self, flat: Tensor) -> Tensor:
        """The (count, m, n) strided view of these blocks in ``flat`` (the parameter's elements)."""
        m, n = self.shape
        return torch.as_strided(flat, (self.count, m, n), (self.stride, self.cols, 1),
                                flat.storage_offset() + self.start)


def _extends(run: Run, last: Block, blk: Block) -> int | None:
    """The stride at which ``blk`` continues a run ending in ``last``, or None."""
    if blk.param != last.param:
        return None
    s, t = last.slice, blk.slice
    right = t.r0 == s.r0 and t.c0 == s.c1  # next block of the block row
    below = t.c0 == s.c0 and t.r0 == s.r1  # next block of the block column
    stride = (t.r0 - s.r0) * blk.cols + (t.c0 - s.c0)
    if (right or below) and (run.count == 1 or stride == run.stride):
        return stride
    return None


def stack_runs(block_ids: Sequence[int], blocks: Sequence[Block]) -> list[Run]:
    """The runs of a stack, in row order (their ``rows`` add up to ``len(block_ids)``)."""
    runs: list[Run] = []
    last: Block | None = None
    for b in block_ids:
        blk = blocks[b]
        stride = None if last is None or not runs else _extends(runs[-1], last, blk)
        if stride is None:
            start = blk.slice.r0 * blk.cols + blk.slice.c0
            runs.append(Run(blk.param, 1, 1, start, 0, blk.shape, blk.cols))
        else:
            p = runs[-1]
            runs[-1] = Run(p.param, p.rows + 1, p.count + 1, p.start, stride, p.shape, p.cols)
        last = blk
    return runs


class StackViews:
    """The runs of every owned stack of a plan, with the parameter views cached (a
    parameter's storage does not move between steps; a moved one is looked up again)."""

    def __init__(self, stacks: dict[tuple[int, int], list[int]], blocks: Sequence[Block]) -> None:
        self.runs = {shape: stack_runs(ids, blocks) for shape, ids in stacks.items()}
        self.sizes = {shape: [p.rows for p in ps] for shape, ps in self.runs.items()}
        self._values: dict[tuple[int, int], tuple[tuple[int, ...], list[Tensor]]] = {}
        self._buffers: dict[tuple[int, int], tuple[Tensor, list[Tensor]]] = {}

    def gather(self, pieces: Sequence[Piece], buffers: dict[tuple[int, int], Tensor]) -> None:
        """Copy every stack's gradients into ``buffers[shape]`` (B, m, n), one foreach copy.
        The buffers must be the same tensors every step (their views are kept)."""
        dsts: list[Tensor] = []
        srcs: list[Tensor] = []
        for shape, buffer in buffers.items():
            dsts += self._buffer_views(shape, buffer, pieces)
            for p in self.runs[shape]:
                grad = pieces[p.param].grad
                assert grad is not None
                srcs.append(grad if p.covers(grad.numel()) and grad.is_contiguous() else p.view(grad))
        if dsts:  # a rank may own no block
            torch._foreach_copy_(dsts, srcs)

    def _buffer_views(self, shape: tuple[int, int], buffer: Tensor, pieces: Sequence[Piece]) -> list[Tensor]:
        """Per run, its rows of ``buffer``, shaped like the parameter where the run covers it."""
        cached = self._buffers.get(shape)
        if cached is None or cached[0] is not buffer:
            views = []
            for chunk, p in zip(buffer.split(self.sizes[shape]), self.runs[shape]):
                grad = pieces[p.param].grad
                assert grad is not None
                views.append(chunk.view(grad.shape) if p.covers(grad.numel()) else chunk)
            cached = (buffer, views)
            self._buffers[shape] = cached
        return cached[1]

    def update_pairs(
        self, pieces: Sequence[Piece], updates: dict[tuple[int, int], Tensor]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """(parameter views, their updates): every stack's rows of ``updates[shape]`` next to
        the views of the parameters they update, for :func:`~bregtop_dist.update.apply_update`."""
        dsts: list[Tensor] = []
        srcs: list[Tensor] = []
        for shape, update in updates.items():
            dsts += self._value_views(shape, pieces)
            srcs += list(update.split(self.sizes[shape]))
        return dsts, srcs

    def _value_views(self, shape: tuple[int, int], pieces: Sequence[Piece]) -> list[Tensor]:
        runs = self.runs[shape]
        where = tuple(pieces[r.param].value.data_ptr() for r in runs)
        cached = self._values.get(shape)
        if cached is None or cached[0] != where:
            cached = (where, [r.view(pieces[r.param].value) for r in runs])
            self._values[shape] = cached
        return cached[1]
