"""Algorithm 1 of the paper on a stack of same-shape Kronecker blocks.

State is float32 whatever the parameter dtype. A block's state is set up by the first
*non-zero* gradient it sees (:func:`init_block_state`); after that every step runs Algorithm 1
(:func:`kron_block_step`):

1. ``M <- (1-b1) G + b1 M``, kept in the eigenbasis: ``Mt = U_L^T M U_R`` (see below)
2. ``(dL, dR) <- STATS(G, U_L, U_R, lam_L, lam_R)``
3. ``L <- (1-b2) dL + b2 L``, ``R`` likewise
4. ``lam <- (1-b2) diag(U^T dL U) + b2 lam``, from the rotated gradient (see ``stats``)
5. on refresh steps ``U <- qr((L + delta I) U)`` (one warm-started power iteration; the small
   shift keeps a rank-deficient factor's null space on its previous basis, see ``bases``)
6. ``update = KRONPRECOND(U_L, U_R, lam_L, lam_R, M, rho, q, c)``

The step is functional: it returns the new state and the update and changes nothing, so
that the optimizer can check the whole step for finiteness before committing any of it.

The momentum is stored rotated, ``Mt = U_L^T M U_R``: the rotated gradient is needed for the
eigenvalue statistics anyway, so ``Mt <- (1-b1) Gt + b1 Mt`` saves the two products that
rotate M every step; on a refresh ``Mt`` is carried into the new basis. This is Algorithm 1
exactly (the bases are orthogonal), up to rounding.

Four initialisations (``BlockHyper.init``):

- ``first-gradient``: the factors start from one application of STATS to the first gradient,
  taken from the isotropic state at the gradient's scale (U = I, lam = rms(G), L = R = rms(G) I;
  for Shampoo, whose statistics ignore the state, the identity); the bases are the
  eigenvectors of those factors, degenerate eigenspaces resolved by value
  (:func:`~bregtop_dist.core.bases.tie_broken_eigh`), and the eigenvalue estimates their
  eigenvalues (Rayleigh quotients) raised to at least ``FIRST_EIG_FLOOR`` times their mean (one
  gradient gives rank-deficient factors whose zero eigenvalues would make ``S^-1/2`` explode).
  The same step then runs Algorithm 1, so the first gradient already moves the parameters.
- ``first-gradient-averaged``: the ``first-gradient`` state, then factor and estimate EMAs
  that average the block's statistics so far as Adam's bias-corrected second moment does
  (the first state the first term, then ``add = (1-b2)/(1-b2^(t+1))`` at the block's t-th step
  instead of ``1-b2``): the first gradient's weight falls as 1/t instead of staying near
  ``b2^t``, so the estimates follow gradients that shrink (or grow) over the first
  ``1/(1-b2)`` steps; scale-free as ``first-gradient``. The default (issue 28's
  measurements: docs/results/first-state.md).
- ``first-gradient-unit``: the same, from the unit state (U = I, lam = 1, L = R = I) for every
  divergence, as before the state at the gradient's scale: the first estimates are then of the
  scale of ``|G|^2`` rather than the fixed point's ``|G|``, so the first steps' size depends on
  the loss's units (a candidate kept for issue 28's comparison, see docs/optimizer.md).
- ``kl-methods``: what Lin et al.'s public KL-Shampoo code does (the paper's [11]). The first
  step only initialises: ``L = (1-b2) STATS(G)`` from the identity state, its eigenbasis,
  and constant estimates ``lam = init_factor``; no update. Every later step preconditions
  with the previous step's estimates and basis, then updates the statistics (lines 2-5).
  The stored estimates are clamped so that ``lam^-1/2 <= max(10, min(d, 4000))`` for a
  factor of size d, which also bounds the KL weights ``1/lam``.

Inputs real training produces and the paper's algorithm does not anticipate:

- A block whose gradient is exactly zero (a layer in front of a zero-initialised projection,
  an unrouted expert) learns nothing about its curvature: a not-yet-initialised block stays
  uninitialised (its update is zero), an initialised one keeps its factors and estimates
  instead of decaying them towards zero, which would underflow after a few thousand steps
  and poison the factor weights. The momentum decays as usual.
- The estimates used in the factor weights and in S are at least ``NOISE_FLOOR`` times the
  factor's largest (and the dtype's smallest normal number). The rotated gradient carries
  rounding errors of about ``eps_fp32 |G|``, so estimates below ``eps_fp32^2`` times the
  largest are rounding noise; an estimate that decays there (a direction the gradients never
  reach) would otherwise make the KL weights and ``S^-1/2`` blow up on that noise. Estimates
  that fp32 can resolve are untouched.
- S is never formed (see :mod:`bregtop_dist.core.precondition`), and the rotated sums are
  formed from ``Gt sqrt(w)`` (see :func:`bregtop_dist.core.stats.weighted_square_sums`), so
  eigenvalues and gradients anywhere in the float32 range give finite results where the
  quantities themselves are representable.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bregtop_dist.core.bases import power_qr, tie_broken_eigh
from bregtop_dist.core.block_state import KronBlockState
from bregtop_dist.core.dispatch import resolve_backend
from bregtop_dist.core.finite import nonzero_rows
from bregtop_dist.core.precondition import precondition_rotated
from bregtop_dist.core.rotation import rotate
from bregtop_dist.core.stats import (
    EIGEN_WEIGHTED,
    factor_weights,
    rotated_diagonals,
    stats_increments,
    weighted_square_sums,
)

FIRST_EIG_FLOOR = 1.0
"""``first-gradient``: first eigenvalue estimates are at least this multiple of their mean."""
NOISE_FLOOR = torch.finfo(torch.float32).eps ** 2
"""Estimates used in the weights and in S are at least this fraction of the factor's largest."""
INITS = ("first-gradient", "first-gradient-averaged", "first-gradient-unit", "kl-methods")
GRAFTS = ("none", "adamw")


