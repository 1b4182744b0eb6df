"""The AdamW side of BregTop: embeddings, biases, norms, the head and every 1-D tensor.

Elementwise and communication-free; state is float32 whatever the parameter dtype. A group's
tensors step together through ``torch._foreach_*``: a few launches per group instead of a
dozen per tensor.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from bregtop_dist.core.descend import apply_update


def init_adamw_state(state: dict[str, Any], param: Tensor) -> None:
    """The state of a parameter that has not stepped: step 0 and zero moments (its first step
    is then exactly a fresh one). Made before the first step too, so that every parameter's
    state has its keys wherever a checkpoint template is taken."""
    state["step"] = torch.zeros((), dtype=torch.float32)
    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)


_KNOWN = "_bregtop_known_step"
"""Attribute of a step counter: (its version, its value) as this module last wrote it."""


def _counted_steps(counters: list[Tensor]) -> list[float]:
    """Every counter's value after this step's increment: from what this module wrote last,
    or, where a counter was written elsewhere since (a checkpoint load), read at once."""
    known = [getattr(c, _KNOWN, None) for c in counters]
    if all(k is not None and k[0] == c._version for k, c in zip(known, counters)):
        return [k[1] + 1.0 for k in known]  # type: ignore[index]
    if all(c.device.type == "cpu" for c in counters):
        return [v + 1.0 for v in torch.stack(counters).tolist()]  # the CPU step counters, read at once
    return [float(c) + 1.0 for c in counters]  # a counter a caller put on a device


def adamw_updates(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    betas: tuple[float, float],
    eps: float,
) -> list[Tensor]:
    """The bias-corrected AdamW update of every tensor of a group, as torch.optim.AdamW forms
    it, advancing the moments and step counters in ``states`` (the parameters are read only
    to make a missing state)."""
    if not params:
        return []
    for state, param in zip(states, params):
        if not state:
            init_adamw_state(state, param)
    b1, b2 = betas
    counters = [state["step"] for state in states]
    steps = _counted_steps(counters)
    torch._foreach_add_(counters, 1.0)
    for c, k in zip(counters, steps):
        setattr(c, _KNOWN, (c._version, k))
    g32 = [g.float() for g in grads]
    exp_avg = [state["exp_avg"] for state in states]
    exp_avg_sq = [state["exp_avg_sq"] for state in states]
    torch._foreach_lerp_(exp_avg, g32, 1.0 - b1)
    torch._foreach_mul_(exp_avg_sq, b2)
    torch._foreach_addcmul_(exp_avg_sq, g32, g32, value=1.0 - b2)
    denom = torch._foreach_sqrt(exp_avg_sq)
    torch._foreach_div_(denom, [math.sqrt(1.0 - b2**k) for k in steps])
    torch._foreach_add_(denom, eps)
    update = torch._foreach_div(exp_avg, denom)
    torch._foreach_div_(update, [1.0 - b1**k for k in steps])
    return list(update)


def adamw_group_step(
    params: list[Tensor],
    grads: list[Tensor],
    states: list[dict[str, Any]],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One AdamW step, with decoupled weight decay, of every tensor of a group (in place):
    :func:`adamw_updates` applied by :func:`~bregtop_dist.core.descend.apply_update`."""
    apply_update(params, params, adamw_updates(params, grads, states, betas=betas, eps=eps), lr, weight_decay)
