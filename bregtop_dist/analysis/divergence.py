"""Bregman matrix divergences of the paper's three spectral generators (section 2.3, Table 1,
appendix B.2), their spectral decomposition, and the Hessian of the generator.

Each divergence comes from F(M) = Tr f(M) with
    frobenius    f(x) = x^2 / 2          f'(x) = x        B = ||A - B||_F^2 / 2
    von_neumann  f(x) = x log x - x      f'(x) = log x    B = Tr(A log A - A log B - A + B)
    logdet       f(x) = -log x           f'(x) = -1/x     B = Tr(A B^-1) - log det(A B^-1) - d
(LogDet is taken with F = -log det, as in the paper's footnote to appendix B.2; Table 1's
KL-Shampoo uses -1/2 log det, which only halves the divergence.)

Everything is computed in float64 unless asked otherwise, from eigen-decompositions, so the
same code serves as the reference the tests hold the closed forms to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

KINDS = ("frobenius", "von_neumann", "logdet")


def check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"divergence kind {kind!r} is not one of {', '.join(KINDS)}")


def _f(kind: str, x: Tensor) -> Tensor:
    if kind == "frobenius":
        return x * x / 2
    if kind == "von_neumann":
        return x * torch.log(x) - x
    return -torch.log(x)


def _df(kind: str, x: Tensor) -> Tensor:
    """f', the eigenvalue function of grad F."""
    if kind == "frobenius":
        return x
    if kind == "von_neumann":
        return torch.log(x)
    return -1.0 / x


def _d2f(kind: str, x: Tensor) -> Tensor:
    if kind == "frobenius":
        return torch.ones_like(x)
    if kind == "von_neumann":
        return 1.0 / x
    return x**-2


def spd_eigh(A: Tensor, name: str = "matrix", dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Eigenvalues (ascending) and eigenvectors of a symmetric positive-definite matrix,
    after checking that it is one; the error names the matrix and what is wrong."""
    if A.ndim != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"{name} must be a square matrix, got shape {tuple(A.shape)}")
    A = A.to(dtype)
    if not bool(torch.isfinite(A).all()):
        raise ValueError(f"{name} has non-finite entries")
    scale = A.abs().max().clamp_min(torch.finfo(dtype).tiny)
    asym = float((A - A.T).abs().max() / scale)
    if asym > 1e-8:
        raise ValueError(f"{name} must be symmetric; max |A - A^T| / max |A| = {asym:.2e} (allowed 1e-8)")
    evals, evecs = torch.linalg.eigh((A + A.T) / 2)
    if float(evals[0]) <= 0:
        raise ValueError(
            f"{name} must be positive definite; its smallest eigenvalue is {float(evals[0]):.3e} "
            "(damp it, e.g. A + kappa I)"
        )
    return evals, evecs


def matrix_function(evals: Tensor, evecs: Tensor, values: Tensor) -> Tensor:
    """V diag(values) V^T."""
    return (evecs * values) @ evecs.T


def bregman_divergence(kind: str, A: Tensor, B: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """B_F(A, B) = F(A) - F(B) - Tr(grad F(B) (A - B)) for SPD A, B (a 0-d tensor)."""
    check_kind(kind)
    _check_same_shape(A, B)
    lam, _ = spd_eigh(A, "A", dtype)
    omega, V = spd_eigh(B, "B", dtype)
    A = A.to(dtype)
    grad_B = matrix_function(omega, V, _df(kind, omega))
    return _f(kind, lam).sum() - _f(kind, omega).sum() - torch.sum(grad_B * (A - B.to(dtype)))


@dataclass(frozen=True)
class SpectralDecomposition:
    """B_F(A, B) = psi + phi + coupling.sum() (section 3.2): ``psi`` depends on A's spectrum
    only, ``phi`` on B's only, and ``coupling[i, j] = g_F(lambda_i, omega_j) P_ij`` carries
    the cross-spectral mismatch, with P_ij = <u_i, v_j>^2 the eigenspace alignment."""

    lam: Tensor  # eigenvalues of A, descending
    omega: Tensor  # eigenvalues of B, descending
    alignment: Tensor  # P, (d, d), rows index A's eigenvectors, columns B's
    psi: Tensor
    phi: Tensor
    coupling: Tensor

    @property
    def total(self) -> Tensor:
        return self.psi + self.phi + self.coupling.sum()


def coupling_term(kind: str, lam: Tensor, omega: Tensor) -> Tensor:
    """g_F(lambda_i, omega_j) = -lambda_i f'(omega_j): -lambda omega (frobenius),
    -lambda log omega (von_neumann), lambda / omega (logdet)."""
    check_kind(kind)
    return -lam[:, None] * _df(kind, omega)[None, :]


def spectral_decomposition(
    kind: str, A: Tensor, B: Tensor, dtype: torch.dtype = torch.float64
) -> SpectralDecomposition:
    """The three-part form of B_F(A, B) from appendix B.2, eigenvalues sorted descending."""
    check_kind(kind)
    _check_same_shape(A, B)
    lam, U = spd_eigh(A, "A", dtype)
    omega, V = spd_eigh(B, "B", dtype)
    lam, U, omega, V = lam.flip(0), U.flip(1), omega.flip(0), V.flip(1)
    P = (U.T @ V) ** 2
    psi = _f(kind, lam).sum()
    phi = (_df(kind, omega) * omega - _f(kind, omega)).sum()
    return SpectralDecomposition(lam, omega, P, psi, phi, coupling_term(kind, lam, omega) * P)


def generator_hessian(kind: str, S: Tensor, H: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """grad^2 F(S)[H], the Frechet derivative of grad F = f'(.) at SPD S along symmetric H
    (Daleckii-Krein: in S's eigenbasis, H's entries times the divided differences of f')."""
    check_kind(kind)
    _check_same_shape(S, H)
    s, V = spd_eigh(S, "S", dtype)
    Ht = V.T @ H.to(dtype) @ V
    ds = s[:, None] - s[None, :]
    dfs = _df(kind, s)
    close = ds.abs() <= 1e-12 * s.abs().max()
    safe = torch.where(close, torch.ones_like(ds), ds)
    gamma = torch.where(close, _d2f(kind, (s[:, None] + s[None, :]) / 2), (dfs[:, None] - dfs[None, :]) / safe)
    return V @ (gamma * Ht) @ V.T


def _check_same_shape(A: Tensor, B: Tensor) -> None:
    if A.shape != B.shape:
        raise ValueError(f"the two matrices must have the same shape, got {tuple(A.shape)} and {tuple(B.shape)}")
