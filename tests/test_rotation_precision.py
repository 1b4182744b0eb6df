"""``rotation_precision``: the products with the eigenbases in fp32, tf32 or bf16.

fp32 is exact float32 (``torch.bmm``); tf32 is float32 wherever there are no TF32 tensor
cores (every CPU); bf16 rounds operands and product to bfloat16, checked against a float64
product of the rounded operands. A step at bf16 stays finite and close to the fp32 step, and
bad values are refused, naming the setting.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bregtop_dist import BregTop
from bregtop_dist.core.rotation import ROTATION_PRECISIONS, rotate
from launch.bench.precision import round_to_tf32


def test_fp32_and_cpu_tf32_are_plain_float32_products(gen):
    a, b = torch.randn(3, 5, 7, generator=gen), torch.randn(3, 7, 4, generator=gen)
    assert torch.equal(rotate(a, b, "fp32"), torch.bmm(a, b))
    assert torch.equal(rotate(a, b, "tf32"), torch.bmm(a, b))


def test_bf16_rounds_operands_and_product(gen):
    a, b = torch.randn(3, 16, 9, generator=gen), torch.randn(3, 9, 12, generator=gen)
    got = rotate(a, b, "bf16")
    assert got.dtype == torch.float32
    exact = torch.bmm(a.bfloat16().double(), b.bfloat16().double())
    err = (got.double() - exact).abs() / exact.abs().clamp_min(1e-3)
    assert float(err.max()) <= 2.0**-8  # one bfloat16 rounding of the result
    assert float((got.double() - torch.bmm(a.double(), b.double())).norm() / exact.norm()) < 2e-2


def test_tf32_emulation_keeps_ten_mantissa_bits(gen):
    x = torch.randn(1000, generator=gen) * torch.exp(8 * torch.randn(1000, generator=gen))
    r = round_to_tf32(x)
    assert bool(((r.view(torch.int32) & 0x1FFF) == 0).all())
    assert float(((r - x).abs() / x.abs()).max()) <= 2.0**-11


@pytest.mark.parametrize("precision", ROTATION_PRECISIONS[1:])
def test_a_step_at_lower_precision_is_finite_and_close(gen, precision):
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    runs = []
    for prec in ("fp32", precision):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(24, 40), nn.Tanh(), nn.Linear(40, 8))
        opt = BregTop(model.parameters(), method="kl", lr=1e-2, rotation_precision=prec)
        x, y = torch.randn(64, 24), torch.randn(64, 8)
        for _ in range(12):  # past a refresh: the bases are no longer the identity
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        runs.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    assert bool(torch.isfinite(runs[1]).all())
    rel = float((runs[1] - runs[0]).norm() / runs[0].norm())
    assert rel < (1e-6 if precision == "tf32" else 5e-2)  # tf32 is fp32 on the CPU


@pytest.mark.parametrize("value,error,message", [
    ("fp16", ValueError, "rotation_precision='fp16' is unknown; allowed: fp32, tf32, bf16"),
    (32, TypeError, "rotation_precision=32 is not allowed: rotation_precision must be one of fp32, tf32, bf16"),
])
def test_bad_rotation_precision_is_refused(value, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        BregTop([nn.Parameter(torch.randn(3, 3))], rotation_precision=value)
