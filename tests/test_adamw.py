"""The AdamW side's grouped (foreach) step against AdamW written out in float64."""

from __future__ import annotations

import pytest
import torch

from bregtop_dist.adamw import adamw_group_step


def _adamw_ref(p, grads, lr, b1, b2, eps, wd):
    """Loshchilov & Hutter's AdamW with torch's bias correction, in float64."""
    p = p.double()
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        p = p * (1 - lr * wd) - lr * (m / (1 - b1**t)) / (v.sqrt() / (1 - b2**t) ** 0.5 + eps)
    return p


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_group_step_equals_adamw_in_float64(gen, weight_decay):
    """Tensors of several shapes, dtypes and gradient scales; one tensor without a gradient on
    one step (it is left out of that step, as the optimizer leaves it out)."""
    shapes = [(7,), (3, 5), (1,), (4, 2, 3)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    scales = [10 ** float(torch.randint(-8, 8, (), generator=gen)) for _ in shapes]
    grads = [[torch.randn(s, generator=gen) * c for s, c in zip(shapes, scales)] for _ in range(6)]
    lr, (b1, b2), eps = 0.01, (0.8, 0.99), 1e-6
    params = [p.clone() for p in start]
    states: list[dict] = [{} for _ in start]
    for k, step in enumerate(grads):
        live = [i for i in range(len(start)) if k != 2 or i != 1]
        adamw_group_step([params[i] for i in live], [step[i] for i in live], [states[i] for i in live],
                         lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay)
    for i, p in enumerate(params):
        seen = [g[i] for k, g in enumerate(grads) if k != 2 or i != 1]
        want = _adamw_ref(start[i], seen, lr, b1, b2, eps, weight_decay)
        assert torch.allclose(p.double(), want, rtol=1e-5, atol=1e-7 * float(want.abs().max())), i
        assert float(states[i]["step"]) == len(seen)


def test_bf16_tensors_keep_fp32_state(gen):
    p = torch.randn(9, generator=gen).to(torch.bfloat16)
    state: dict = {}
    adamw_group_step([p], [torch.randn(9, generator=gen).to(torch.bfloat16)], [state],
                     lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    assert p.dtype == torch.bfloat16 and state["exp_avg"].dtype == torch.float32
