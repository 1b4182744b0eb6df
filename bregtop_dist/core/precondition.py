"""Algorithm 2 of the paper (KRONPRECOND): masked eigenvalue preconditioning of one block.

In the Kronecker eigenbasis the rotated momentum ``Mt = U_L^T M U_R`` is scaled entrywise
by ``W``: the K = ceil(rho*m*n) largest entries of ``S = lam_L lam_R^T`` (the top set) get
``S^-1/2``, every other entry gets ``chi = c * Quantile_q{S^-1/2 over the bottom set}``.
With ``eps > 0`` every ``S^-1/2`` reads ``1 / (sqrt(S) + eps)``; ``eps = 0`` is the paper.
Shampoo's ``p = 1/4`` reads ``S^-1/4`` in place of ``S^-1/2`` (rho = 1 there).

S itself is never formed, not even entrywise: the eigenvalues of the two factors can each be
anywhere in the float range while their product is not (1e25 x 1e25 overflows float32, 1e-25
x 1e-25 underflows it), although ``S^-1/2`` is representable. Everything here works on the
*root spectrum* ``sqrt(S) = sqrt(lam_L) sqrt(lam_R)^T``, which has the same order as S and
stays in range; a ``power`` of 1 (p = 1/2) or 1/2 (p = 1/4) turns it into the scale.

The selection is resolved by value, never by the last bit of a sum (so that the update is a
continuous function of the estimates, and every world size, kernel and device gives the same
run). Two departures from a literal reading of Algorithm 2 follow, each confined to entries
the paper leaves to chance:

- Entries equal to the K-th largest entry (the threshold) all join the top set, where a sort
  would admit only as many as make K, chosen by position (and so by the basis the refresh
  happened to pick for a degenerate eigenspace).
- Entries up to ``SELECTION_BAND`` (relatively) below the threshold blend linearly from chi
  (at the band's lower edge) to their own scale (at the threshold). A hard cut would move an
  entry from one scale to the other, a factor of about c, on a one-ulp change of an estimate;
  the blend bounds that sensitivity at about ``c / SELECTION_BAND``. Entries outside the band
  get exactly what Algorithm 2 gives them.

The threshold and the quantile come from :mod:`bregtop_dist.core.selection`, never from
sorting the m*n entries.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from bregtop_dist.core.dispatch import BACKENDS, resolve_backend
from bregtop_dist.core.selection import kth_largest_product
from bregtop_dist.core.validate import check_floating_tensor, is_real, wrong_type


def top_count(rho: float, m: int, n: int) -> int:
    """K = ceil(rho * m * n), at least 1 (the size of the top set)."""
    return max(1, math.ceil(rho * m * n))


SELECTION_BAND = 1e-2
"""Relative width of the band below the threshold over which the bottom set's chi blends into
the top set's scale (see the module docstring)."""

POWERS = (0.5, 1.0)
"""``power`` of the scale ``1 / (x^power + eps)`` of a spectrum x: 0.5 on S (or on the root
spectrum for Shampoo's p = 1/4), 1 on the root spectrum (p = 1/2)."""


def inverse_power(x: Tensor, eps: float, power: float = 0.5) -> Tensor:
    """The top-set scale ``1 / (x^power + eps)`` of spectrum entries ``x``; ``x^-power`` when
    eps = 0, with x raised to the smallest normal number first so that it is never inf."""
    if eps == 0.0:
        return x.clamp_min(torch.finfo(x.dtype).tiny).pow(-power)
    return 1.0 / ((x if power == 1.0 else x.sqrt()) + eps)


def _inverse_power_(x: Tensor, eps: float, power: float) -> Tensor:
    """:func:`inverse_power` in place (x is not needed afterwards)."""
    if eps == 0.0:
        return x.clamp_min_(torch.finfo(x.dtype).tiny).pow_(-power)
    return (x if power == 1.0 else x.sqrt_()).add_(eps).reciprocal_()