@dataclass(frozen=True)
class BlockHyper:
    """The hyperparameters Algorithm 1 reads: derived from a validated
    :class:`~bregtop_dist.config.BregTopConfig` (``block_hyper()``), not validated again."""

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
    exponent: float = 0.5  # p of S^-p (Shampoo: 1/4 by default)
    init: str = "first-gradient-averaged"
    init_factor: float = 0.1  # kl-methods: the constant first estimate
    rotation_precision: str = "fp32"  # products with the eigenbases: fp32, tf32 or bf16
    graft: str = "none"  # "adamw": each block's update takes the norm of AdamW's (see graft_to_adamw)
    graft_beta2: float = 0.999  # the AdamW side's beta2 and eps, which the grafted norm follows
    graft_eps: float = 1e-8


@dataclass(frozen=True)
class Schedule:
    """Which blocks' bases refresh in a step, as the caller decided it (in the optimizer, the
    block stack: :meth:`bregtop_dist.block_plan.BlockStack.schedule`); the step never derives it.

    ``due`` is (B,) bool on the host, ``rows`` the same rows on the state's device (None when
    none is due), and ``every_ready`` says the caller knows every block is ready, so that the
    step reads no host-side count."""

    due: Tensor
    rows: Tensor | None
    every_ready: bool = False

    @classmethod
    def at(cls, taken: Tensor, phases: Tensor, frequency: int, device: torch.device | str,
           every_ready: bool = False) -> Schedule:
        """The staggered schedule: the blocks whose count of taken steps after this one
        (``taken``, host) is their refresh phase modulo ``frequency`` (:func:`refresh_due`)."""
        due = refresh_due(taken, phases, frequency)
        return cls(due, _due_rows(due, device), every_ready)

    def select(self, idx: Tensor, device: torch.device | str) -> Schedule:
        """The schedule of the rows ``idx`` (host) of the stack."""
        due = self.due.index_select(0, idx)
        return Schedule(due, _due_rows(due, device))


def _due_rows(due: Tensor, device: torch.device | str) -> Tensor | None:
    """The rows of the host mask ``due`` on ``device``, or None when none is due."""
    return due.nonzero().flatten().to(device) if bool(due.any()) else None


