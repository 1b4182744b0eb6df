"""Order statistics of the joint Kronecker spectrum S = lam_L lam_R^T, without forming S.

Algorithm 2 needs the K-th largest entry of S (the top-set threshold) and two order
statistics of the bottom set (for the q-quantile). Sorting all m*n entries costs
O(mn log mn) time and O(mn) memory; here every count of "entries >= t" is done from the
two sorted eigenvalue vectors in O((m + n) log n), and an order statistic is found by
bisection over the bit patterns of the floating-point type, so the result is the exact
entry that sorting the materialised S (computed in the same dtype) would give.

All functions take a leading batch dimension: ``a`` is (B, m), ``b`` is (B, n).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bregtop_dist.core.dispatch import accelerator_paths

_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64}


def _row_counts_at_least(a_desc: Tensor, b_asc: Tensor, t: Tensor) -> Tensor:
    """Per row i, #{j : fl(a_i * b_j) >= t}; returns (B, Q, m) for t of shape (B, Q).

    Rows need not be sorted. The general path (float64 products, which are rounded).
    ``fl(a_i * b)`` is monotone in ``b``, so the qualifying j form a suffix of the ascending
    ``b``. A first guess from ``searchsorted(b, t / a_i)`` can be off where rounding puts
    ``b_j`` on the wrong side of ``t / a_i``; it is then moved over whole blocks of equal
    values, re-checking the exact product, until both neighbours agree.
    """
    bsz, m = a_desc.shape
    n = b_asc.shape[-1]
    q_count = t.shape[-1]
    a = a_desc[:, None, :]  # (B, 1, m)
    tt = t[:, :, None]  # (B, Q, 1)
    with torch.no_grad():
        ratio = torch.where(
            a > 0, tt / a.clamp_min(torch.finfo(a.dtype).tiny),
            torch.where(tt > 0, torch.inf, -torch.inf).to(a.dtype),
        )
        flat = ratio.reshape(bsz, q_count * m)
        start = torch.searchsorted(b_asc, flat, side="left")  # first j with b_j >= t/a_i
        a_flat = a.expand(bsz, q_count, m).reshape(bsz, q_count * m)
        t_flat = tt.expand(bsz, q_count, m).reshape(bsz, q_count * m)
        for _ in range(4 * n + 4):
            # Element just below the boundary qualifies -> move left past its block.
            left = (start - 1).clamp_min(0)
            b_left = torch.gather(b_asc, 1, left)
            move_left = (start > 0) & (a_flat * b_left >= t_flat)
            # Element at the boundary fails -> move right past its block.
            right = start.clamp_max(n - 1)
            b_right = torch.gather(b_asc, 1, right)
            move_right = (start < n) & ~(a_flat * b_right >= t_flat)
            if not bool((move_left | move_right).any()):
                break
            new_left = torch.searchsorted(b_asc, b_left, side="left")
            new_right = torch.searchsorted(b_asc, b_right, side="right")
            start = torch.where(move_left, new_left, torch.where(move_right, new_right, start))
        else:  # pragma: no cover - each pass crosses one block of equal values
            raise RuntimeError("order-statistic boundary search did not converge")
        return (n - start).reshape(bsz, q_count, m)


def _row_counts_at_least_f32(a_desc: Tensor, b_asc: Tensor, t: Tensor) -> Tensor:
    """The float32 case of :func:`_row_counts_at_least` in one pass, with no correction.

    A product of two float32 numbers is exact in float64, and ``fl32(x) >= t`` exactly when
    x lies above the midpoint between t and its float32 predecessor (at the midpoint itself,
    ties-to-even rounds up when t's last bit is even). An exact product differs from that
    midpoint by far more than float64's rounding of ``midpoint / a_i`` unless the two are
    equal, in which case the quotient is exact; so one ``searchsorted`` decides every entry,
    against the next float64 above the quotient where the comparison must be strict.
    """
    bsz, m = a_desc.shape
    q_count = t.shape[-1]
    a = a_desc.double()[:, None, :]  # (B, 1, m)
    b = b_asc.double()
    pred = torch.nextafter(t, torch.zeros_like(t))
    mid = ((t.double() + pred.double()) / 2)[:, :, None]  # (B, Q, 1), exact
    ratio = torch.where(a > 0, mid / a.clamp_min(torch.finfo(torch.float64).tiny), torch.inf)
    strict = (t.view(torch.int32) & 1 == 1)[:, :, None]  # odd t: the midpoint rounds down
    ratio = torch.where(strict, torch.nextafter(ratio, torch.full_like(ratio, torch.inf)), ratio)
    start = torch.searchsorted(b, ratio.reshape(bsz, q_count * m), side="left").reshape(bsz, q_count, m)
    counts = b.shape[-1] - start
    return torch.where(t[:, :, None] <= 0, b.shape[-1], counts)


def row_counts_at_least(a: Tensor, b_asc: Tensor, t: Tensor) -> Tensor:
    """Per row i of ``a`` (any order), #{j : fl(a_i * b_j) >= t}: (B, Q, m) for t (B, Q)."""
    if a.dtype == torch.float32:
        return _row_counts_at_least_f32(a, b_asc, t)
    return _row_counts_at_least(a, b_asc, t)


def count_at_least(a_desc: Tensor, b_asc: Tensor, t: Tensor) -> Tensor:
    """#{(i, j) : fl(a_i * b_j) >= t} for each batch row and query: (B, Q) int64.

    ``a_desc`` (B, m) sorted descending and ``b_asc`` (B, n) sorted ascending, both >= 0,
    of one dtype (float32 or float64); ``t`` (B, Q) of that dtype. The count runs over the
    shorter of the two vectors (S and S^T have the same entries).
    """
    if a_desc.shape[-1] > b_asc.shape[-1]:
        a_desc, b_asc = b_asc.flip(-1), a_desc.flip(-1)
    return row_counts_at_least(a_desc, b_asc, t).sum(-1)


def search_ways(batch: int, queries: int, m: int, n: int) -> int:
    """Probe thresholds per pass + 1: wide passes pay off while a count is cheap (small
    blocks, where per-pass overhead dominates); large stacks do better with narrow ones."""
    return 16 if batch * queries * min(m, n) < 2048 else 4


def search_passes(dtype: torch.dtype, ways: int) -> int:
    """Passes that always suffice: each shrinks a bracket of R bit patterns to at most
    R / ways + 1, and a bracket narrower than ``ways`` closes in one pass."""
    bits = 31 if dtype == torch.float32 else 63
    return math.ceil(bits / math.log2(ways)) + 2


def kth_largest_product(
    a_desc: Tensor, b_asc: Tensor, rank: Tensor, ways: int | None = None, fixed_passes: bool | None = None
) -> Tensor:
    """The ``rank``-th largest (0-based) entry of the outer product a b^T, per batch row.

    ``rank`` is (B, Q) int64 with values in [0, m*n). Returns (B, Q) in a's dtype
    (float32 or float64): the value ``sort(outer(a, b).flatten(), descending=True)[rank]``.
    A ``ways``-ary search over bit patterns: each pass counts ``ways - 1`` probe thresholds
    at once and shrinks the bracket ``ways``-fold (default: :func:`search_ways`).
    ``fixed_passes`` (default: on the accelerator paths, see
    :func:`bregtop_dist.core.dispatch.accelerator_paths`) runs :func:`search_passes` passes
    instead of stopping when every bracket has closed, so the device never waits for the
    host; extra passes leave a closed bracket unchanged.
    """
    if ways is None:
        ways = search_ways(rank.shape[0], rank.shape[1], a_desc.shape[-1], b_asc.shape[-1])
    if fixed_passes is None:
        fixed_passes = accelerator_paths(a_desc.device)
    dtype = a_desc.dtype
    if dtype not in _INT_VIEW:
        raise TypeError(f"kth_largest_product needs float32 or float64, got {dtype}")
    int_dtype = _INT_VIEW[dtype]
    bsz, q_count = rank.shape
    smallest = a_desc[:, -1:] * b_asc[:, :1]  # (B, 1)
    largest = a_desc[:, :1] * b_asc[:, -1:]
    # Non-negative floats order like their bit patterns read as signed integers.
    lo = smallest.expand(-1, q_count).contiguous().view(int_dtype).to(torch.int64)
    hi = largest.expand(-1, q_count).contiguous().view(int_dtype).to(torch.int64)
    need = (rank + 1)[:, :, None]
    probes = torch.arange(1, ways, dtype=torch.int64, device=rank.device)  # (ways-1,)
    # Invariant: count(value(lo)) >= need > count(value(hi + 1)); the answer is lo at the end.
    passes = search_passes(dtype, ways)
    for _ in range(passes):
        if not fixed_passes and not bool((lo < hi).any()):
            break
        step = ((hi - lo) // ways).clamp_min(1)[:, :, None]
        cand = torch.minimum(lo[:, :, None] + step * probes, hi[:, :, None])  # (B, Q, ways-1)
        values = cand.to(int_dtype).view(dtype).reshape(bsz, -1)
        ok = count_at_least(a_desc, b_asc, values).reshape(cand.shape) >= need
        # ok is monotone: true for the low probes, false above the answer.
        lo = torch.where(ok, cand, lo[:, :, None]).amax(-1)
        hi = torch.where(ok, hi[:, :, None], cand - 1).amin(-1)
    return lo.to(int_dtype).view(dtype)