def spectrum_root(lam: Tensor) -> Tensor:
    """``sqrt(lam)``, with lam raised to the smallest normal number first: the factor of the
    root spectrum ``sqrt(S)``, whose entries then lie in [tiny, max] of lam's dtype."""
    return lam.clamp_min(torch.finfo(lam.dtype).tiny).sqrt()


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Eigenvalues and S are handled in float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@dataclass(frozen=True)
class TopSet:
    """Algorithm 2's selection for a batch of blocks, everything a kernel needs to apply it.

    An entry of the spectrum at or above ``threshold`` is in the top set; one below it gets
    ``chi``, blended into its own scale within ``SELECTION_BAND`` of the threshold (see
    :func:`selection_weights`).
    """

    threshold: Tensor  # (B,) the K-th largest entry of S (-inf: every entry is in the top set)
    chi: Tensor  # (B,) the bottom-set scale


@functools.lru_cache(maxsize=256)
def _selection_constants(
    m: int, n: int, rho: float, q: float, dtype: torch.dtype, device: torch.device
) -> tuple[Tensor, Tensor]:
    """The descending ranks (3,) of the threshold (K - 1) and of the two order statistics the
    q-quantile interpolates, and the interpolation weight (a 0-d tensor of ``dtype``): the
    same for every step of a stack, so built once (no host read or upload per step)."""
    k = top_count(rho, m, n)
    n_bottom = m * n - k
    # torch.quantile(v, q, interpolation="linear") over the n_bottom ascending values of
    # S^-1/2: position q*(n_bottom-1) between two order statistics. Ascending S^-1/2 is
    # descending S, and the bottom set starts at descending rank k.
    pos = torch.tensor(q, dtype=dtype) * max(n_bottom - 1, 0)
    below = int(pos.floor().item())
    above = int(pos.ceil().item())
    weight = (pos - below).to(device=device, dtype=dtype)
    ranks = torch.tensor([k - 1, k + below, k + above], dtype=torch.int64, device=device)
    return ranks, weight


def _everything(bsz: int, m: int, n: int, dtype: torch.dtype, device: torch.device) -> TopSet:
    """The selection when every entry is in the top set (rho * m * n >= m * n)."""
    none = torch.full((bsz,), -torch.inf, dtype=dtype, device=device)
    return TopSet(threshold=none, chi=torch.zeros_like(none))


def _chi(low: Tensor, high: Tensor, weight: Tensor, c: float, eps: float, power: float) -> Tensor:
    """``c`` times the q-quantile of the bottom set's scale, interpolated between the scales
    of two of its order statistics (``low`` and ``high``, entries of the spectrum)."""
    return c * torch.lerp(inverse_power(low, eps, power), inverse_power(high, eps, power), weight)


def select_top_set(
    lam_l: Tensor, lam_r: Tensor, rho: float, q: float, c: float, eps: float = 0.0, power: float = 0.5,
    *, kernel: bool = False,
) -> TopSet:
    """The top set and chi of Algorithm 2 from (B, m), (B, n) non-negative factors of a
    spectrum ``lam_l lam_r^T`` of one float dtype (eigenvalues with ``power`` 0.5, their
    square roots with ``power`` 1), found from the sorted vectors. ``kernel`` runs the
    searches in one Triton launch per stack (``triton_kernels.top_set``, float32): the same
    threshold, the same chi."""
    bsz, m = lam_l.shape
    n = lam_r.shape[-1]
    if top_count(rho, m, n) == m * n:
        return _everything(bsz, m, n, lam_l.dtype, lam_l.device)
    ranks, weight = _selection_constants(m, n, rho, q, lam_l.dtype, lam_l.device)
    b_asc = torch.sort(lam_r, dim=-1).values
    if kernel:
        from triton_kernels.top_set import top_set_statistics

        stats = top_set_statistics(lam_l, b_asc, ranks)
    else:
        a_desc = torch.sort(lam_l, dim=-1, descending=True).values
        stats = kth_largest_product(a_desc, b_asc, ranks.expand(bsz, 3).contiguous())
    return TopSet(threshold=stats[:, 0], chi=_chi(stats[:, 1], stats[:, 2], weight, c, eps, power))


def top_mask(s: Tensor, top: TopSet) -> Tensor:
    """The indicator E of the top set (B, m, n), bool, from the spectrum ``s`` (B, m, n) that
    ``top`` was selected on (the root spectrum ``lam_l lam_r^T`` of :func:`select_top_set`'s
    arguments): the entries at or above the threshold, which Algorithm 2 scales by ``S^-1/2``."""
    return s >= top.threshold[:, None, None]