@dataclass
class BlockStepResult:
    """What one step computed for a stack, not yet committed."""

    state: KronBlockState
    update: Tensor  # (B, m, n) float32; zero for blocks without state
    failed: Tensor | None  # (B,) bool: eigh/QR failed and the block kept its basis; None: none ran


def kl_methods_clamp(lam: Tensor) -> Tensor:
    """[11]'s clamp of stored estimates: ``lam^-1/2 <= max(10, min(d, 4000))``, d = lam's size."""
    bound = max(10, min(lam.shape[-1], 4000))
    return lam.clamp_min(1.0 / bound**2)


def noise_floor(lam: Tensor) -> Tensor:
    """``lam`` (B, d) raised to ``NOISE_FLOOR`` times each block's largest entry and to the
    dtype's smallest normal number (see the module docstring)."""
    tiny = torch.finfo(lam.dtype).tiny
    return torch.maximum(lam, (NOISE_FLOOR * lam.amax(dim=-1, keepdim=True)).clamp_min(tiny))


def floor_relative(lam: Tensor, floor: float) -> Tensor:
    """``lam`` (B, d) raised to at least ``floor`` times each block's largest entry.

    A damping of the preconditioner only (the stored estimates are untouched): it bounds
    ``S^-1/2`` at ``1 / floor`` times its value at the top of the spectrum.
    """
    if floor <= 0.0:
        return lam
    return torch.maximum(lam, floor * lam.amax(dim=-1, keepdim=True))


def init_block_state(hyper: BlockHyper, grad: Tensor) -> tuple[KronBlockState, Tensor]:
    """State of a stack from its first non-zero gradient (B, m, n) float32 (see the module
    docstring for the two initialisations); also (B,) eigh failures."""
    bsz, m, n = grad.shape
    eye_l = torch.eye(m, dtype=grad.dtype, device=grad.device).expand(bsz, m, m)
    eye_r = torch.eye(n, dtype=grad.dtype, device=grad.device).expand(bsz, n, n)
    ones_l = grad.new_ones(bsz, m)
    ones_r = grad.new_ones(bsz, n)
    scale = _first_state_scale(hyper, grad)  # STATS(G, scale I) = scale STATS(G / scale, I)
    d_l, d_r = stats_increments(hyper.stats, grad / scale, None, None, ones_l, ones_r, eye_l, eye_r)
    d_l, d_r = scale * d_l, scale * d_r
    if hyper.init == "kl-methods":  # the factor EMA's first term, from zero
        d_l, d_r = (1.0 - hyper.beta2) * d_l, (1.0 - hyper.beta2) * d_r
    eig_l, u_l, failed_l = tie_broken_eigh(d_l)
    eig_r, u_r, failed_r = tie_broken_eigh(d_r)
    if hyper.init == "kl-methods":
        lam_l = kl_methods_clamp(torch.full_like(eig_l, hyper.init_factor))
        lam_r = kl_methods_clamp(torch.full_like(eig_r, hyper.init_factor))
    else:
        lam_l, lam_r = _first_floor(eig_l), _first_floor(eig_r)
    state = KronBlockState(
        momentum=torch.zeros_like(grad),
        L=d_l.contiguous(),
        R=d_r.contiguous(),
        U_L=u_l.contiguous(),
        U_R=u_r.contiguous(),
        lam_L=lam_l,
        lam_R=lam_r,
        step=torch.zeros(bsz, dtype=torch.int64),
        ready=torch.ones(bsz, dtype=torch.bool),
        graft_m=None if hyper.graft == "none" else torch.zeros_like(grad),
        graft_v=None if hyper.graft == "none" else torch.zeros_like(grad),
    )
    return state, failed_l | failed_r


def _first_state_scale(hyper: BlockHyper, grad: Tensor) -> Tensor | float:
    """The scale of the isotropic state STATS is first taken from: 1 (the identity state) for
    ``kl-methods``, as [11] does, for ``first-gradient-unit``, and for Shampoo, whose statistics
    do not depend on the state (``G G^T``, whose eigenvalues are the fixed point's scale). Every
    other divergence's statistics are homogeneous of degree 1 in (G, state), so their fixed
    point has estimates of the scale of ``|G|``; from the unit state they would start at
    ``|G|^2``, which makes the first steps' size depend on the gradient's scale (tiny gradients
    hardly move, and on SST-2 the F rows collapse onto their top directions). For those
    ``first-gradient`` starts at the gradient's root mean square (B, 1, 1)."""
    if hyper.init in ("kl-methods", "first-gradient-unit") or hyper.stats == "shampoo":
        return 1.0
    _, m, n = grad.shape
    rms = block_norms(grad) / math.sqrt(m * n)
    return rms.clamp_min(torch.finfo(grad.dtype).tiny)[:, None, None]


