"""The one-launch selection kernel against the torch search it replaces on accelerators.

Both find exact order statistics of the float32 products, so the kernel must agree with
``select_top_set`` bit for bit: threshold and chi. Inputs include spectra with many ties
(small integers) and one-row and one-column blocks. On a GPU machine the kernel runs compiled; elsewhere in Triton's
interpreter (slow: a few seconds per launch, so few cases).
"""

from __future__ import annotations

import pytest
import torch

from bregtop_dist.core.precondition import select_top_set, spectrum_root

pytest.importorskip("triton")

CASES = [
    ((3, 7, 5), 0.06, "spread"),
    ((2, 48, 64), 0.06, "spread"),
    ((2, 48, 64), 0.06, "ties"),
    ((2, 1, 37), 0.1, "ties"),
    ((2, 29, 1), 1e-3, "spread"),
    ((1, 33, 70), 0.5, "ties"),
]


def _factors(gen, shape, kind):
    bsz, m, n = shape
    if kind == "ties":  # few distinct values: many entries of S equal the threshold
        return (torch.randint(1, 4, (bsz, m), generator=gen).float(),
                torch.randint(1, 4, (bsz, n), generator=gen).float())
    return (spectrum_root(torch.exp(4 * torch.randn(bsz, m, generator=gen))),
            spectrum_root(torch.exp(4 * torch.randn(bsz, n, generator=gen))))


@pytest.mark.parametrize("shape,rho,kind", CASES)
@pytest.mark.parametrize("power", [0.5, 1.0])
def test_kernel_selection_equals_torch_search(gen, kernel_device, shape, rho, kind, power):
    a, b = _factors(gen, shape, kind)
    want = select_top_set(a, b, rho, 0.01, 3.0, 1e-3, power)
    got = select_top_set(a.to(kernel_device), b.to(kernel_device), rho, 0.01, 3.0, 1e-3, power, kernel=True)
    assert torch.equal(got.threshold.cpu(), want.threshold)
    assert torch.equal(got.chi.cpu(), want.chi)


def test_kernel_selection_spans_the_float32_range(gen, kernel_device):
    """Root-spectrum factors from the smallest normal number to the largest float32."""
    tiny, big = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    a = spectrum_root(torch.tensor([[tiny, 1e-30, 1.0, 1e30, big] * 3]))
    b = spectrum_root(torch.tensor([[big, 1.0, tiny, 3e-7, 2e20, 5.0, 1e-38]]))
    want = select_top_set(a, b, 0.2, 0.3, 2.0, 0.0, 1.0)
    got = select_top_set(a.to(kernel_device), b.to(kernel_device), 0.2, 0.3, 2.0, 0.0, 1.0, kernel=True)
    assert torch.equal(got.threshold.cpu(), want.threshold)
    assert torch.equal(got.chi.cpu(), want.chi) and bool(torch.isfinite(got.chi).all())


def test_every_entry_in_the_top_set_launches_nothing(kernel_device):
    a = torch.ones(2, 3, device=kernel_device)
    got = select_top_set(a, a, 1.0, 0.01, 3.0, kernel=True)
    assert bool(torch.isinf(got.threshold).all()) and got.chi.tolist() == [0.0, 0.0]
