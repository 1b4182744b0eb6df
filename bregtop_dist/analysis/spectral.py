"""Where on C's spectrum each divergence's Kronecker projection puts its error: the paper's
Table 2 (Frobenius fits the top best, LogDet spreads its error most evenly) made measurable.

For C = sum_i lambda_i u_i u_i^T (descending) and a projection S = L (x) R, the Rayleigh
ratio r_i = u_i^T S u_i / lambda_i is 1 where S reproduces C's curvature along u_i. The
error along u_i is |log r_i| (symmetric in over- and under-estimation, and what a relative
divergence like LogDet weighs). Errors are averaged over bands of the spectrum given as
fractions of its length, top first.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from bregtop_dist.analysis.divergence import KINDS, check_kind, spd_eigh
from bregtop_dist.analysis.kronecker import KroneckerProjection, kronecker_projection

DEFAULT_BANDS = (0.0, 0.05, 0.2, 0.5, 0.8, 1.0)


def band_label(lo: float, hi: float) -> str:
    return f"{100 * lo:g}-{100 * hi:g}%"


def check_bands(bands: tuple[float, ...]) -> None:
    ok = len(bands) >= 2 and bands[0] == 0.0 and bands[-1] == 1.0
    if not ok or any(hi <= lo for lo, hi in zip(bands[:-1], bands[1:], strict=True)):
        raise ValueError(f"bands must rise strictly from 0.0 to 1.0, got {bands}")


def rayleigh_ratios(evals: Tensor, evecs: Tensor, L: Tensor, R: Tensor) -> Tensor:
    """u_i^T (L (x) R) u_i / lambda_i for each eigenpair, using vec(u_i) row-major as m x n."""
    m, n = L.shape[0], R.shape[0]
    Ui = evecs.T.reshape(-1, m, n)
    quad = torch.einsum("dij,ik,dkl,jl->d", Ui, L, Ui, R)
    return quad / evals


@dataclass(frozen=True)
class SpectralErrors:
    """One divergence's projection of C and its band errors (mean |log r_i| per band)."""

    kind: str
    projection: KroneckerProjection
    band_errors: tuple[float, ...]
    log_ratios: Tensor  # log r_i, eigenvalues descending

    @property
    def spread(self) -> float:
        """max - min band error: 0 when the error is spread evenly over the spectrum."""
        return max(self.band_errors) - min(self.band_errors)


@dataclass(frozen=True)
class SpectralReport:
    bands: tuple[float, ...]
    evals: Tensor  # C's eigenvalues, descending
    errors: dict[str, SpectralErrors]

    @property
    def labels(self) -> list[str]:
        return [band_label(lo, hi) for lo, hi in zip(self.bands[:-1], self.bands[1:], strict=True)]

    def best_on_top(self) -> str:
        """The divergence with the smallest error in the top band."""
        return min(self.errors.values(), key=lambda e: e.band_errors[0]).kind

    def most_even(self) -> str:
        """The divergence with the smallest spread of band errors."""
        return min(self.errors.values(), key=lambda e: e.spread).kind


def spectral_error_report(
    C: Tensor,
    m: int,
    n: int,
    kinds: tuple[str, ...] = KINDS,
    bands: tuple[float, ...] = DEFAULT_BANDS,
    tol: float = 1e-10,
    max_iter: int = 5000,
) -> SpectralReport:
    """Project C with each divergence in ``kinds`` and measure its error per spectral band."""
    for kind in kinds:
        check_kind(kind)
    check_bands(bands)
    evals, evecs = spd_eigh(C, "C")
    evals, evecs = evals.flip(0), evecs.flip(1)
    d = evals.numel()
    edges = [round(b * d) for b in bands]
    if any(hi <= lo for lo, hi in zip(edges[:-1], edges[1:], strict=True)):
        raise ValueError(f"bands {bands} leave an empty band for a spectrum of {d} eigenvalues")
    errors = {}
    for kind in kinds:
        proj = kronecker_projection(kind, C, m, n, tol=tol, max_iter=max_iter)
        logr = torch.log(rayleigh_ratios(evals, evecs, proj.L, proj.R))
        band_errors = tuple(float(logr[lo:hi].abs().mean()) for lo, hi in zip(edges[:-1], edges[1:], strict=True))
        errors[kind] = SpectralErrors(kind, proj, band_errors, logr)
    return SpectralReport(tuple(bands), evals, errors)
