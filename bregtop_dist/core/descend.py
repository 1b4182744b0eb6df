"""``p <- p * (1 - lr * wd) - lr * u``: the last arithmetic of every step, one function for every path.

The one-process path updates whole parameters through strided views, the exchange paths
(DDP, FSDP2, ZeRO) update the pieces each rank holds, and the AdamW side its own tensors.
They all end here, so the same kernel forms every new value, and a parameter steps bit for bit
alike whatever the world size or engine (tests/test_reproducibility.py,
tests/dist_scenarios.py ``random_models_equal_single``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def descend_(values: Sequence[Tensor], updates: Sequence[Tensor], lr: float) -> None:
    """``value -= lr * update`` for each pair, in place, as foreach operations.

    Float32 values take one foreach add. Values of a narrower dtype (bf16 or fp16
    parameters) are formed in float32 and rounded once: torch's CPU add with ``alpha`` on
    bf16 rounds ``alpha * update`` to bf16 first in tensors shorter than one vector register
    and not in longer ones, so a parameter cut into pieces of other lengths (FSDP2, HSDP)
    would step differently from the whole one (by one bf16 ulp in about 3 % of the entries)."""
    if not values:
        return
    wide = [(v, u) for v, u in zip(values, updates) if v.dtype == torch.float32]
    narrow = [(v, u) for v, u in zip(values, updates) if v.dtype != torch.float32]
    if wide:
        torch._foreach_add_([v for v, _ in wide], [u.float() for _, u in wide], alpha=-lr)
    if narrow:
        steps = torch._foreach_mul([u.float() for _, u in narrow], -lr)
        torch._foreach_add_(steps, [v.float() for v, _ in narrow])
        torch._foreach_copy_([v for v, _ in narrow], steps)


def apply_update(
    pieces: Sequence[Tensor], values: Sequence[Tensor], updates: Sequence[Tensor], lr: float, weight_decay: float,
) -> None:
    """Every parameter update of a param group, both sides, in one place:
    ``p <- p * (1 - lr * weight_decay)`` on the ``pieces`` that stepped (decoupled decay),
    then ``value <- value - lr * update`` for each (view of a piece, update) pair."""
    if weight_decay and pieces:
        torch._foreach_mul_(list(pieces), 1.0 - lr * weight_decay)
    descend_(values, updates, lr)
