"""Eigenvalue statistics of Algorithm 1 (lines 4-5) fused with the momentum update.

From the rotated gradient ``Gt = U_L^T G U_R`` one pass computes the weighted row and column
sums ``rowsum(Gt^2 w_L)`` and ``colsum(Gt^2 w_R)`` (``w`` a per-block scalar or a vector, as
``bregtop_dist.core.stats.factor_weights`` gives them) and, with the tile already in
registers, the rotated momentum ``Mt <- lerp(Mt, Gt, 1 - beta1)`` in place. Each program
writes partial sums for its tile, which torch adds up: no atomics, so results are
deterministic (exact resume needs that). One launch covers a stack of same-shape blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M = 32
BLOCK_N = 64


@triton.jit
def _rotated_stats_kernel(
    gt_ptr,
    mt_ptr,
    wl_ptr,
    wr_ptr,
    row_part_ptr,
    col_part_ptr,
    m,
    n,
    weight,
    tiles_m,
    tiles_n,
    WL_VECTOR: tl.constexpr,
    WR_VECTOR: tl.constexpr,
    UPDATE_MOMENTUM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)  # 64-bit: a stack may hold 2^31 elements or more
    pm = tl.program_id(1)
    pn = tl.program_id(2)
    rows = pm * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pn * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    inside = row_ok[:, None] & col_ok[None, :]
    offs = blk * m * n + rows[:, None] * n + cols[None, :]

    g = tl.load(gt_ptr + offs, mask=inside, other=0.0)
    sq = g * g
    if WL_VECTOR:
        wl = tl.load(wl_ptr + blk * n + cols, mask=col_ok, other=0.0)
        row_part = tl.sum(sq * wl[None, :], axis=1)
    else:
        row_part = tl.sum(sq, axis=1) * tl.load(wl_ptr + blk)
    if WR_VECTOR:
        wr = tl.load(wr_ptr + blk * m + rows, mask=row_ok, other=0.0)
        col_part = tl.sum(sq * wr[:, None], axis=0)
    else:
        col_part = tl.sum(sq, axis=0) * tl.load(wr_ptr + blk)
    tl.store(row_part_ptr + (blk * tiles_n + pn) * m + rows, row_part, mask=row_ok)
    tl.store(col_part_ptr + (blk * tiles_m + pm) * n + cols, col_part, mask=col_ok)

    if UPDATE_MOMENTUM:  # torch.lerp's formula for a weight below 0.5
        x = tl.load(mt_ptr + offs, mask=inside, other=0.0)
        tl.store(mt_ptr + offs, x + weight * (g - x), mask=inside)


def rotated_stats(
    gt: Tensor, w_l: Tensor, w_r: Tensor, momentum: Tensor | None = None, beta1: float = 0.0
) -> tuple[Tensor, Tensor]:
    """``(rowsum(Gt^2 w_L), colsum(Gt^2 w_R))`` for a stack (B, m, n) of float32 blocks.

    ``w_l`` is (B, 1) or (B, n) and ``w_r`` (B, 1) or (B, m), float32. With ``momentum``
    (B, m, n) float32 it also does ``momentum.lerp_(gt, 1 - beta1)`` in place
    (``1 - beta1`` must be below 0.5, as torch's lerp formula then reads).
    """
    bsz, m, n = gt.shape
    if gt.dtype != torch.float32 or not gt.is_contiguous():
        raise ValueError(f"gt must be a contiguous float32 (B, m, n) tensor, got {gt.dtype}, strides {gt.stride()}")
    if w_l.shape not in ((bsz, 1), (bsz, n)) or w_r.shape not in ((bsz, 1), (bsz, m)):
        raise ValueError(
            f"w_l must be (B, 1) or (B, n) = {(bsz, n)} and w_r (B, 1) or (B, m) = {(bsz, m)}; "
            f"got {tuple(w_l.shape)} and {tuple(w_r.shape)}"
        )
    weight = 1.0 - beta1
    if momentum is not None:
        if momentum.shape != gt.shape or momentum.dtype != torch.float32 or not momentum.is_contiguous():
            raise ValueError("momentum must be a contiguous float32 tensor of gt's shape")
        if not 0.0 <= weight < 0.5:
            raise ValueError(f"beta1={beta1!r} is not allowed here: 1 - beta1 must be in [0, 0.5)")
    tiles_m, tiles_n = triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N)
    # NaN-filled, so a partial sum the kernel fails to write shows in the result.
    row_part = torch.full((bsz, tiles_n, m), torch.nan, dtype=torch.float32, device=gt.device)
    col_part = torch.full((bsz, tiles_m, n), torch.nan, dtype=torch.float32, device=gt.device)
    _rotated_stats_kernel[(bsz, tiles_m, tiles_n)](
        gt,
        gt if momentum is None else momentum,
        w_l.float().contiguous(),
        w_r.float().contiguous(),
        row_part,
        col_part,
        m,
        n,
        weight,
        tiles_m,
        tiles_n,
        WL_VECTOR=w_l.shape[-1] != 1 or n == 1,
        WR_VECTOR=w_r.shape[-1] != 1 or m == 1,
        UPDATE_MOMENTUM=momentum is not None,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
    )
    return row_part.sum(1), col_part.sum(1)
