"""Kronecker factor statistics STATS(G, U_L, U_R, lam_L, lam_R) of Algorithm 1 (appendix B.3).

Each divergence gives its own factor increments (dL, dR):

==========  ===============================================  ===============================================
method      dL                                               dR
==========  ===============================================  ===============================================
shampoo     G G^T                                            G^T G
kl          G R^-1 G^T / n,  R^-1 ~ U_R diag(1/lam_R) U_R^T  G^T L^-1 G / m, likewise
vn-v1       G G^T / Tr(R)                                    G^T G / Tr(L)
vn-v2       G G^T / sum(lam_R)                               G^T G / sum(lam_L)
f-v1        G R G^T / Tr(R^2)                                G^T L G / Tr(L^2)
f-v2        G U_R diag(lam_R) U_R^T G^T / sum(lam_R^2)       G^T U_L diag(lam_L) U_L^T G / sum(lam_L^2)
==========  ===============================================  ===============================================

:func:`rotated_diagonals` gives ``diag(U^T dL U)`` and ``diag(U^T dR U)`` (lines 4-5 of
Algorithm 1) from the rotated gradient ``Gt = U_L^T G U_R`` by weighted row and column
sums of ``Gt^2``, with no m x m product; only f-v1, whose weight R is not diagonal in the
basis, needs ``dL``/``dR`` themselves.

Every function accepts leading batch dimensions: G is (..., m, n).
"""

from __future__ import annotations

import torch
from torch import Tensor

STATS_METHODS = ("shampoo", "kl", "vn-v1", "vn-v2", "f-v1", "f-v2")
_NEEDS_FACTORS = ("vn-v1", "f-v1")


def _trace(x: Tensor) -> Tensor:
    return torch.diagonal(x, dim1=-2, dim2=-1).sum(-1)


def _per_block(x: Tensor) -> Tensor:
    """A per-block scalar (...,) made broadcastable against (..., d, d)."""
    return x[..., None, None]


def _weighted_gram(x: Tensor, weight: Tensor) -> Tensor:
    """``x diag(weight) x^T`` for x (..., d, k), weight (..., k)."""
    return (x * weight[..., None, :]) @ x.mT


def _check(method: str, lam_l: Tensor, lam_r: Tensor, L: Tensor | None, R: Tensor | None) -> None:
    if method not in STATS_METHODS:
        raise ValueError(f"method={method!r} is unknown; allowed: {', '.join(STATS_METHODS)}")
    if method in _NEEDS_FACTORS and (L is None or R is None):
        raise ValueError(f"method={method!r} needs the current factors L and R; got L or R = None")


def kron_stats(
    method: str,
    G: Tensor,
    U_L: Tensor | None,
    U_R: Tensor | None,
    lam_L: Tensor,
    lam_R: Tensor,
    L: Tensor | None = None,
    R: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The factor increments (dL, dR) of ``method`` for gradient G (..., m, n).

    ``U_L``/``U_R`` may be ``None`` (identity). ``L``/``R`` are the current factors, needed
    by vn-v1 and f-v1.
    """
    _check(method, lam_L, lam_R, L, R)
    m, n = G.shape[-2:]
    if method in ("kl", "f-v2"):
        g_ur = G if U_R is None else G @ U_R  # (..., m, n)
        ul_g = G if U_L is None else U_L.mT @ G  # (..., m, n)
        if method == "kl":
            return _weighted_gram(g_ur, 1.0 / lam_R) / n, _weighted_gram(ul_g.mT, 1.0 / lam_L) / m
        d_l = _weighted_gram(g_ur, lam_R) / _per_block((lam_R**2).sum(-1))
        d_r = _weighted_gram(ul_g.mT, lam_L) / _per_block((lam_L**2).sum(-1))
        return d_l, d_r
    if method == "f-v1":
        assert L is not None and R is not None
        d_l = G @ R @ G.mT / _per_block((R * R).sum((-2, -1)))
        d_r = G.mT @ L @ G / _per_block((L * L).sum((-2, -1)))
        return d_l, d_r
    gram_l = G @ G.mT
    gram_r = G.mT @ G
    if method == "shampoo":
        return gram_l, gram_r
    if method == "vn-v1":
        assert L is not None and R is not None
        return gram_l / _per_block(_trace(R)), gram_r / _per_block(_trace(L))
    # vn-v2
    return gram_l / _per_block(lam_R.sum(-1)), gram_r / _per_block(lam_L.sum(-1))


def rotated_diagonals(
    method: str,
    Gt: Tensor,
    lam_L: Tensor,
    lam_R: Tensor,
    L: Tensor | None = None,
    R: Tensor | None = None,
    dL: Tensor | None = None,
    dR: Tensor | None = None,
    U_L: Tensor | None = None,
    U_R: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(diag(U_L^T dL U_L), diag(U_R^T dR U_R))`` from ``Gt = U_L^T G U_R`` (..., m, n).

    f-v1 is the one method whose weight is not diagonal in the eigenbasis: it reads
    ``dL``, ``dR`` and the bases instead of ``Gt``.
    """
    _check(method, lam_L, lam_R, L, R)
    m, n = Gt.shape[-2:]
    if method == "f-v1":
        if dL is None or dR is None:
            raise ValueError("method='f-v1' needs dL and dR to form the rotated diagonals")
        diag_l = torch.diagonal(dL, dim1=-2, dim2=-1) if U_L is None else (U_L * (dL @ U_L)).sum(-2)
        diag_r = torch.diagonal(dR, dim1=-2, dim2=-1) if U_R is None else (U_R * (dR @ U_R)).sum(-2)
        return diag_l, diag_r
    sq = Gt * Gt
    if method == "kl":
        return (sq / lam_R[..., None, :]).sum(-1) / n, (sq / lam_L[..., :, None]).sum(-2) / m
    if method == "f-v2":
        diag_l = (sq * lam_R[..., None, :]).sum(-1) / (lam_R**2).sum(-1, keepdim=True)
        diag_r = (sq * lam_L[..., :, None]).sum(-2) / (lam_L**2).sum(-1, keepdim=True)
        return diag_l, diag_r
    row, col = sq.sum(-1), sq.sum(-2)
    if method == "shampoo":
        return row, col
    if method == "vn-v1":
        assert L is not None and R is not None
        return row / _trace(R)[..., None], col / _trace(L)[..., None]
    return row / lam_R.sum(-1, keepdim=True), col / lam_L.sum(-1, keepdim=True)
