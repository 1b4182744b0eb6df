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
    """``value -= lr * update`` for each pair, in place, as one foreach add; an update of
    another dtype (fp32 updates of bf16 parameters) is rounded to the value's first."""
    if not values:
        return
    torch._foreach_add_(list(values), [u if u.dtype == v.dtype else u.to(v.dtype) for u, v in zip(updates, values)],
                        alpha=-lr)


def apply_update(
    pieces: Sequence[Tensor], values: Sequence[Tensor], updates: Sequence[Tensor], lr: float, weight_decay: float,
) -> None:
    """Every parameter update of a param group, both sides, in one place:
    ``p <- p * (1 - lr * weight_decay)`` on the ``pieces`` that stepped (decoupled decay),
    then ``value <- value - lr * update`` for each (view of a piece, update) pair."""
    if weight_decay and pieces:
        torch._foreach_mul_(list(pieces), 1.0 - lr * weight_decay)
    descend_(values, updates, lr)
