"""Hessian-covariance eigenspace alignment (the paper's section 4 and appendix C).

The covariance C = N^-1 sum_b g_b g_b^T of N mini-batch gradients is never formed: its
eigenvectors are the right singular vectors of the stacked gradients (N, d), and its
eigenvalues their squared singular values over N. Overlaps between index ranges of two
eigenbases (1-based, inclusive, as the paper writes them) are
    Overlap(lo..hi) = ( ||U_H[:, lo..hi]^T U_C[:, lo..hi]||_F^2 / (hi - lo + 1) )^(1/2),
so Overlap@5 is the range 1..5 and BandOverlap@180-200 the range 180..200.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def covariance_eigenbasis(grads: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending) and eigenvectors (d, r), r = min(N, d), of the second-moment
    matrix of the rows of ``grads`` (N, d), from the SVD of the stack."""
    if grads.ndim != 2 or grads.shape[0] < 1:
        raise ValueError(f"grads must be (N, d) with N >= 1, got shape {tuple(grads.shape)}")
    g = grads.to(torch.float64)
    _, sing, Vh = torch.linalg.svd(g, full_matrices=False)
    return sing**2 / g.shape[0], Vh.T


def band_overlap(U_a: Tensor, U_b: Tensor, lo: int, hi: int) -> float:
    """Overlap of the eigenvector ranges lo..hi (1-based, inclusive) of two bases (d, >= hi)."""
    if not 1 <= lo <= hi:
        raise ValueError(f"need 1 <= lo <= hi, got lo={lo}, hi={hi}")
    for name, U in (("U_a", U_a), ("U_b", U_b)):
        if U.ndim != 2 or U.shape[1] < hi:
            raise ValueError(f"{name} has {U.shape[-1]} vectors; the range {lo}..{hi} needs at least {hi}")
    if U_a.shape[0] != U_b.shape[0]:
        raise ValueError(f"bases live in different dimensions: {U_a.shape[0]} and {U_b.shape[0]}")
    A = U_a[:, lo - 1 : hi].to(torch.float64)
    B = U_b[:, lo - 1 : hi].to(torch.float64)
    return math.sqrt(float((A.T @ B).pow(2).sum()) / (hi - lo + 1))


def chance_overlap(dim: int, width: int) -> float:
    """The overlap two independent uniformly random ``width``-dimensional subspaces of R^dim
    have on average in the squared sense: sqrt(width / dim)."""
    return math.sqrt(width / dim)
