"""The fused eigenvalue-statistics kernel against torch: compiled on a GPU machine, in Triton's
interpreter on the CPU elsewhere (inputs drawn on the CPU and moved to ``kernel_device``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")
from triton_kernels.rotated_stats import rotated_stats  # noqa: E402

SHAPES = [(2, 1, 37), (2, 29, 1), (3, 7, 3), (1, 129, 65), (2, 33, 70)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("vector_weights", [False, True])
def test_sums_and_momentum_equal_torch(gen, kernel_device, shape, vector_weights):
    bsz, m, n = shape
    gt = torch.randn(bsz, m, n, generator=gen)
    momentum = torch.randn(bsz, m, n, generator=gen)
    if vector_weights:  # kl / f-v2
        w_l, w_r = torch.rand(bsz, n, generator=gen) + 0.1, torch.rand(bsz, m, generator=gen) + 0.1
    else:  # shampoo / vn
        w_l, w_r = torch.rand(bsz, 1, generator=gen) + 0.1, torch.rand(bsz, 1, generator=gen) + 0.1
    expected_momentum = momentum.clone().lerp_(gt, 0.1)
    on_device = momentum.to(kernel_device)
    got_l, got_r = rotated_stats(*(t.to(kernel_device) for t in (gt, w_l, w_r)), on_device, beta1=0.9)
    got_l, got_r, momentum = got_l.cpu(), got_r.cpu(), on_device.cpu()

    sq = gt.double() ** 2
    want_l = (sq * w_l.double()[:, None, :]).sum(-1)
    want_r = (sq * w_r.double()[:, :, None]).sum(-2)
    assert not torch.isnan(got_l).any() and not torch.isnan(got_r).any()
    assert torch.allclose(got_l.double(), want_l, rtol=1e-5)
    assert torch.allclose(got_r.double(), want_r, rtol=1e-5)
    assert torch.allclose(momentum, expected_momentum, rtol=1e-6, atol=1e-7)


def test_without_momentum_nothing_else_is_written(gen, kernel_device):
    gt = torch.randn(2, 5, 4, generator=gen).to(kernel_device)
    before = gt.clone()
    ones = torch.ones(2, 1, device=kernel_device)
    rotated_stats(gt, ones, ones)
    assert torch.equal(gt, before)


def test_bad_inputs_are_named(gen):
    gt = torch.randn(2, 5, 4, generator=gen)
    with pytest.raises(ValueError, match=r"w_l must be \(B, 1\) or \(B, n\) = \(2, 4\)"):
        rotated_stats(gt, torch.ones(2, 5), torch.ones(2, 1))
    with pytest.raises(ValueError, match="gt must be a contiguous float32"):
        rotated_stats(gt.double(), torch.ones(2, 1), torch.ones(2, 1))
    with pytest.raises(ValueError, match=r"beta1=0.2 is not allowed here"):
        rotated_stats(gt, torch.ones(2, 1), torch.ones(2, 1), torch.zeros_like(gt), beta1=0.2)
