"""Bregman Kronecker projections: the (L, R) minimising B_F(C, L (x) R) for a dense SPD C,
found by iterating the stationary conditions of the paper's Table 1.

Conventions: g = vec(G) is row-major (``G.reshape(-1)``), so index (i, j) of an m x n
matrix is i * n + j and (L (x) R) g = vec(L G R^T), matching ``torch.kron(L, R)``. Reading C
as the 4-tensor C[i, j, k, l] = E[G_ij G_kl], the moments Table 1 needs are
    E[G A G^T] = sum_jl C[i, j, k, l] A_jl      (m x m)
    E[G^T B G] = sum_ik C[i, j, k, l] B_ik      (n x n)
and the fixed points are
    logdet       L = E[G R^-1 G^T] / n            R = E[G^T L^-1 G] / m
    von_neumann  L = E[G G^T] / Tr R              R = E[G^T G] / Tr L
    frobenius    L = E[G R G^T] / Tr R^2          R = E[G^T L G] / Tr L^2
Only the product L (x) R is determined; the returned L is scaled to Tr L = m.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bregtop_dist.analysis.divergence import bregman_divergence, check_kind, generator_hessian, spd_eigh


class ProjectionNotConverged(RuntimeError):
    """The fixed-point iteration stopped at ``max_iter`` with its residual above ``tol``."""

    def __init__(self, kind: str, iterations: int, residual: float, tol: float) -> None:
        super().__init__(
            f"{kind} Kronecker projection did not converge: stationarity residual {residual:.3e} > tol "
            f"{tol:.1e} after {iterations} iterations; raise max_iter or tol"
        )
        self.kind, self.iterations, self.residual, self.tol = kind, iterations, residual, tol


@dataclass(frozen=True)
class KroneckerProjection:
    """The projection's factors and how it was reached. ``residual`` is the relative
    violation of the stationary conditions, max(||L - T_L(R)||, ||R - T_R(L)||) over the
    factors' norms, where T_L, T_R are the right-hand sides of Table 1."""

    kind: str
    L: Tensor
    R: Tensor
    iterations: int
    residual: float
    divergence: float

    @property
    def S(self) -> Tensor:
        return torch.kron(self.L, self.R)


def left_moment(C4: Tensor, A: Tensor) -> Tensor:
    """E[G A G^T] from C read as (m, n, m, n)."""
    return torch.einsum("ijkl,jl->ik", C4, A)


def right_moment(C4: Tensor, B: Tensor) -> Tensor:
    """E[G^T B G] from C read as (m, n, m, n)."""
    return torch.einsum("ijkl,ik->jl", C4, B)


def _sym(A: Tensor) -> Tensor:
    return (A + A.T) / 2


def _inv(A: Tensor) -> Tensor:
    return _sym(torch.linalg.inv(A))


def left_update(kind: str, C4: Tensor, R: Tensor) -> Tensor:
    """T_L(R): Table 1's right-hand side for L."""
    n = C4.shape[1]
    if kind == "logdet":
        return _sym(left_moment(C4, _inv(R))) / n
    if kind == "von_neumann":
        return _sym(left_moment(C4, torch.eye(n, dtype=C4.dtype))) / torch.trace(R)
    return _sym(left_moment(C4, R)) / torch.sum(R * R)


def right_update(kind: str, C4: Tensor, L: Tensor) -> Tensor:
    """T_R(L): Table 1's right-hand side for R."""
    m = C4.shape[0]
    if kind == "logdet":
        return _sym(right_moment(C4, _inv(L))) / m
    if kind == "von_neumann":
        return _sym(right_moment(C4, torch.eye(m, dtype=C4.dtype))) / torch.trace(L)
    return _sym(right_moment(C4, L)) / torch.sum(L * L)


def stationarity_residual(kind: str, C4: Tensor, L: Tensor, R: Tensor) -> float:
    TL, TR = left_update(kind, C4, R), right_update(kind, C4, L)
    return max(float(torch.linalg.norm(L - TL) / torch.linalg.norm(L)),
               float(torch.linalg.norm(R - TR) / torch.linalg.norm(R)))


def kronecker_projection(
    kind: str,
    C: Tensor,
    m: int,
    n: int,
    tol: float = 1e-10,
    max_iter: int = 1000,
    dtype: torch.dtype = torch.float64,
) -> KroneckerProjection:
    """argmin over SPD (L, R) of B_F(C, L (x) R), by alternating the Table 1 updates
    (L from R, then R from the new L) from L = I, R = I until the stationarity residual is
    at most ``tol``. Raises ProjectionNotConverged otherwise."""
    check_kind(kind)
    if m < 1 or n < 1:
        raise ValueError(f"m and n must be positive, got m={m}, n={n}")
    if C.shape != (m * n, m * n):
        raise ValueError(f"C must be (m*n, m*n) = ({m * n}, {m * n}) for m={m}, n={n}; got {tuple(C.shape)}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a positive number, got {tol}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    spd_eigh(C, "C", dtype)
    C = C.to(dtype)
    C4 = C.reshape(m, n, m, n)
    L = torch.eye(m, dtype=dtype)
    R = torch.eye(n, dtype=dtype)
    residual = math.inf
    for it in range(1, max_iter + 1):
        L = left_update(kind, C4, R)
        R = right_update(kind, C4, L)
        scale = m / torch.trace(L)
        L, R = L * scale, R / scale
        residual = stationarity_residual(kind, C4, L, R)
        if residual <= tol:
            divergence = float(bregman_divergence(kind, C, torch.kron(L, R), dtype))
            return KroneckerProjection(kind, L, R, it, residual, divergence)
    raise ProjectionNotConverged(kind, max_iter, residual, tol)


def weighted_residual(kind: str, C: Tensor, L: Tensor, R: Tensor) -> Tensor:
    """grad^2 F(S)[S - C] at S = L (x) R: the divergence-weighted residual of Theorem 2."""
    S = torch.kron(L, R)
    return generator_hessian(kind, S, S - C.to(S.dtype), S.dtype)


def tangent_components(W: Tensor, L: Tensor, R: Tensor) -> tuple[Tensor, Tensor]:
    """The pairing of W with the tangent space of the Kronecker manifold at L (x) R:
    <W, dL (x) R> = <A, dL> and <W, L (x) dR> = <B, dR> for all dL, dR, so W is orthogonal
    to the tangent space exactly when both returned matrices (A, B) vanish."""
    m, n = L.shape[0], R.shape[0]
    W4 = W.reshape(m, n, m, n)
    return left_moment(W4, R), right_moment(W4, L)
