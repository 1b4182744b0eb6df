"""Which parameters of a group are Kronecker-preconditioned, cut into which blocks, and
how same-shape blocks are stacked so that one step runs a few batched kernels per shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from bregtop_dist.core.block_step import KronBlockState, lpt_refresh_offsets
from bregtop_dist.core.blocking import BlockSlice, block_slices, matrix_shape


@dataclass(frozen=True)
class BlockRef:
    """One block: the parameter it lives in, its 2-D view shape and its slice of that view."""

    param: Tensor
    view: tuple[int, int]
    block: BlockSlice

    def of(self, tensor: Tensor) -> Tensor:
        """This block's piece of ``tensor`` (the parameter or its gradient), as a view."""
        r, c = self.view
        return tensor.view(r, c)[self.block.r0 : self.block.r1, self.block.c0 : self.block.c1]


@dataclass
class BlockStack:
    """All blocks of one param group that share a shape, with their stacked state."""

    group: int
    shape: tuple[int, int]
    blocks: list[BlockRef]
    offsets: Tensor  # (B,) int64 refresh offsets
    state: KronBlockState | None = field(default=None)

    @property
    def key(self) -> str:
        m, n = self.shape
        return f"{self.group}:{m}x{n}"

    def state_shapes(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of every state field of this stack, as :meth:`empty_state` makes them."""
        bsz = len(self.blocks)
        m, n = self.shape
        f32 = torch.float32
        return {
            "momentum": ((bsz, m, n), f32),
            "L": ((bsz, m, m), f32),
            "R": ((bsz, n, n), f32),
            "U_L": ((bsz, m, m), f32),
            "U_R": ((bsz, n, n), f32),
            "lam_L": ((bsz, m), f32),
            "lam_R": ((bsz, n), f32),
            "step": ((bsz,), torch.int64),
        }

    def empty_state(self, device: torch.device | str = "cpu") -> KronBlockState:
        """Zero state for every block (step 0 marks a block not yet initialised): identity
        bases and unit eigenvalue estimates."""
        fields = {
            name: torch.zeros(shape, dtype=dtype, device="cpu" if name == "step" else device)
            for name, (shape, dtype) in self.state_shapes().items()
        }
        for basis in ("U_L", "U_R"):
            fields[basis] += torch.eye(fields[basis].shape[-1], device=device)
        for lam in ("lam_L", "lam_R"):
            fields[lam] += 1.0
        return KronBlockState(**fields)


def is_kron_param(param: Tensor, bregtop_group: bool) -> bool:
    """Matrices (ndim >= 2) of a BregTop group; everything else runs on the AdamW side."""
    return bregtop_group and param.ndim >= 2


def plan_group(
    group_index: int, params: list[Tensor], max_dim: int, frequency: int, stagger: bool
) -> list[BlockStack]:
    """Cut the Kronecker params of one group into blocks, stacked by shape.

    Refresh offsets are balanced over the whole group by the QR cost m^3 + n^3.
    """
    refs: list[BlockRef] = []
    for p in params:
        view = matrix_shape(p.shape)
        refs.extend(BlockRef(p, view, b) for b in block_slices(*view, max_dim))
    costs = [float(r.block.shape[0] ** 3 + r.block.shape[1] ** 3) for r in refs]
    offsets = lpt_refresh_offsets(costs, frequency, stagger)
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, r in enumerate(refs):
        by_shape.setdefault(r.block.shape, []).append(i)
    return [
        BlockStack(
            group=group_index,
            shape=shape,
            blocks=[refs[i] for i in idx],
            offsets=torch.tensor([offsets[i] for i in idx], dtype=torch.int64),
        )
        for shape, idx in by_shape.items()
    ]
