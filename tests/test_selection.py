"""The sort-free order statistics of S = a b^T against sorting the materialised S."""

from __future__ import annotations

import pytest
import torch

from bregtop_dist.core.selection import count_at_least, kth_largest_product

SHAPES = [(1, 1), (1, 9), (9, 1), (7, 3), (33, 65), (64, 17)]


def _vectors(gen, m, n, dtype, kind):
    if kind == "ties":  # few distinct values: many exactly equal products
        a = torch.randint(1, 4, (2, m), generator=gen).to(dtype)
        b = torch.randint(1, 4, (2, n), generator=gen).to(dtype)
    else:  # wide dynamic range, as eigenvalue spectra have
        a = torch.exp(6 * torch.randn(2, m, generator=gen, dtype=dtype))
        b = torch.exp(6 * torch.randn(2, n, generator=gen, dtype=dtype))
    return a.sort(-1, descending=True).values, b.sort(-1).values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["spread", "ties"])
def test_kth_largest_equals_sorted_materialised(gen, dtype, shape, kind):
    m, n = shape
    a, b = _vectors(gen, m, n, dtype, kind)
    S = (a[:, :, None] * b[:, None, :]).reshape(2, -1)  # products rounded in dtype
    ranks = torch.randint(0, m * n, (2, 6), generator=gen)
    ranks[:, 0], ranks[:, 1] = 0, m * n - 1
    expected = torch.gather(S.sort(-1, descending=True).values, 1, ranks)
    assert torch.equal(kth_largest_product(a, b, ranks), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_count_at_least_equals_materialised_count(gen, dtype):
    a, b = _vectors(gen, 13, 29, dtype, "spread")
    S = (a[:, :, None] * b[:, None, :]).reshape(2, -1)
    t = S[:, torch.randint(0, S.shape[1], (5,), generator=gen)]
    expected = (S[:, None, :] >= t[:, :, None]).sum(-1)
    assert torch.equal(count_at_least(a, b, t), expected)


def test_zero_entries_are_counted():
    a = torch.tensor([[2.0, 0.0]])
    b = torch.tensor([[0.0, 3.0]])
    ranks = torch.tensor([[0, 1, 2, 3]])
    assert kth_largest_product(a, b, ranks).tolist() == [[6.0, 0.0, 0.0, 0.0]]


def test_rejects_half_precision():
    a = torch.ones(1, 2, dtype=torch.float16)
    with pytest.raises(TypeError, match="float32 or float64, got torch.float16"):
        kth_largest_product(a, a, torch.zeros(1, 1, dtype=torch.int64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("ways", [2, 4, 16])
def test_fixed_pass_search_equals_early_exit(gen, dtype, ways):
    """The sync-free schedule (what non-CPU devices run) finds the same entries."""
    a, b = _vectors(gen, 17, 40, dtype, "spread")
    ranks = torch.randint(0, 17 * 40, (2, 5), generator=gen)
    fixed = kth_largest_product(a, b, ranks, ways=ways, fixed_passes=True)
    assert torch.equal(fixed, kth_largest_product(a, b, ranks, ways=ways, fixed_passes=False))
    S = (a[:, :, None] * b[:, None, :]).reshape(2, -1)
    assert torch.equal(fixed, torch.gather(S.sort(-1, descending=True).values, 1, ranks))