def _first_floor(lam: Tensor) -> Tensor:
    floor = (FIRST_EIG_FLOOR * lam.clamp_min(0).mean(-1, keepdim=True)).clamp_min(torch.finfo(lam.dtype).tiny)
    return torch.maximum(lam, floor)


def refresh_due(step: Tensor, offset: Tensor, frequency: int) -> Tensor:
    """Which blocks refresh their bases at ``step`` (taken steps, after this one)."""
    return torch.remainder(step - offset, frequency) == 0


def _accumulate(s: KronBlockState, grad: Tensor, hyper: BlockHyper, observed: Tensor) -> KronBlockState:
    """Lines 1-5 of Algorithm 1 but the refresh, into a new state: momentum, factor and
    eigenvalue EMAs. Blocks whose gradient is zero (``observed`` False) keep their statistics."""
    b1 = hyper.beta1
    prec = hyper.rotation_precision
    keep, add = _ema_weights(s.step, hyper, grad.device)
    decay = torch.where(observed, keep, 1.0).to(grad.dtype)  # zero gradient: no observation, no decay
    lam_l, lam_r = noise_floor(s.lam_L), noise_floor(s.lam_R)
    if hyper.stats == "f-v1":
        gt = rotate(rotate(s.U_L.mT, grad, prec), s.U_R, prec)  # (B, m, n), the gradient in the current eigenbasis
        d_l, d_r = stats_increments("f-v1", grad, s.U_L, s.U_R, lam_l, lam_r, s.L, s.R)
        diag_l, diag_r = rotated_diagonals("f-v1", gt, lam_l, lam_r, s.L, s.R, d_l, d_r, s.U_L, s.U_R, G=grad)
        decay_m = decay[:, None, None]
        if isinstance(add, float):
            big_l, big_r = s.L * decay_m + add * d_l, s.R * decay_m + add * d_r
        else:
            add_m = add[:, None, None]
            big_l, big_r = torch.addcmul(s.L * decay_m, add_m, d_l), torch.addcmul(s.R * decay_m, add_m, d_r)
        momentum = torch.lerp(s.momentum, gt, 1.0 - b1)
    else:
        # dL = X_L diag(w_L) X_L^T: the factor EMA is one fused product of pre-scaled X.
        w_l, w_r = factor_weights(hyper.stats, lam_l, lam_r, s.L, s.R)
        if hyper.stats in EIGEN_WEIGHTED:
            x_r = rotate(s.U_L.mT, grad, prec)  # (B, m, n)
            x_l = rotate(grad, s.U_R, prec)
            gt = rotate(x_r, s.U_R, prec)
        else:
            x_l = x_r = grad
            gt = rotate(rotate(s.U_L.mT, grad, prec), s.U_R, prec)
        if isinstance(add, float):
            alpha = add
        else:  # per-block weights folded into w: dX and diag(...) both scale by them
            w_l, w_r, alpha = w_l * add[:, None], w_r * add[:, None], 1.0
        scaled_l = x_l * w_l.sqrt()[:, None, :]
        scaled_r = x_r * w_r.sqrt()[:, :, None]
        big_l = torch.baddbmm(s.L * decay[:, None, None], scaled_l, scaled_l.mT, alpha=alpha)
        big_r = torch.baddbmm(s.R * decay[:, None, None], scaled_r.mT, scaled_r, alpha=alpha)
        diag_l, diag_r, momentum = _weighted_sums_and_momentum(s.momentum, gt, w_l, w_r, b1, hyper.backend)
        add = alpha
    decay_v = decay[:, None]
    if isinstance(add, float):
        new_lam_l = s.lam_L * decay_v + add * diag_l
        new_lam_r = s.lam_R * decay_v + add * diag_r
    else:
        add_v = add[:, None]
        new_lam_l = torch.addcmul(s.lam_L * decay_v, add_v, diag_l)
        new_lam_r = torch.addcmul(s.lam_R * decay_v, add_v, diag_r)
    if hyper.init == "kl-methods":
        new_lam_l, new_lam_r = kl_methods_clamp(new_lam_l), kl_methods_clamp(new_lam_r)
    graft_m = graft_v = None
    if s.graft_m is not None and s.graft_v is not None:
        graft_m = torch.lerp(s.graft_m, grad, 1.0 - b1)
        graft_v = torch.lerp(s.graft_v, grad.square(), 1.0 - hyper.graft_beta2)
    return KronBlockState(
        momentum=momentum, L=big_l, R=big_r, U_L=s.U_L, U_R=s.U_R, lam_L=new_lam_l, lam_R=new_lam_r,
        step=s.step + 1, ready=s.ready, graft_m=graft_m, graft_v=graft_v,
    )


