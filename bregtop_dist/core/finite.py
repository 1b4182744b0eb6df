"""Per-block finiteness, checked on every step, so it has to be cheap.

``torch.isfinite(t).all()`` materialises a bool tensor the size of ``t`` through three
elementwise passes; on the Kronecker factors that costs about as much as the factors' update.
The largest and the smallest entry answer the same question exactly (max/min reductions
propagate NaN, and an inf is its own extreme) in two reductions that allocate nothing.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bregtop_dist.core.dispatch import accelerator_paths


def finite_rows(t: Tensor) -> Tensor:
    """(B,) bool on ``t``'s device: row ``b`` of ``t`` (B, ...) holds no NaN and no inf."""
    if t.numel() == 0:
        return torch.ones(t.shape[0], dtype=torch.bool, device=t.device)
    flat = t.flatten(1)
    return torch.isfinite(flat.amax(1)) & torch.isfinite(flat.amin(1))


def nonzero_rows(t: Tensor) -> Tensor:
    """(B,) bool on ``t``'s device: row ``b`` of ``t`` (B, ...) has an entry that is not 0.

    NaN counts as non-zero (the step's finiteness checks then report it)."""
    if t.numel() == 0:
        return torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
    flat = t.flatten(1)
    return (flat.amax(1) != 0) | (flat.amin(1) != 0)


def largest_magnitudes(tensors: list[Tensor]) -> Tensor:
    """(len(tensors),) float32 on their device: ``max |x|`` of each (NaN where one holds NaN,
    inf where one holds +-inf), read nowhere. One foreach reduction on the accelerator paths;
    on the CPU path each tensor's min and max (``_foreach_norm(inf)`` is an order of magnitude
    slower there). Every tensor must have elements."""
    if accelerator_paths(tensors[0].device):
        if all(t.dtype != torch.float64 for t in tensors):  # float32 accumulation is exact for a max
            return torch.stack(torch._foreach_norm(tensors, float("inf"), dtype=torch.float32))  # type: ignore[arg-type]
        return torch.stack([n.float() for n in torch._foreach_norm(tensors, float("inf"))])  # no float64 -> float32 arg
    parts = []
    for t in tensors:
        lo, hi = torch.aminmax(t)
        parts.append(torch.maximum(hi.float(), -lo.float()))
    return torch.stack(parts)