def blend_ramp(s: Tensor, threshold: Tensor, band: float = SELECTION_BAND) -> Tensor:
    """How far an entry below the threshold has moved from chi towards its own scale: 0 at or
    below ``(1 - band) * threshold``, rising linearly to 1 at the threshold; ``s`` (B, m, n),
    ``threshold`` (B, 1, 1). (A threshold of -inf gives 0: every entry is above it anyway.)"""
    return (s / threshold - (1.0 - band)).div_(band).clamp_(0.0, 1.0)


def selection_weights(s: Tensor, scale: Tensor, top: TopSet, band: float = SELECTION_BAND) -> Tensor:
    """W of Algorithm 2 from the spectrum entries ``s`` and their top-set ``scale`` (both
    (B, m, n)): ``scale`` at or above the threshold, chi below, blended in the band between."""
    thr = top.threshold[:, None, None].to(s.dtype)
    chi = top.chi[:, None, None].to(s.dtype)
    below = torch.lerp(chi.expand_as(scale), scale, blend_ramp(s, thr, band))
    return torch.where(s >= thr, scale, below)


def apply_top_set(
    mt: Tensor, lam_l: Tensor, lam_r: Tensor, top: TopSet, eps: float, power: float = 0.5,
    band: float = SELECTION_BAND,
) -> Tensor:
    """``Mt * W`` (B, m, n): ``1 / ((lam_l lam_r^T)^power + eps)`` on the top set, chi
    elsewhere, blended in the band below the threshold (:func:`selection_weights`). The torch
    reference of the fused Triton kernel ``triton_kernels.masked_scale``; computed in lam's
    dtype."""
    s = lam_l[:, :, None] * lam_r[:, None, :]
    return selection_weights(s, _inverse_power_(s.clone(), eps, power), top, band).mul_(mt)


def precondition_weights(
    lam_l: Tensor, lam_r: Tensor, rho: float, q: float, c: float, eps: float = 0.0, exponent: float = 0.5
) -> Tensor:
    """The scaling matrix W of Algorithm 2 for a batch of blocks: (B, m, n) from (B, m), (B, n)."""
    ones = lam_l.new_ones(lam_l.shape[0], lam_l.shape[1], lam_r.shape[-1])
    return precondition_rotated(ones, lam_l, lam_r, rho, q, c, eps, "torch", exponent)


def precondition_rotated(
    mt: Tensor,
    lam_l: Tensor,
    lam_r: Tensor,
    rho: float,
    q: float,
    c: float,
    eps: float,
    backend: str = "auto",
    exponent: float = 0.5,
) -> Tensor:
    """``Mt * W`` for a batch of blocks already in the eigenbasis; (B, m, n) in mt's dtype.

    ``backend`` picks the masked scaling (see :mod:`bregtop_dist.core.dispatch`);
    ``exponent`` is p of ``S^-p`` (1/2, or Shampoo's 1/4). Works on the root spectrum, so
    any eigenvalues of the dtype's range give a finite scale.
    """
    dtype = _compute_dtype(lam_l, lam_r)
    root_l, root_r = spectrum_root(lam_l.to(dtype)), spectrum_root(lam_r.to(dtype))
    power = 2.0 * exponent
    if resolve_backend(backend, mt.device, dtype) == "triton":
        from triton_kernels.masked_scale import masked_scale

        top = select_top_set(root_l, root_r, rho, q, c, eps, power, kernel=True)
        scaled = mt if mt.dtype in (torch.float32, torch.bfloat16) else mt.float()
        out = masked_scale(scaled.contiguous(), root_l, root_r, top.threshold, top.chi, eps, SELECTION_BAND, power=power)
        return out.to(mt.dtype)
    top = select_top_set(root_l, root_r, rho, q, c, eps, power)
    return apply_top_set(mt.to(dtype), root_l, root_r, top, eps, power).to(mt.dtype)


SELECTION_ALLOWED = {
    "rho": "rho must be a number in (0, 1]",
    "q": "q must be a number in [0, 1]",
    "c": "c must be > 0 and finite",
    "eps": "it must be a finite number >= 0",
}
"""What each selection setting allows, as error messages say it."""


