"""The step's cheap per-block checks (``core.finite``) against the elementwise definitions."""

from __future__ import annotations

import pytest
import torch

from bregtop_dist.core.finite import finite_rows, nonzero_rows

SPECIALS = (float("nan"), float("inf"), -float("inf"))


def _plant(gen: torch.Generator, shape: tuple[int, ...], values: tuple[float, ...]) -> torch.Tensor:
    """Random fp32 entries across the whole range, a few rows with one planted special value."""
    t = torch.randn(shape, generator=gen) * torch.pow(10.0, torch.randint(-38, 38, shape, generator=gen).float())
    for b in range(shape[0]):
        if torch.rand((), generator=gen) < 0.5:
            where = int(torch.randint(0, t[b].numel(), (), generator=gen))
            t[b].view(-1)[where] = values[int(torch.randint(0, len(values), (), generator=gen))]
    return t


@pytest.mark.parametrize("shape", [(9, 7, 5), (4, 1, 1), (6, 33)])
def test_finite_rows_matches_isfinite(gen, shape):
    t = _plant(gen, shape, SPECIALS)
    assert torch.equal(finite_rows(t), torch.isfinite(t).flatten(1).all(1))


@pytest.mark.parametrize("shape", [(9, 7, 5), (4, 1, 1), (6, 33)])
def test_nonzero_rows_matches_definition(gen, shape):
    t = _plant(gen, shape, SPECIALS + (0.0,))
    zero = torch.rand(shape[0], generator=gen) < 0.4
    t[zero] = 0.0
    t[zero & (torch.rand(shape[0], generator=gen) < 0.5)] = -0.0  # a negative zero is zero
    want = (t != 0).flatten(1).any(1)  # NaN != 0 is True: a NaN row counts as non-zero
    assert torch.equal(nonzero_rows(t), want)


def test_empty_blocks():
    assert finite_rows(torch.empty(3, 0, 4)).tolist() == [True] * 3
    assert nonzero_rows(torch.empty(3, 0, 4)).tolist() == [False] * 3
    assert finite_rows(torch.empty(0, 2, 2)).shape == (0,)


def test_largest_magnitudes_sees_nan_and_both_infinities(gen):
    from bregtop_dist.core.finite import largest_magnitudes

    ts = [torch.randn(4, 5, generator=gen) * 1e30, torch.randn(7, generator=gen).bfloat16(), torch.randn(3, 3, generator=gen)]
    want = torch.stack([t.double().abs().max() for t in ts]).float()
    assert torch.equal(largest_magnitudes(ts), want)
    for bad, expect in ((float("nan"), "nan"), (float("inf"), "inf"), (-float("inf"), "inf")):
        t = torch.randn(6, generator=gen)
        t[int(torch.randint(0, 6, (1,), generator=gen))] = bad
        got = float(largest_magnitudes([ts[0], t])[1])
        assert (got != got) if expect == "nan" else got == float("inf")
