"""Analysis tools for the paper's sections 3-4: Bregman divergences and their spectral
decomposition, Bregman Kronecker projections, where their error falls on the spectrum, and
Hessian-covariance eigenspace alignment. Pure torch, float64 by default, no distribution."""

from bregtop_dist.analysis.alignment import band_overlap, chance_overlap, covariance_eigenbasis
from bregtop_dist.analysis.divergence import (
    KINDS,
    SpectralDecomposition,
    bregman_divergence,
    coupling_term,
    generator_hessian,
    spectral_decomposition,
)
from bregtop_dist.analysis.hessian import Eigenpairs, block_hessian, hvp_operator, lanczos, top_eigenpairs
from bregtop_dist.analysis.kronecker import (
    KroneckerProjection,
    ProjectionNotConverged,
    kronecker_projection,
    tangent_components,
    weighted_residual,
)
from bregtop_dist.analysis.spectral import SpectralReport, rayleigh_ratios, spectral_error_report

__all__ = [
    "KINDS",
    "Eigenpairs",
    "KroneckerProjection",
    "ProjectionNotConverged",
    "SpectralDecomposition",
    "SpectralReport",
    "band_overlap",
    "block_hessian",
    "bregman_divergence",
    "chance_overlap",
    "coupling_term",
    "covariance_eigenbasis",
    "generator_hessian",
    "hvp_operator",
    "kronecker_projection",
    "lanczos",
    "rayleigh_ratios",
    "spectral_decomposition",
    "spectral_error_report",
    "tangent_components",
    "top_eigenpairs",
    "weighted_residual",
]
