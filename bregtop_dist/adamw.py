"""The AdamW side of BregTop: embeddings, biases, norms, the head and every 1-D tensor.

Elementwise and communication-free; state is float32 whatever the parameter dtype.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def init_adamw_state(state: dict[str, Any], param: Tensor) -> None:
    """The state of a parameter that has not stepped: step 0 and zero moments (its first step
    is then exactly a fresh one). Made before the first step too, so that every parameter's
    state has its keys wherever a checkpoint template is taken."""
    state["step"] = torch.zeros((), dtype=torch.float32)
    state["exp_avg"] = torch.zeros_like(param, dtype=torch.float32)
    state["exp_avg_sq"] = torch.zeros_like(param, dtype=torch.float32)


def adamw_step(
    param: Tensor,
    grad: Tensor,
    state: dict[str, Any],
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
    weight_decay: float,
) -> None:
    """One bias-corrected AdamW step of ``param`` (in place), with decoupled weight decay."""
    if not state:
        init_adamw_state(state, param)
    b1, b2 = betas
    state["step"] += 1
    step = float(state["step"])
    g = grad.float()
    state["exp_avg"].lerp_(g, 1.0 - b1)
    state["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1.0 - b2)
    denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1.0 - b2**step)).add_(eps)
    update = state["exp_avg"] / denom / (1.0 - b1**step)
    if weight_decay:
        param.mul_(1.0 - lr * weight_decay)
    param.add_(update.to(param.dtype), alpha=-lr)
