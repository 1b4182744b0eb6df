"""Eigenbases of the Kronecker factors: the first one by ``eigh``, later ones by one
warm-started QR power iteration. A failed factorisation is retried in float64; where that
fails too the block keeps its previous basis (the caller warns).

Both choose a basis that is a continuous function of the factor (and of the previous basis),
so that a rounding difference in a factor makes a rounding-sized difference in the basis.
A factor that is rank-deficient (early in training, a 1 x n block's n x n factor, a batch
smaller than a side) leaves its null space's basis undetermined: a plain ``qr(L U)`` fills
it with orthogonalised rounding noise, and ``eigh`` with whatever its algorithm meets first.
Since the eigenvalue estimates then accumulate in that basis, a one-ulp change of a gradient
used to change the run by a relative 1e-4..1e-2 within a few steps. Here:

- the refresh is the power iteration of the shifted factor ``L + delta I`` (the same
  eigenvectors, the same fixed point), ``delta = REFRESH_SHIFT * max|L|``: directions far below
  delta keep their previous basis vectors instead of taking noise, and directions far above it
  converge as before;
- the first basis keeps the factor's eigenvectors, and resolves its null space (the
  eigenvalues rounding cannot tell from zero) towards the coordinate axes in their order
  (:func:`tie_broken_eigh`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bregtop_dist.core.dispatch import accelerator_paths

REFRESH_SHIFT = 1e-3
"""The refresh's shift ``delta``, relative to the factor's largest entry (module docstring)."""
NULL_LEVEL = 1e-5
"""Eigenvalues of a first factor at most this fraction of its largest entry form its null
space (about 100 float32 ulps: rounding noise of a zero eigenvalue)."""
NULL_TIE_BREAK = 0.1
"""The first basis' tie-breaking ``delta`` in the null space, relative to the factor's largest entry."""


def per_matrix(fn: Callable[[Tensor], tuple[Tensor, ...]], a: Tensor) -> tuple[Tensor, ...]:
    """``fn`` on a batch of matrices; on the CPU path one matrix at a time.

    LAPACK's results depend on where a matrix sits in memory, so a batched call gives a block
    a basis that depends on which other blocks share its stack. One call per matrix makes a
    block's basis a function of the block alone: a rank that owns a subset of the blocks then
    computes exactly what the single-process run computes. The results are row-major
    (contiguous) whatever the batch size: LAPACK hands back column-major matrices, and a
    product with a column-major operand takes another BLAS path and rounds differently, so a
    lone refreshing block (a batch of one) would otherwise differ from the same block refreshed
    beside others.
    """
    if accelerator_paths(a.device):
        return fn(a)
    if a.shape[0] <= 1:
        return tuple(t.contiguous() for t in fn(a))
    parts = [fn(a[k : k + 1]) for k in range(a.shape[0])]
    return tuple(torch.cat(column) for column in zip(*parts))


def eigh_descending(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(eigenvalues desc, eigenvectors, failed) of symmetric a (B, d, d), retried in float64.

    Where both attempts fail the block keeps the identity basis and its diagonal.
    """
    vals = torch.diagonal(a, dim1=-2, dim2=-1).clone()
    vecs = torch.eye(a.shape[-1], dtype=a.dtype, device=a.device).expand_as(a).clone()
    todo = torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
    for dtype in (a.dtype, torch.float64):
        try:
            v, u = per_matrix(torch.linalg.eigh, a.to(dtype))
        except RuntimeError:
            continue
        good = todo & torch.isfinite(v).all(-1) & torch.isfinite(u).all((-2, -1))
        vals = torch.where(good[:, None], v.flip(-1).to(a.dtype), vals)
        vecs = torch.where(good[:, None, None], u.flip(-1).to(a.dtype), vecs)
        todo = todo & ~good
        if not bool(todo.any()):
            break
    return vals, vecs, todo


def tie_broken_eigh(a: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(eigenvalues desc, eigenvectors, failed) of symmetric a (B, d, d) whose null space (the
    eigenvalues at most ``NULL_LEVEL`` times its largest entry, which rounding cannot tell
    from zero) gets a basis chosen by value: the eigenvectors of ``a - delta P T P``, P the
    null space's projector, ``T = diag(1, ..., 2)`` (equally spaced), ``delta =
    NULL_TIE_BREAK * max|a|``. The rest of the spectrum keeps its eigenvectors (up to
    rounding); the eigenvalues are the Rayleigh quotients ``diag(U^T a U)`` of ``a`` itself."""
    d = a.shape[-1]
    ramp = torch.linspace(1.0, 2.0, d, dtype=a.dtype, device=a.device) if d > 1 else a.new_ones(1)
    norm = a.abs().amax((-2, -1))[:, None]
    vals, vecs, failed = eigh_descending(a)
    null = (vals <= NULL_LEVEL * norm).to(a.dtype)
    proj = torch.bmm(vecs * null[:, None, :], vecs.mT)
    tie = torch.bmm(proj, ramp[:, None] * proj)
    _, vecs, failed_tie = eigh_descending(a - (NULL_TIE_BREAK * norm)[:, :, None] * tie)
    vals = (vecs * torch.bmm(a, vecs)).sum(-2)
    return vals, vecs, failed | failed_tie


def orthonormal_factor(a: Tensor) -> Tensor:
    """Q of the Householder QR of ``a`` (batched), without forming R."""
    def q_of(x: Tensor) -> tuple[Tensor]:
        return (torch.linalg.householder_product(*torch.geqrf(x)),)

    return per_matrix(q_of, a)[0]


def _shifted_product(factor: Tensor, basis: Tensor) -> Tensor:
    """``(factor + delta I) @ basis``, ``delta = REFRESH_SHIFT * max|factor|`` per block."""
    delta = REFRESH_SHIFT * factor.abs().amax((-2, -1), keepdim=True)
    return torch.baddbmm(basis * delta, factor, basis)


def power_qr(factor: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """``qr((factor + delta I) @ basis).Q`` per block (see the module docstring for delta),
    retried in float64; where both fail, the old basis.

    Returns (new basis, failed) with failed a (B,) bool. On the accelerator paths there is
    one float32 attempt and no retry: deciding to retry would read the device, and on finite
    factors the attempt only fails where the product overflows (the step's finiteness check
    reports such a state anyway); the flags reach the host with the step's one read.
    """
    if accelerator_paths(basis.device):
        q = orthonormal_factor(_shifted_product(factor, basis))
        good = torch.isfinite(q).all((-2, -1))
        return torch.where(good[:, None, None], q, basis), ~good
    new = basis.clone()
    todo = torch.ones(basis.shape[0], dtype=torch.bool, device=basis.device)
    for dtype in (basis.dtype, torch.float64):
        try:
            q = orthonormal_factor(_shifted_product(factor.to(dtype), basis.to(dtype))).to(basis.dtype)
        except RuntimeError:
            continue
        good = todo & torch.isfinite(q).all((-2, -1))
        new = torch.where(good[:, None, None], q, new)
        todo = todo & ~good
        if not bool(todo.any()):
            break
    return new, todo
