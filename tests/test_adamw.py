"""The AdamW side's grouped (foreach) step against the per-tensor definition and torch's AdamW."""

from __future__ import annotations

import pytest
import torch

from bregtop_dist.adamw import adamw_group_step, adamw_step


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_group_step_equals_the_per_tensor_step(gen, weight_decay):
    shapes = [(7,), (3, 5), (1,), (4, 2, 3)]
    dtypes = [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    start = [torch.randn(s, generator=gen).to(d) for s, d in zip(shapes, dtypes)]
    grads = [[torch.randn(s, generator=gen).to(d) * 10 ** float(torch.randint(-8, 8, (), generator=gen))
              for s, d in zip(shapes, dtypes)] for _ in range(5)]
    kw = dict(lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    one = [p.clone() for p in start]
    group = [p.clone() for p in start]
    states_one: list[dict] = [{} for _ in start]
    states_group: list[dict] = [{} for _ in start]
    for k, step in enumerate(grads):
        live = [i for i in range(len(start)) if k != 2 or i != 1]  # tensor 1 has no gradient on step 2
        for i in live:
            adamw_step(one[i], step[i], states_one[i], **kw)
        adamw_group_step([group[i] for i in live], [step[i] for i in live], [states_group[i] for i in live], **kw)
    for a, b in zip(one, group):
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7)
    for sa, sb in zip(states_one, states_group):
        assert float(sa["step"]) == float(sb["step"])
        assert torch.allclose(sa["exp_avg"], sb["exp_avg"], rtol=1e-6, atol=0)