def _ema_weights(step: Tensor, hyper: BlockHyper, device: torch.device) -> tuple[float | Tensor, float | Tensor]:
    """(keep, add) of the factor and estimate EMAs, ``X <- keep X + add dX``: ``(b2, 1 - b2)``,
    Algorithm 1's; under ``first-gradient-averaged`` the running average that Adam's
    bias-corrected second moment is, ``X = sum_s b2^(t-s) dX_s / sum_s b2^(t-s)``, with the
    first state (floored, so of full rank) as the first term: ``add = (1 - b2) / (1 - b2^(k+2))``
    at a block's step k (k = 0 first). Without that prior the statistics of fewer gradients
    than the block's side are rank-deficient and KL's ``1/lam`` weights collapse the block
    (updates of 1e-7 after a few steps, measured). Python numbers for Algorithm 1's
    weights, (B,) float32 tensors on ``device`` for the running average."""
    b2 = hyper.beta2
    if hyper.init != "first-gradient-averaged":
        return b2, 1.0 - b2
    # always tensors: a Python number would need the counts read back, a host read per stack
    # per step (tests/test_launch_budget.py allows one read per step in all)
    table = _averaging_weights(b2)
    add_t = table[step.clamp(max=len(table) - 1)].to(device)
    return 1.0 - add_t, add_t


@functools.lru_cache(maxsize=8)
def _averaging_weights(b2: float) -> Tensor:
    """``(1 - b2) / (1 - b2^(k+2))`` for k = 0, 1, ... as float32, computed once in float64
    on the host, until ``b2^(k+2)`` is below 2^-30 (the last entry, ``1 - b2`` to float32
    precision, serves every later step). A table rather than ``torch.pow`` on the counts:
    a vectorised pow may round a lane differently from the scalar tail, which made a block's
    weight depend on its place in a stack (distributed runs then differed from one process)."""
    steps = max(1, math.ceil(30 * math.log(2) / -math.log(b2))) if 0.0 < b2 < 1.0 else 1
    return torch.tensor([(1.0 - b2) / (1.0 - b2 ** (k + 2)) for k in range(steps)] + [1.0 - b2],
                        dtype=torch.float32)


def _weighted_sums_and_momentum(
    momentum: Tensor, gt: Tensor, w_l: Tensor, w_r: Tensor, b1: float, backend: str
) -> tuple[Tensor, Tensor, Tensor]:
    """``rowsum(Gt^2 w_L)``, ``colsum(Gt^2 w_R)`` and the new ``lerp(Mt, Gt, 1 - b1)``: one
    fused pass of the Triton kernel where the backend allows it, torch otherwise."""
    if b1 > 0.5 and resolve_backend(backend, gt.device, torch.float32) == "triton":
        from triton_kernels.rotated_stats import rotated_stats

        new = momentum.clone()
        diag_l, diag_r = rotated_stats(gt.contiguous(), w_l, w_r, new, b1)
        return diag_l, diag_r, new
    diag_l, diag_r = weighted_square_sums(gt, w_l, w_r)
    return diag_l, diag_r, torch.lerp(momentum, gt, 1.0 - b1)


