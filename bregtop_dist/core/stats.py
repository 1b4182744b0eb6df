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

from bregtop_dist.core.validate import ArgumentTypeError, check_floating_tensor

STATS_METHODS = ("shampoo", "kl", "vn-v1", "vn-v2", "f-v1", "f-v2")
EIGEN_WEIGHTED = ("kl", "f-v2")
"""Methods whose weight is diagonal in the other factor's eigenbasis: X_L = G U_R, X_R = U_L^T G."""
_NEEDS_FACTORS = ("vn-v1", "f-v1")


def _mm(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b``; for two equal stacks of matrices ``torch.bmm``, which is what matmul computes
    then, as one op instead of matmul's expand/view/bmm/view (launches count on accelerators)."""
    if a.ndim == 3 and b.ndim == 3 and a.shape[0] == b.shape[0]:
        return torch.bmm(a, b)
    return a @ b


def _trace(x: Tensor) -> Tensor:
    return torch.diagonal(x, dim1=-2, dim2=-1).sum(-1)


def _weighted_gram(x: Tensor, weight: Tensor) -> Tensor:
    """``x diag(weight) x^T`` for x (..., d, k), weight (..., k) or (..., 1)."""
    return _mm(x * weight[..., None, :], x.mT)


def _fv1_weight(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(x / a, a Tr((x / a)^2))`` with a = max|x|, whose ratio is f-v1's weight ``x / Tr(x^2)``
    for a symmetric factor x (..., d, d). Formed so because ``Tr(x^2)`` leaves float32 for
    factors beyond ~1e19, and ``G x G^T`` for gradients ~1e10 above the factor (the step after
    a spike), where ``G x G^T / Tr(x^2)`` itself does not."""
    a = x.abs().amax((-2, -1), keepdim=True)
    xn = x / a
    return xn, a * (xn * xn).sum((-2, -1), keepdim=True)


def _check(method: str, L: Tensor | None, R: Tensor | None) -> None:
    if method not in STATS_METHODS:
        raise ValueError(f"method={method!r} is unknown; allowed: {', '.join(STATS_METHODS)}")
    if method in _NEEDS_FACTORS and (L is None or R is None):
        raise ValueError(f"method={method!r} needs the current factors L and R; got L or R = None")


def factor_weights(
    method: str, lam_L: Tensor, lam_R: Tensor, L: Tensor | None = None, R: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """(w_L, w_R) with ``dL = X_L diag(w_L) X_L^T`` and ``dR = X_R^T diag(w_R) X_R``.

    ``X_L = X_R = G`` and the weights are per-block scalars (..., 1) for shampoo and vn-*;
    ``X_L = G U_R``, ``X_R = U_L^T G`` and the weights are vectors (..., n), (..., m) for kl
    and f-v2. f-v1 has no such form (its weight R is not diagonal in the eigenbasis).
    """
    _check(method, L, R)
    m, n = lam_L.shape[-1], lam_R.shape[-1]
    if method == "shampoo":
        one = torch.ones_like(lam_L[..., :1])
        return one, one
    if method == "vn-v1":
        assert L is not None and R is not None
        return 1.0 / _trace(R)[..., None], 1.0 / _trace(L)[..., None]
    if method == "vn-v2":
        return 1.0 / lam_R.sum(-1, keepdim=True), 1.0 / lam_L.sum(-1, keepdim=True)
    if method == "kl":
        return 1.0 / (n * lam_R), 1.0 / (m * lam_L)
    if method == "f-v2":
        return lam_R / (lam_R**2).sum(-1, keepdim=True), lam_L / (lam_L**2).sum(-1, keepdim=True)
    raise ValueError(f"method={method!r} has no diagonal factor weights")


def _fv1_diagonals(
    G: Tensor | None, U_L: Tensor | None, U_R: Tensor | None, L: Tensor, R: Tensor, dL: Tensor, dR: Tensor
) -> tuple[Tensor, Tensor]:
    """f-v1's ``diag(U^T dL U)``, ``diag(U^T dR U)``, each side by its cheaper product.

    ``U_L^T dL U_L`` costs m^3; with ``Y = U_L^T G`` the same diagonal is
    ``rowsum((Y R) * Y) / Tr(R^2)`` for m^2 n + m n^2, cheaper when n (m + n) < m^2 (the long
    side of a rectangular block). Likewise ``colsum(Z * (L Z)) / Tr(L^2)`` with ``Z = G U_R``.
    """
    m, n = dL.shape[-1], dR.shape[-1]
    if U_L is None:
        diag_l = torch.diagonal(dL, dim1=-2, dim2=-1)
    elif G is not None and n * (m + n) < m * m:
        y = _mm(U_L.mT, G)
        rn, r2 = _fv1_weight(R)
        diag_l = (_mm(y, rn) * y).sum(-1) / r2[..., 0]
    else:
        diag_l = (U_L * _mm(dL, U_L)).sum(-2)
    if U_R is None:
        diag_r = torch.diagonal(dR, dim1=-2, dim2=-1)
    elif G is not None and m * (m + n) < n * n:
        z = _mm(G, U_R)
        ln, l2 = _fv1_weight(L)
        diag_r = (z * _mm(ln, z)).sum(-2) / l2[..., 0]
    else:
        diag_r = (U_R * _mm(dR, U_R)).sum(-2)
    return diag_l, diag_r


def _check_stats_inputs(
    G: Tensor,
    U_L: Tensor | None,
    U_R: Tensor | None,
    lam_L: Tensor,
    lam_R: Tensor,
    L: Tensor | None,
    R: Tensor | None,
) -> torch.Size:
    """The batch shape of :func:`kron_stats`' tensors, after refusing the first that is not a
    floating tensor of G's dtype (ArgumentTypeError) or has the wrong shape (ValueError)."""
    check_floating_tensor("G", G)
    if G.ndim < 2:
        raise ValueError(f"G has shape {tuple(G.shape)}; it must be (..., m, n), at least 2-D")
    m, n = G.shape[-2:]
    batches = {"G": G.shape[:-2]}
    for name, t, dims, symbols in (
        ("U_L", U_L, (m, m), "m, m"), ("U_R", U_R, (n, n), "n, n"), ("lam_L", lam_L, (m,), "m"),
        ("lam_R", lam_R, (n,), "n"), ("L", L, (m, m), "m, m"), ("R", R, (n, n), "n, n"),
    ):
        optional = name not in ("lam_L", "lam_R")
        if t is None and optional:
            continue
        t = check_floating_tensor(name, t)  # lam_L/lam_R = None are refused here
        if t.dtype != G.dtype:
            raise ArgumentTypeError(
                f"{name} has dtype {t.dtype} and G has {G.dtype}; kron_stats takes tensors of one floating dtype"
            )
        if t.ndim < len(dims) or tuple(t.shape[t.ndim - len(dims):]) != dims:
            allowed = f"(..., {symbols}) = (..., {', '.join(map(str, dims))})"
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}; it must be {allowed} for G of shape "
                f"{tuple(G.shape)}{', or None' if optional else ''}"
            )
        batches[name] = t.shape[: t.ndim - len(dims)]
    try:
        return torch.broadcast_shapes(*batches.values())
    except RuntimeError:
        raise ValueError(
            "the leading (batch) dimensions of kron_stats' tensors must broadcast together; got "
            + ", ".join(f"{k} {tuple(b)}" for k, b in batches.items())
        ) from None


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
    by vn-v1 and f-v1. Every tensor is floating point, of G's dtype; when m or n is 0 the
    increments are empty.
    """
    _check(method, L, R)
    batch = _check_stats_inputs(G, U_L, U_R, lam_L, lam_R, L, R)
    m, n = G.shape[-2:]
    if m == 0 or n == 0:  # (f-v1 would divide 0 by Tr(L^2) = 0)
        return G.new_zeros((*batch, m, m)), G.new_zeros((*batch, n, n))
    return stats_increments(method, G, U_L, U_R, lam_L, lam_R, L, R)


def stats_increments(
    method: str,
    G: Tensor,
    U_L: Tensor | None,
    U_R: Tensor | None,
    lam_L: Tensor,
    lam_R: Tensor,
    L: Tensor | None = None,
    R: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`kron_stats` without its input checks, for the optimizer's step, whose inputs
    are its own state (non-empty float32 stacks of matching shapes)."""
    if method == "f-v1":
        assert L is not None and R is not None
        (rn, r2), (ln, l2) = _fv1_weight(R), _fv1_weight(L)
        return _mm(_mm(G, rn), G.mT) / r2, _mm(_mm(G.mT, ln), G) / l2
    w_l, w_r = factor_weights(method, lam_L, lam_R, L, R)
    x_l, x_r = G, G
    if method in EIGEN_WEIGHTED:
        x_l = G if U_R is None else _mm(G, U_R)
        x_r = G if U_L is None else _mm(U_L.mT, G)
    return _weighted_gram(x_l, w_l), _weighted_gram(x_r.mT, w_r)


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
    G: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``(diag(U_L^T dL U_L), diag(U_R^T dR U_R))`` from ``Gt = U_L^T G U_R`` (..., m, n).

    With the weights of :func:`factor_weights` these are ``rowsum(Gt^2 w_L)`` and
    ``colsum(Gt^2 w_R)``. f-v1, whose weight is not diagonal in the eigenbasis, reads
    ``dL``, ``dR`` and the bases instead, and on the longer side of a rectangular block the
    gradient ``G`` (see :func:`_fv1_diagonals`).
    """
    _check(method, L, R)
    if method == "f-v1":
        if dL is None or dR is None:
            raise ValueError("method='f-v1' needs dL and dR to form the rotated diagonals")
        assert L is not None and R is not None
        return _fv1_diagonals(G, U_L, U_R, L, R, dL, dR)
    w_l, w_r = factor_weights(method, lam_L, lam_R, L, R)
    return weighted_square_sums(Gt, w_l, w_r)


def weighted_square_sums(Gt: Tensor, w_l: Tensor, w_r: Tensor) -> tuple[Tensor, Tensor]:
    """``rowsum(Gt^2 w_L)`` and ``colsum(Gt^2 w_R)``, each formed as a square of
    ``Gt sqrt(w)``: where Gt is large and w small (as they are when the statistics have the
    gradient's scale), ``Gt^2`` alone would overflow float32 although the sums do not."""
    rows = Gt * w_l.sqrt()[..., None, :]
    cols = Gt * w_r.sqrt()[..., :, None]
    return (rows * rows).sum(-1), (cols * cols).sum(-2)
