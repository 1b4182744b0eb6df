"""Eigenbases of the Kronecker factors: the first one by ``eigh``, later ones by one
warm-started QR power iteration. A failed factorisation is retried in float64; where that
fails too the block keeps its previous basis (the caller warns).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from bregtop_dist.core.dispatch import accelerator_paths


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


def orthonormal_factor(a: Tensor) -> Tensor:
    """Q of the Householder QR of ``a`` (batched), without forming R."""
    def q_of(x: Tensor) -> tuple[Tensor]:
        return (torch.linalg.householder_product(*torch.geqrf(x)),)

    return per_matrix(q_of, a)[0]


def power_qr(factor: Tensor, basis: Tensor) -> tuple[Tensor, Tensor]:
    """``qr(factor @ basis).Q`` per block, retried in float64; where both fail, the old basis.

    Returns (new basis, failed) with failed a (B,) bool. On the accelerator paths there is
    one float32 attempt and no retry: deciding to retry would read the device, and on finite
    factors the attempt only fails where the product overflows (the step's finiteness check
    reports such a state anyway); the flags reach the host with the step's one read.
    """
    if accelerator_paths(basis.device):
        q = orthonormal_factor(torch.bmm(factor, basis))
        good = torch.isfinite(q).all((-2, -1))
        return torch.where(good[:, None, None], q, basis), ~good
    new = basis.clone()
    todo = torch.ones(basis.shape[0], dtype=torch.bool, device=basis.device)
    for dtype in (basis.dtype, torch.float64):
        try:
            q = orthonormal_factor(factor.to(dtype) @ basis.to(dtype)).to(basis.dtype)
        except RuntimeError:
            continue
        good = todo & torch.isfinite(q).all((-2, -1))
        new = torch.where(good[:, None, None], q, new)
        todo = todo & ~good
        if not bool(todo.any()):
            break
    return new, todo