def _refresh(s: KronBlockState, idx: Tensor, prec: str = "fp32") -> tuple[KronBlockState, Tensor]:
    """Line 7 for the blocks ``idx``: ``U <- qr(L U)``, the rotated momentum carried along,
    into a new state. Also (len(idx),) bool: blocks whose QR failed and kept their basis."""
    old_l, old_r = s.U_L[idx], s.U_R[idx]
    new_l, failed_l = power_qr(s.L[idx], old_l)
    new_r, failed_r = power_qr(s.R[idx], old_r)
    # U_new^T (U_old Mt U_old^T) U_new: four m x n products, cheaper than forming the m x m
    # change of basis U_new^T U_old.
    momentum = rotate(rotate(old_l, s.momentum[idx], prec), old_r.mT, prec)
    new = KronBlockState(**s.tensors())
    new.momentum = torch.index_copy(s.momentum, 0, idx, rotate(rotate(new_l.mT, momentum, prec), new_r, prec))
    new.U_L = torch.index_copy(s.U_L, 0, idx, new_l)
    new.U_R = torch.index_copy(s.U_R, 0, idx, new_r)
    return new, failed_l | failed_r


def _precondition(mt: Tensor, lam_l: Tensor, lam_r: Tensor, u_l: Tensor, u_r: Tensor, hyper: BlockHyper) -> Tensor:
    """Line 6: ``U_L (Mt * W) U_R^T`` from the estimates (damped by eig_floor, noise-floored)."""
    lam_l = noise_floor(floor_relative(lam_l, hyper.eig_floor))
    lam_r = noise_floor(floor_relative(lam_r, hyper.eig_floor))
    pre = precondition_rotated(mt, lam_l, lam_r, hyper.rho, hyper.q, hyper.c, hyper.eps, hyper.backend, hyper.exponent)
    return rotate(rotate(u_l, pre, hyper.rotation_precision), u_r.mT, hyper.rotation_precision)


def _step_initialised(
    state: KronBlockState, grad: Tensor, hyper: BlockHyper, observed: Tensor, refresh: Tensor | None,
) -> BlockStepResult:
    """Algorithm 1 on blocks that all have state, the rows ``refresh`` (device) refreshing."""
    new = _accumulate(state, grad, hyper, observed)
    update = None
    if hyper.init == "kl-methods":  # the previous estimates and basis, the new momentum
        update = _precondition(new.momentum, state.lam_L, state.lam_R, state.U_L, state.U_R, hyper)
    failed = None
    if refresh is not None:
        new, qr_failed = _refresh(new, refresh, hyper.rotation_precision)
        failed = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
        failed[refresh] = qr_failed
    if update is None:
        update = _precondition(new.momentum, new.lam_L, new.lam_R, new.U_L, new.U_R, hyper)
    if hyper.graft == "adamw":
        update = graft_to_adamw(update, new, hyper)
    return BlockStepResult(new, update, failed)


def graft_to_adamw(update: Tensor, s: KronBlockState, hyper: BlockHyper) -> Tensor:
    """Each block's ``update`` (B, m, n) rescaled to the Frobenius norm of AdamW's update,
    ``m_hat / (sqrt(v_hat) + eps)`` (bias-corrected by the block's step count): the direction
    stays the Kronecker method's, the size per block is AdamW's, so a learning rate tuned for
    AdamW carries over (Distributed Shampoo's AdamW grafting). ``s`` is the state after the
    step. AdamW's m is the method's momentum M, kept a second time in the parameter's basis:
    M rotated back from the eigenbasis carries rounding of ~1e-7 |M| into entries whose v is
    zero (a feature never seen), where ``/ eps`` would blow it up."""
    assert s.graft_m is not None and s.graft_v is not None  # the step adds them where the group grafts
    bc1, bc2 = _bias_corrections(s.step, (hyper.beta1, hyper.graft_beta2), update.device)
    adamw = (s.graft_m / bc1) / ((s.graft_v / bc2).sqrt() + hyper.graft_eps)
    own = block_norms(update)
    ratio = torch.where(own > 0, block_norms(adamw) / own.clamp_min(torch.finfo(own.dtype).tiny), 0.0)
    return update * ratio[:, None, None]


