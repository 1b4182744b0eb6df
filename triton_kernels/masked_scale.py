"""Fused masked scaling of Algorithm 2: ``out = Mt * W`` in one pass over the rotated momentum.

W is never materialised: each program loads a tile of ``Mt`` and the matching slices of
``lam_L`` and ``lam_R``, forms ``S = lam_L lam_R^T`` in registers, and writes ``Mt / (S^power + eps)`` at
or above the threshold (the top set), ``Mt * chi`` below it, blended linearly in the band
just below the threshold (``bregtop_dist.core.precondition.selection_weights``). The optimizer passes the square roots of the eigenvalues with power 1 (p = 1/2)
or 1/2 (Shampoo's p = 1/4), so that S stays in the float32 range.
One launch covers a whole stack of same-shape blocks (grid axis 0 is the block).
The torch reference is ``bregtop_dist.core.precondition.apply_top_set``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_M = 32
BLOCK_N = 64


@triton.jit
def _masked_scale_kernel(
    mt_ptr,
    out_ptr,
    lam_l_ptr,
    lam_r_ptr,
    thr_ptr,
    chi_ptr,
    m,
    n,
    eps,
    band,
    stride_b,
    stride_m,
    stride_out_b,
    stride_out_m,
    EPS_ZERO: tl.constexpr,
    POWER_ONE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)  # 64-bit: a stack may hold 2^31 elements or more
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < m
    col_ok = cols < n
    inside = row_ok[:, None] & col_ok[None, :]

    a = tl.load(lam_l_ptr + blk * m + rows, mask=row_ok, other=1.0)
    b = tl.load(lam_r_ptr + blk * n + cols, mask=col_ok, other=1.0)
    s = a[:, None] * b[None, :]  # the joint spectrum, in registers only
    thr = tl.load(thr_ptr + blk)
    chi = tl.load(chi_ptr + blk)
    top = s >= thr
    ramp = tl.minimum(tl.maximum(tl.div_rn(tl.div_rn(s, thr) - (1.0 - band), band), 0.0), 1.0)  # as torch rounds
    if EPS_ZERO:
        s = tl.maximum(s, 1.1754943508222875e-38)  # float32's smallest normal: the scale is never inf
    if POWER_ONE:
        root = s
    else:
        root = tl.sqrt_rn(s)  # round-to-nearest, as torch: tl.sqrt and "/" are approximate on GPUs
    if EPS_ZERO:
        scale = tl.div_rn(1.0, root)
    else:
        scale = tl.div_rn(1.0, root + eps)
    w = tl.where(top, scale, chi + ramp * (scale - chi))

    x = tl.load(mt_ptr + blk * stride_b + rows[:, None] * stride_m + cols[None, :], mask=inside, other=0.0)
    y = x.to(tl.float32) * w
    tl.store(
        out_ptr + blk * stride_out_b + rows[:, None] * stride_out_m + cols[None, :],
        y.to(out_ptr.dtype.element_ty),
        mask=inside,
    )


def masked_scale(
    mt: Tensor,
    lam_l: Tensor,
    lam_r: Tensor,
    threshold: Tensor,
    chi: Tensor,
    eps: float,
    band: float,
    out: Tensor | None = None,
    power: float = 0.5,
) -> Tensor:
    """``Mt * W`` for a stack of blocks in one launch; W is ``1 / (S^power + eps)`` on the
    top set (``power`` 0.5 or 1), chi elsewhere, blended within ``band`` (relative, in (0, 1))
    below the threshold.

    ``mt`` (B, m, n) float32 or bfloat16 with unit stride along n; ``lam_l`` (B, m) and
    ``lam_r`` (B, n) float32; ``threshold``, ``chi`` (B,) float32 as in
    ``bregtop_dist.core.precondition.TopSet``. Returns ``out`` (B, m, n) in mt's dtype.
    """
    bsz, m, n = mt.shape
    if lam_l.shape != (bsz, m) or lam_r.shape != (bsz, n):
        raise ValueError(
            f"lam_l and lam_r must have shapes {(bsz, m)} and {(bsz, n)} for mt of shape {(bsz, m, n)}, "
            f"got {tuple(lam_l.shape)} and {tuple(lam_r.shape)}"
        )
    if mt.stride(-1) != 1:
        raise ValueError(f"mt must have unit stride along its last dimension, got strides {mt.stride()}")
    for name, t in (("lam_l", lam_l), ("lam_r", lam_r), ("threshold", threshold), ("chi", chi)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
    if not 0.0 < band < 1.0:
        raise ValueError(f"band={band!r} is not allowed; it must lie in (0, 1)")
    if power not in (0.5, 1.0):
        raise ValueError(f"power={power!r} is not allowed; allowed: 0.5, 1.0")
    if out is None:
        out = torch.empty_like(mt)
    grid = (bsz, triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _masked_scale_kernel[grid](
        mt,
        out,
        lam_l.contiguous(),
        lam_r.contiguous(),
        threshold.contiguous(),
        chi.contiguous(),
        m,
        n,
        float(eps),
        float(band),
        mt.stride(0),
        mt.stride(1),
        out.stride(0),
        out.stride(1),
        EPS_ZERO=eps == 0.0,
        POWER_ONE=power == 1.0,
        BLOCK_M=BLOCK_M,
        BLOCK_N=BLOCK_N,
    )
    return out
