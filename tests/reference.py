"""Slow, obvious references written straight from the paper (section 5, appendix B.3).

Nothing here is clever: S is materialised, the top set comes from a stable descending sort,
the quantile from torch.quantile, inverse factors from their eigen-approximation as in the
KL-Shampoo code, and every diagonal from the explicit product U^T dL U.

Algorithm 2's selection is the paper's with its two continuity rules (see
``bregtop_dist.core.precondition``): entries tied with the K-th largest all take the top
scale, and entries within ``band`` (relative, on sqrt(S)) below it blend linearly from chi to
their own scale. ``band=0`` is the paper's hard cut (ties then in row-major order).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from bregtop_dist.core.bases import REFRESH_SHIFT
from bregtop_dist.core.precondition import SELECTION_BAND


def top_mask_ref(S: Tensor, rho: float) -> Tensor:
    """Indicator E of the K = ceil(rho m n) largest entries (ties: row-major order first)."""
    m, n = S.shape
    k = max(1, math.ceil(rho * m * n))
    order = torch.sort(S.flatten(), descending=True, stable=True).indices
    mask = torch.zeros(m * n, dtype=torch.bool)
    mask[order[:k]] = True
    return mask.view(m, n)


def chi_ref(S: Tensor, top: Tensor, q: float, c: float, eps: float = 0.0) -> Tensor:
    inv = S**-0.5 if eps == 0 else 1.0 / (S.sqrt() + eps)
    return c * torch.quantile(inv[~top], q, interpolation="linear")


def weights_ref(S: Tensor, rho: float, q: float, c: float, eps: float = 0.0, p: float = 0.5,
                band: float = SELECTION_BAND) -> Tensor:
    """W of Algorithm 2 (``p`` of S^-p: 1/2, or Shampoo's 1/4 with rho = 1): S^-p on the top
    set, chi on the bottom set; with ``band`` > 0 the continuity rules of the module docstring."""
    top = top_mask_ref(S, rho)
    inv = S**-p if eps == 0 else 1.0 / (S**p + eps)
    if bool(top.all()):
        return inv
    chi = chi_ref(S, top, q, c, eps)
    if band == 0.0:
        return torch.where(top, inv, chi)
    threshold = S[top].min()
    ramp = ((S / threshold).sqrt() - (1.0 - band)).div(band).clamp(0.0, 1.0)
    return torch.where(S >= threshold, inv, chi + ramp * (inv - chi))


def kron_precondition_ref(M, U_L, U_R, lam_L, lam_R, rho, q, c, eps=0.0, p=0.5, band=SELECTION_BAND) -> Tensor:
    """Algorithm 2, line by line."""
    Mt = U_L.T @ M @ U_R
    W = weights_ref(torch.outer(lam_L, lam_R), rho, q, c, eps, p, band)
    return U_L @ (Mt * W) @ U_R.T


def kron_stats_ref(method, G, U_L, U_R, lam_L, lam_R, L, R) -> tuple[Tensor, Tensor]:
    """Appendix B.3 (plus KL with the eigen-approximated inverse factors)."""
    m, n = G.shape
    if method == "shampoo":
        return G @ G.T, G.T @ G
    if method == "kl":
        R_inv = U_R @ torch.diag(1.0 / lam_R) @ U_R.T
        L_inv = U_L @ torch.diag(1.0 / lam_L) @ U_L.T
        return G @ R_inv @ G.T / n, G.T @ L_inv @ G / m
    if method == "vn-v1":
        return G @ G.T / torch.trace(R), G.T @ G / torch.trace(L)
    if method == "vn-v2":
        return G @ G.T / lam_R.sum(), G.T @ G / lam_L.sum()
    if method == "f-v1":
        return G @ R @ G.T / torch.trace(R @ R), G.T @ L @ G / torch.trace(L @ L)
    if method == "f-v2":
        R_tilde = U_R @ torch.diag(lam_R) @ U_R.T
        L_tilde = U_L @ torch.diag(lam_L) @ U_L.T
        return G @ R_tilde @ G.T / (lam_R**2).sum(), G.T @ L_tilde @ G / (lam_L**2).sum()
    raise ValueError(method)


def shifted_power_qr_ref(factor: Tensor, basis: Tensor, shift: float = REFRESH_SHIFT) -> Tensor:
    """Line 7, ``qr(L U)``, of the shifted factor ``L + delta I`` (the same eigenvectors),
    ``delta = shift * max|L|``; ``shift=0`` is the paper's."""
    delta = shift * factor.abs().max()
    return torch.linalg.qr((factor + delta * torch.eye(factor.shape[0], dtype=factor.dtype)) @ basis).Q


def algorithm1_ref(state: dict, G: Tensor, stats: str, beta1, beta2, refresh: bool, rho, q, c, eps):
    """One step of Algorithm 1 on one block; returns (new state, M_hat). float64 in, out."""
    s = {k: v.clone() for k, v in state.items()}
    s["M"] = (1 - beta1) * G + beta1 * s["M"]
    dL, dR = kron_stats_ref(stats, G, s["U_L"], s["U_R"], s["lam_L"], s["lam_R"], s["L"], s["R"])
    s["L"] = (1 - beta2) * dL + beta2 * s["L"]
    s["R"] = (1 - beta2) * dR + beta2 * s["R"]
    s["lam_L"] = (1 - beta2) * torch.diag(s["U_L"].T @ dL @ s["U_L"]) + beta2 * s["lam_L"]
    s["lam_R"] = (1 - beta2) * torch.diag(s["U_R"].T @ dR @ s["U_R"]) + beta2 * s["lam_R"]
    if refresh:
        s["U_L"] = shifted_power_qr_ref(s["L"], s["U_L"])
        s["U_R"] = shifted_power_qr_ref(s["R"], s["U_R"])
    M_hat = kron_precondition_ref(s["M"], s["U_L"], s["U_R"], s["lam_L"], s["lam_R"], rho, q, c, eps)
    return s, M_hat


def kl_methods_clamp_ref(lam: Tensor) -> Tensor:
    """KL-Shampoo's public code: lam^-1/2 clamped at max(10, min(d, 4000))."""
    bound = max(10, min(lam.numel(), 4000))
    return torch.clamp(lam, min=1.0 / bound**2)


def algorithm1_kl_methods_ref(state: dict, G: Tensor, stats: str, beta1, beta2, refresh: bool, rho, q, c, eps):
    """One step in the order of KL-Shampoo's public code: the momentum takes G, the update is
    preconditioned with the *previous* basis and estimates, then lines 2-5 and the refresh run
    and the estimates are clamped. Returns (new state, M_hat)."""
    M = (1 - beta1) * G + beta1 * state["M"]
    M_hat = kron_precondition_ref(M, state["U_L"], state["U_R"], state["lam_L"], state["lam_R"], rho, q, c, eps)
    s, _ = algorithm1_ref(state, G, stats, beta1, beta2, refresh, rho, q, c, eps)
    s["lam_L"], s["lam_R"] = kl_methods_clamp_ref(s["lam_L"]), kl_methods_clamp_ref(s["lam_R"])
    return s, M_hat


def boundary_gap(lam_L: Tensor, lam_R: Tensor, rho: float) -> float:
    """Relative gap between the K-th and (K+1)-th largest entries of S (inf if no bottom)."""
    S = torch.outer(lam_L, lam_R).flatten().sort(descending=True).values
    k = max(1, math.ceil(rho * S.numel()))
    if k >= S.numel():
        return math.inf
    return float((S[k - 1] - S[k]) / S[k - 1])