def _bias_corrections(step: Tensor, betas: tuple[float, ...], device: torch.device) -> list[Tensor | float]:
    """``1 - beta^t`` for each beta, t the blocks' step counts (B,) on the host: Python numbers
    when every block has taken the same steps (the usual case, nothing to upload), else
    (B, 1, 1) float32 tensors on ``device``."""
    common = _common_count(step)
    if common is not None:
        return [1.0 - beta**common for beta in betas]
    taken = step.to(torch.float64)
    return [(1.0 - beta**taken).to(device, torch.float32)[:, None, None] for beta in betas]


def _common_count(step: Tensor) -> int | None:
    """The step count every block of a stack has taken (host tensor (B,)), or None when they
    differ (0 for an empty stack)."""
    first = int(step[0]) if step.numel() else 0
    return first if bool((step == first).all()) else None


def block_norms(x: Tensor) -> Tensor:
    """(B,) Frobenius norms of x (B, m, n), formed from ``x / max|x|`` so that entries whose
    squares leave the float range still give their norm."""
    amax = x.abs().amax(dim=(-2, -1))
    unit = x / amax.clamp_min(torch.finfo(x.dtype).tiny)[:, None, None]
    return amax * torch.linalg.vector_norm(unit, dim=(-2, -1))


def with_graft_moment(state: KronBlockState, hyper: BlockHyper) -> KronBlockState:
    """``state`` with the grafting's moments where the group grafts and without them where it
    does not. Moments cannot start on blocks that have stepped without them: AdamW's bias
    correction counts the block's steps, so a late zero moment would blow up the size."""
    if hyper.graft == "none":
        return state if state.graft_v is None else dataclasses.replace(state, graft_m=None, graft_v=None)
    if state.graft_m is not None and state.graft_v is not None:
        return state
    if bool(state.ready.any()):
        raise ValueError(
            f"graft={hyper.graft!r} was set on a param group whose blocks have already stepped without "
            "grafting; set graft when the group is created (or load a checkpoint saved with it)"
        )
    return dataclasses.replace(state, graft_m=torch.zeros_like(state.momentum), graft_v=torch.zeros_like(state.momentum))


def kron_block_step(state: KronBlockState, grad: Tensor, hyper: BlockHyper, schedule: Schedule) -> BlockStepResult:
    """One step of Algorithm 1 on every block of ``state`` (which is not changed).

    ``grad`` is (B, m, n) float32; ``schedule`` says which blocks refresh their bases. Blocks
    without state are initialised by a non-zero gradient and left as they are by a zero one
    (update zero); a schedule whose caller knows every block ready skips the host read of the
    readiness that decides that.
    """
    state = with_graft_moment(state, hyper)
    observed = nonzero_rows(grad)  # (B,) on the device
    if schedule.every_ready or bool(state.ready.all()):  # the usual case: no host read of the device
        return _step_initialised(state, grad, hyper, observed, schedule.rows)

    starting = ~state.ready & observed.cpu()
    new, failed = state, None
    if bool(starting.any()):
        idx = starting.nonzero().flatten()
        init, init_failed = init_block_state(hyper, grad.index_select(0, idx.to(grad.device)))
        new = state.with_rows(idx, init)
        failed = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device)
        failed[idx.to(grad.device)] = init_failed
    live = state.ready if hyper.init == "kl-methods" else state.ready | starting
    update = torch.zeros_like(grad)
    if bool(live.any()):
        idx = live.nonzero().flatten()
        dev_idx = idx.to(grad.device)
        part = _step_initialised(
            new.select(idx), grad.index_select(0, dev_idx), hyper, observed.index_select(0, dev_idx),
            schedule.select(idx, grad.device).rows,
        )
        new = new.with_rows(idx, part.state)
        update.index_copy_(0, dev_idx, part.update)
        if part.failed is not None:
            failed = torch.zeros(grad.shape[0], dtype=torch.bool, device=grad.device) if failed is None else failed
            failed[dev_idx] |= part.failed
    return BlockStepResult(new, update, failed)


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
