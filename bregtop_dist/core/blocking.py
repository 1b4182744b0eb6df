"""How a parameter becomes Kronecker blocks: a 2-D view, its parts, then blocks of at most
max_dim a side.

A tensor with ndim >= 2 is read as the matrix (shape[0], prod(shape[1:])) of its row-major
flattening. A fused parameter (q, k and v in one matrix) is first cut into ``parts`` equal
parts along one side, each its own Kronecker matrix, as the paper treats Q, K and V. Each side
(of a part) longer than ``max_dim`` is then cut into ceil(d / max_dim) nearly equal pieces
(sizes differ by at most one), so a parameter yields at most two block shapes per side and
same-shape blocks can be stacked.
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


def part_sizes(dim: int, parts: int, max_dim: int) -> list[int]:
    """The pieces of a side cut into ``parts`` equal parts, each then into pieces of at most
    ``max_dim``; a ValueError when ``parts`` does not divide ``dim``."""
    if dim % parts:
        raise ValueError(f"a side of {dim} cannot be cut into {parts} equal parts")
    return [size for _ in range(parts) for size in split_sizes(dim // parts, max_dim)] if dim else [0]


def block_slices(rows: int, cols: int, max_dim: int, parts: int = 1, parts_dim: int = 0) -> list[BlockSlice]:
    """The blocks of a rows x cols matrix (``parts`` equal parts along rows for ``parts_dim``
    0, columns for 1), row-major over the block grid."""
    out: list[BlockSlice] = []
    r0 = 0
    row_sizes = part_sizes(rows, parts, max_dim) if parts_dim == 0 else split_sizes(rows, max_dim)
    col_sizes = part_sizes(cols, parts, max_dim) if parts_dim == 1 else split_sizes(cols, max_dim)
    for rs in row_sizes:
        c0 = 0
        for cs in col_sizes:
            out.append(BlockSlice(r0, r0 + rs, c0, c0 + cs))
            c0 += cs
        r0 += rs
    return out
