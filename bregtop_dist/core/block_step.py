"""Algorithm 1 of the paper on a stack of same-shape Kronecker blocks.

State is float32 whatever the parameter dtype. The first gradient a block sees sets up its
state (:func:`init_block_state`), then every step runs Algorithm 1 (:func:`kron_block_step`):

1. ``M <- (1-b1) G + b1 M``, kept in the eigenbasis: ``Mt = U_L^T M U_R`` (see below)
2. ``(dL, dR) <- STATS(G, U_L, U_R, lam_L, lam_R)``
3. ``L <- (1-b2) dL + b2 L``, ``R`` likewise
4. ``lam <- (1-b2) diag(U^T dL U) + b2 lam``, from the rotated gradient (see ``stats``)
5. on refresh steps ``U <- qr(L U)`` (one warm-started power iteration)
6. ``update = KRONPRECOND(U_L, U_R, lam_L, lam_R, M, rho, q, c)``

The momentum is stored rotated, ``Mt = U_L^T M U_R``: the rotated gradient is needed for the
eigenvalue statistics anyway, so ``Mt <- (1-b1) Gt + b1 Mt`` saves the two products that
rotate M every step; on a refresh ``Mt`` is carried into the new basis. This is Algorithm 1
exactly (the bases are orthogonal), up to rounding.

First basis and eigenvalues: the factors start from one application of STATS to the first
gradient, taken from the identity state (U = I, lam = 1, L = I, R = I); the bases are the
exact eigenvectors of those factors (``eigh``, eigenvalues descending) and the eigenvalue
estimates are their eigenvalues raised to at least ``FIRST_EIG_FLOOR`` times their mean (and to
``TINY``). One gradient gives rank-deficient factors: their near-zero eigenvalues would make
``S^-1/2`` explode on the first steps (two of them multiply in S). The floor is a uniform,
scale-matched start in the spirit of KL-Shampoo's constant ``init_factor``; the eigenvalue
EMA replaces it with the data's own spectrum over about 1/(1-beta2) steps.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor

from bregtop_dist.core.bases import eigh_descending, power_qr
from bregtop_dist.core.dispatch import resolve_backend
from bregtop_dist.core.precondition import precondition_rotated
from bregtop_dist.core.stats import EIGEN_WEIGHTED, factor_weights, kron_stats, rotated_diagonals

FIRST_EIG_FLOOR = 1.0
"""First eigenvalue estimates are at least this multiple of their mean."""
TINY = 1e-30
"""Absolute floor of the first eigenvalue estimates (a zero first gradient)."""


@dataclass
class KronBlockState:
    """Optimizer state of B same-shape blocks, each field stacked on dim 0 (float32)."""

    momentum: Tensor  # (B, m, n), in the eigenbasis: U_L^T M U_R
    L: Tensor  # (B, m, m)
    R: Tensor  # (B, n, n)
    U_L: Tensor  # (B, m, m), columns are eigenvector estimates
    U_R: Tensor  # (B, n, n)
    lam_L: Tensor  # (B, m), eigenvalue estimates in U_L's column order
    lam_R: Tensor  # (B, n)
    step: Tensor  # (B,) int64 steps taken, on the CPU whatever the device: the host schedules
    # refreshes from it without waiting for the device

    def tensors(self) -> dict[str, Tensor]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def select(self, idx: Tensor) -> KronBlockState:
        """A copy holding the blocks ``idx``."""
        return KronBlockState(**{k: v.index_select(0, idx.to(v.device)) for k, v in self.tensors().items()})

    def assign(self, idx: Tensor, part: KronBlockState) -> None:
        """Write ``part`` (from :meth:`select`) back into the blocks ``idx``."""
        for k, v in self.tensors().items():
            v.index_copy_(0, idx.to(v.device), getattr(part, k))


@dataclass(frozen=True)
class BlockHyper:
    """The hyperparameters Algorithm 1 reads, resolved from a param group."""

    stats: str
    rho: float
    q: float
    c: float
    beta1: float
    beta2: float
    eps: float
    frequency: int
    backend: str = "auto"
    eig_floor: float = 0.0  # eigenvalues used in S are at least eig_floor x the factor's largest


def init_block_state(stats: str, grad: Tensor) -> tuple[KronBlockState, Tensor]:
    """State of a stack from its first gradient (B, m, n) float32; also (B,) eigh failures."""
    bsz, m, n = grad.shape
    eye_l = torch.eye(m, dtype=grad.dtype, device=grad.device).expand(bsz, m, m)
    eye_r = torch.eye(n, dtype=grad.dtype, device=grad.device).expand(bsz, n, n)
    ones_l = grad.new_ones(bsz, m)
    ones_r = grad.new_ones(bsz, n)
    d_l, d_r = kron_stats(stats, grad, None, None, ones_l, ones_r, eye_l, eye_r)
    lam_l, u_l, failed_l = eigh_descending(d_l)
    lam_r, u_r, failed_r = eigh_descending(d_r)
    state = KronBlockState(
        momentum=torch.zeros_like(grad),
        L=d_l.contiguous(),
        R=d_r.contiguous(),
        U_L=u_l.contiguous(),
        U_R=u_r.contiguous(),
        lam_L=_floor(lam_l),
        lam_R=_floor(lam_r),
        step=torch.zeros(bsz, dtype=torch.int64),
    )
    return state, failed_l | failed_r


def _floor(lam: Tensor) -> Tensor:
    floor = (FIRST_EIG_FLOOR * lam.clamp_min(0).mean(-1, keepdim=True)).clamp_min(TINY)
    return torch.maximum(lam, floor)


def refresh_due(step: Tensor, offset: Tensor, frequency: int) -> Tensor:
    """Which blocks refresh their bases at ``step`` (taken steps, after this one)."""
    return torch.remainder(step - offset, frequency) == 0


def _accumulate(s: KronBlockState, grad: Tensor, hyper: BlockHyper) -> None:
    """Lines 1-5 of Algorithm 1 but the refresh: momentum, factor and eigenvalue EMAs."""
    b1, b2 = hyper.beta1, hyper.beta2
    if hyper.stats == "f-v1":
        gt = s.U_L.mT @ grad @ s.U_R  # (B, m, n), the gradient in the current eigenbasis
        d_l, d_r = kron_stats("f-v1", grad, s.U_L, s.U_R, s.lam_L, s.lam_R, s.L, s.R)
        diag_l, diag_r = rotated_diagonals(
            "f-v1", gt, s.lam_L, s.lam_R, s.L, s.R, d_l, d_r, s.U_L, s.U_R, G=grad
        )
        s.L.lerp_(d_l, 1.0 - b2)
        s.R.lerp_(d_r, 1.0 - b2)
        s.momentum.lerp_(gt, 1.0 - b1)
    else:
        # dL = X_L diag(w_L) X_L^T: the factor EMA is one fused product of pre-scaled X.
        w_l, w_r = factor_weights(hyper.stats, s.lam_L, s.lam_R, s.L, s.R)
        if hyper.stats in EIGEN_WEIGHTED:
            x_r = s.U_L.mT @ grad  # (B, m, n)
            x_l = grad @ s.U_R
            gt = x_r @ s.U_R
        else:
            x_l = x_r = grad
            gt = s.U_L.mT @ grad @ s.U_R
        scaled_l = x_l * w_l.sqrt()[:, None, :]
        scaled_r = x_r * w_r.sqrt()[:, :, None]
        s.L.baddbmm_(scaled_l, scaled_l.mT, beta=b2, alpha=1.0 - b2)
        s.R.baddbmm_(scaled_r.mT, scaled_r, beta=b2, alpha=1.0 - b2)
        diag_l, diag_r = _weighted_sums_and_momentum(s, gt, w_l, w_r, b1, hyper.backend)
    s.lam_L.lerp_(diag_l, 1.0 - b2)
    s.lam_R.lerp_(diag_r, 1.0 - b2)
    s.step += 1


def _weighted_sums_and_momentum(
    s: KronBlockState, gt: Tensor, w_l: Tensor, w_r: Tensor, b1: float, backend: str
) -> tuple[Tensor, Tensor]:
    """``rowsum(Gt^2 w_L)``, ``colsum(Gt^2 w_R)`` and ``Mt <- lerp(Mt, Gt, 1 - b1)``: one fused
    pass of the Triton kernel where the backend allows it, torch otherwise."""
    if b1 > 0.5 and resolve_backend(backend, gt.device, torch.float32) == "triton":
        from triton_kernels.rotated_stats import rotated_stats

        return rotated_stats(gt.contiguous(), w_l, w_r, s.momentum, b1)
    sq = gt * gt
    s.momentum.lerp_(gt, 1.0 - b1)
    return (sq * w_l[:, None, :]).sum(-1), (sq * w_r[:, :, None]).sum(-2)


def _refresh(s: KronBlockState, idx: Tensor) -> Tensor:
    """Line 7 for the blocks ``idx``: ``U <- qr(L U)``, the rotated momentum carried along.

    Returns (len(idx),) bool: blocks whose QR failed and kept their previous basis.
    """
    old_l, old_r = s.U_L[idx], s.U_R[idx]
    new_l, failed_l = power_qr(s.L[idx], old_l)
    new_r, failed_r = power_qr(s.R[idx], old_r)
    # U_new^T (U_old Mt U_old^T) U_new: four m x n products, cheaper than forming the m x m
    # change of basis U_new^T U_old.
    momentum = old_l @ s.momentum[idx] @ old_r.mT
    s.momentum.index_copy_(0, idx, new_l.mT @ momentum @ new_r)
    s.U_L.index_copy_(0, idx, new_l)
    s.U_R.index_copy_(0, idx, new_r)
    return failed_l | failed_r


def kron_block_step(
    state: KronBlockState, grad: Tensor, hyper: BlockHyper, offset: Tensor
) -> tuple[Tensor, Tensor | None]:
    """One step of Algorithm 1 on every block of ``state`` (updated in place).

    ``grad`` is (B, m, n) float32, ``offset`` (B,) the blocks' refresh offsets (CPU, as
    ``state.step``). Returns (update M_hat (B, m, n), failures): ``failures`` is None when no
    block refreshed, else (B,) bool, the blocks whose QR failed and kept their basis.
    """
    _accumulate(state, grad, hyper)
    failed = None
    due = refresh_due(state.step, offset, hyper.frequency)  # on the host: no device sync
    if bool(due.any()):
        idx = due.nonzero().flatten().to(grad.device)
        failed = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
        failed[idx] = _refresh(state, idx)
    s = state
    lam_l, lam_r = floor_relative(s.lam_L, hyper.eig_floor), floor_relative(s.lam_R, hyper.eig_floor)
    pre = precondition_rotated(s.momentum, lam_l, lam_r, hyper.rho, hyper.q, hyper.c, hyper.eps, hyper.backend)
    return s.U_L @ pre @ s.U_R.mT, failed


def floor_relative(lam: Tensor, floor: float) -> Tensor:
    """``lam`` (B, d) raised to at least ``floor`` times each block's largest entry.

    A damping of the preconditioner only (the stored estimates are untouched): it bounds
    ``S^-1/2`` at ``1 / floor`` times its value at the top of the spectrum. The Frobenius
    baselines need it: their bottom estimates can collapse towards zero, and then ``S^-1/2``
    on those directions explodes and training stops.
    """
    if floor <= 0.0:
        return lam
    return torch.maximum(lam, floor * lam.amax(dim=-1, keepdim=True))


def lpt_refresh_offsets(costs: list[float], frequency: int, stagger: bool) -> list[int]:
    """Refresh offset in [0, T) per block: greedy longest-processing-time over T step slots.

    Each step then does about 1/T of the QR work. ``stagger=False`` puts every block on
    offset 0 (the paper's schedule: all blocks refresh when step % T == 0).
    """
    if not stagger or frequency == 1:
        return [0] * len(costs)
    load = [0.0] * frequency
    offsets = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        slot = min(range(frequency), key=lambda k: (load[k], k))
        offsets[i] = slot
        load[slot] += costs[i]
    return offsets
