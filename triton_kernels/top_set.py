"""Algorithm 2's selection in one launch per stack: the top-set threshold and the two order
statistics of the bottom-set quantile.

On an accelerator the torch search (``bregtop_dist.core.selection``) costs hundreds of small
launches per stack; this kernel does the same exact search in one. Program ``(b, q)`` finds
the ``rank[q]``-th largest entry of ``S = a b^T`` for block ``b`` by bisection over float32
bit patterns (non-negative floats order like their bit patterns), each count of
``#{(i, j) : fl(a_i b_j) >= t}`` taken row by row with a lower-bound search over the ascending
``b``: ``fl(a_i b_j)`` is monotone in ``b_j``, so the search compares exact products and never
divides. The result is the entry that sorting the materialised float32 S would give, as in the
torch reference ``bregtop_dist.core.precondition.select_top_set``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

MAX_BLOCK_M = 1024


@triton.jit
def _count_rows(a, row_ok, b_ptr, n: tl.constexpr, t, LOG_N: tl.constexpr):
    """Per row (vector), #{j : fl(a_i * b_j) >= t} over the ascending row ``b_ptr[0:n]``."""
    lo = tl.zeros(a.shape, dtype=tl.int32)
    hi = tl.zeros(a.shape, dtype=tl.int32) + n
    for _ in tl.static_range(LOG_N):
        active = lo < hi
        mid = (lo + hi) // 2
        bm = tl.load(b_ptr + mid, mask=active & row_ok, other=0.0)
        hit = a * bm >= t
        hi = tl.where(active & hit, mid, hi)
        lo = tl.where(active & ~hit, mid + 1, lo)
    return tl.where(row_ok, n - lo, 0)


@triton.jit
def _count(a_ptr, b_ptr, m: tl.constexpr, n: tl.constexpr, t, BLOCK_M: tl.constexpr, LOG_N: tl.constexpr):
    """#{(i, j) : fl(a_i * b_j) >= t} for one block, int64."""
    total = tl.zeros((), dtype=tl.int64)
    for i0 in range(0, m, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        row_ok = rows < m
        a = tl.load(a_ptr + rows, mask=row_ok, other=0.0)
        total += tl.sum(_count_rows(a, row_ok, b_ptr, n, t, LOG_N).to(tl.int64))
    return total


@triton.jit
def _top_set_kernel(
    a_ptr,
    b_asc_ptr,
    rank_ptr,
    values_ptr,
    m: tl.constexpr,
    n: tl.constexpr,
    BLOCK_M: tl.constexpr,
    LOG_N: tl.constexpr,
):
    blk = tl.program_id(0).to(tl.int64)
    query = tl.program_id(1)
    a_row = a_ptr + blk * m
    b_row = b_asc_ptr + blk * n
    need = tl.load(rank_ptr + query) + 1

    # The bracket [lo, hi] of bit patterns: the smallest and the largest product.
    a_min = tl.full((), float("inf"), tl.float32)
    a_max = tl.zeros((), dtype=tl.float32)
    for i0 in range(0, m, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        a = tl.load(a_row + rows, mask=rows < m, other=float("nan"))
        a_min = tl.minimum(a_min, tl.min(tl.where(rows < m, a, float("inf")), axis=0))
        a_max = tl.maximum(a_max, tl.max(tl.where(rows < m, a, 0.0), axis=0))
    lo = (a_min * tl.load(b_row)).to(tl.int32, bitcast=True).to(tl.int64)
    hi = (a_max * tl.load(b_row + n - 1)).to(tl.int32, bitcast=True).to(tl.int64)
    # Invariant: count(value(lo)) >= need > count(value(hi + 1)); the answer is lo at the end.
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        t = mid.to(tl.int32).to(tl.float32, bitcast=True)
        ok = _count(a_row, b_row, m, n, t, BLOCK_M, LOG_N) >= need
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    thr = lo.to(tl.int32).to(tl.float32, bitcast=True)
    tl.store(values_ptr + blk * 3 + query, thr)


def top_set_statistics(a: Tensor, b_asc: Tensor, ranks: Tensor) -> Tensor:
    """Order statistics of ``S = a b^T`` per block: (B, 3) float32, the entries at ``ranks``.

    ``a`` (B, m), ``b_asc`` (B, n) float32 positive normal numbers (the root spectrum's factors;
    ``b_asc`` sorted ascending); ``ranks`` (3,) int64: 0-based descending ranks (the first is
    the threshold's, K - 1).
    """
    bsz, m = a.shape
    n = b_asc.shape[-1]
    for name, t in (("a", a), ("b_asc", b_asc)):
        if t.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {t.dtype}")
    if b_asc.shape != (bsz, n) or ranks.shape != (3,):
        raise ValueError(f"b_asc must be {(bsz, n)} and ranks (3,), got {tuple(b_asc.shape)}, {tuple(ranks.shape)}")
    values = torch.empty(bsz, 3, dtype=torch.float32, device=a.device)
    if bsz == 0:
        return values
    block_m = min(triton.next_power_of_2(m), MAX_BLOCK_M)
    log_n = max(1, int(n).bit_length())  # lower-bound passes: ceil(log2(n + 1))
    _top_set_kernel[(bsz, 3)](
        a.contiguous(), b_asc.contiguous(), ranks, values, m=m, n=n, BLOCK_M=block_m, LOG_N=log_n,
    )
    return values