def check_selection(rho: float | None, q: float | None, c: float | None, eps: float | None) -> None:
    """Error naming the first of rho, q, c, eps of the wrong type (ArgumentTypeError: not a
    real number, or a bool) or outside its range (ValueError); None is not checked."""
    for name, value in (("rho", rho), ("q", q), ("c", c), ("eps", eps)):
        if value is not None and not is_real(value):
            raise wrong_type(name, value, SELECTION_ALLOWED[name])
    if rho is not None and not 0.0 < rho <= 1.0:
        raise ValueError(f"rho={rho!r} is outside the allowed range (0, 1]")
    if q is not None and not 0.0 <= q <= 1.0:
        raise ValueError(f"q={q!r} is outside the allowed range [0, 1]")
    if c is not None and not (c > 0.0 and math.isfinite(c)):
        raise ValueError(f"c={c!r} is not allowed: {SELECTION_ALLOWED['c']}")
    if eps is not None and not (eps >= 0.0 and math.isfinite(eps)):
        raise ValueError(f"eps={eps!r} is not allowed: {SELECTION_ALLOWED['eps']}")


def _check_inputs(
    m_mat: Tensor,
    u_l: Tensor | None,
    u_r: Tensor | None,
    lam_l: Tensor,
    lam_r: Tensor,
    rho: float,
    q: float,
    c: float,
    eps: float,
    backend: str,
) -> None:
    for name, t in (("M", m_mat), ("U_L", u_l), ("U_R", u_r), ("lam_L", lam_l), ("lam_R", lam_r)):
        if t is not None or name in ("M", "lam_L", "lam_R"):
            check_floating_tensor(name, t)
    for name, value in (("rho", rho), ("q", q), ("c", c), ("eps", eps)):
        if value is None:  # check_selection lets None through (a preset), kron_precondition may not
            raise wrong_type(name, value, SELECTION_ALLOWED[name])
    if m_mat.ndim != 2:
        raise ValueError(f"M must be a matrix (m, n), got shape {tuple(m_mat.shape)}")
    m, n = m_mat.shape
    if lam_l.shape != (m,) or lam_r.shape != (n,):
        raise ValueError(
            f"lam_L and lam_R must have shapes ({m},) and ({n},) for M of shape {(m, n)}, "
            f"got {tuple(lam_l.shape)} and {tuple(lam_r.shape)}"
        )
    for name, u, d in (("U_L", u_l, m), ("U_R", u_r, n)):
        if u is not None and u.shape != (d, d):
            raise ValueError(f"{name} must have shape ({d}, {d}) or be None, got {tuple(u.shape)}")
    check_selection(rho, q, c, eps)
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
    for name, lam in (("lam_L", lam_l), ("lam_R", lam_r)):
        bad = ~torch.isfinite(lam) | (lam < 0) | ((lam == 0) & (eps == 0.0))
        if bool(bad.any()):
            value = lam[bad][0].item()
            allowed = "finite and >= 0" if eps > 0 else "finite and > 0 (eps=0)"
            raise ValueError(f"{name} has the entry {value!r}; eigenvalues must be {allowed}")


def kron_precondition(
    M: Tensor,
    U_L: Tensor | None,
    U_R: Tensor | None,
    lam_L: Tensor,
    lam_R: Tensor,
    rho: float,
    q: float,
    c: float,
    eps: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """Algorithm 2 on one block: ``U_L ((U_L^T M U_R) * W) U_R^T``.

    ``U_L``/``U_R`` may be ``None`` (identity: ``M`` is already in the eigenbasis).
    ``backend`` is ``auto``, ``torch`` or ``triton`` (see :mod:`bregtop_dist.core.dispatch`).
    Returns a tensor of M's shape and dtype (empty when m or n is 0).
    """
    _check_inputs(M, U_L, U_R, lam_L, lam_R, rho, q, c, eps, backend)
    if M.numel() == 0:  # m == 0 or n == 0: no entry to scale (and no top set to select)
        return torch.empty_like(M)
    dtype = _compute_dtype(M, lam_L, lam_R)
    mt = M.to(dtype)
    if U_L is not None:
        mt = U_L.to(dtype).mT @ mt
    if U_R is not None:
        mt = mt @ U_R.to(dtype)
    out = precondition_rotated(mt[None], lam_L[None], lam_R[None], rho, q, c, eps, backend)[0]
    if U_L is not None:
        out = U_L.to(dtype) @ out
    if U_R is not None:
        out = out @ U_R.to(dtype).mT
    return out.to(M.dtype)
