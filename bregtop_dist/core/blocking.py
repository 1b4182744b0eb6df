"""How a parameter becomes Kronecker blocks: a 2-D view, then blocks of at most max_dim a side.

A tensor with ndim >= 2 is read as the matrix (shape[0], prod(shape[1:])) of its row-major
flattening; each side longer than ``max_dim`` is cut into ceil(d / max_dim) nearly equal
pieces (sizes differ by at most one), so a parameter yields at most two block shapes per side
and same-shape blocks can be stacked.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def matrix_shape(shape: Sequence[int]) -> tuple[int, int]:
    """The (rows, cols) of the 2-D view of a tensor with ndim >= 2."""
    if len(shape) < 2:
        raise ValueError(f"a Kronecker block needs ndim >= 2, got shape {tuple(shape)}")
    return int(shape[0]), math.prod(int(d) for d in shape[1:])


def split_sizes(dim: int, max_dim: int) -> list[int]:
    """Sizes of ceil(dim / max_dim) nearly equal pieces of one side."""
    pieces = max(1, math.ceil(dim / max_dim))
    base, extra = divmod(dim, pieces)
    return [base + 1 if i < extra else base for i in range(pieces)]


@dataclass(frozen=True)
class BlockSlice:
    """One block of a parameter's 2-D view: rows [r0, r1), cols [c0, c1)."""

    r0: int
    r1: int
    c0: int
    c1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.r1 - self.r0, self.c1 - self.c0


def block_slices(rows: int, cols: int, max_dim: int) -> list[BlockSlice]:
    """The blocks of a rows x cols matrix, row-major over the block grid."""
    out: list[BlockSlice] = []
    r0 = 0
    for rs in split_sizes(rows, max_dim):
        c0 = 0
        for cs in split_sizes(cols, max_dim):
            out.append(BlockSlice(r0, r0 + rs, c0, c0 + cs))
            c0 += cs
        r0 += rs
    return out
