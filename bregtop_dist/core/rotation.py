"""Products with the eigenbases, at the precision a group asks for.

Rotating the gradient into the Kronecker eigenbasis and the update back out are most of a
step's arithmetic (four block products per step). On GPUs they can run on tensor cores: TF32
(float32 storage, 10-bit mantissa products, float32 accumulation) or bfloat16 (8-bit mantissa
operands and result). The state, the factors' accumulation, the eigenbases and the selection
stay float32 whatever the setting; ``fp32`` keeps every product exact float32.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

ROTATION_PRECISIONS = ("fp32", "tf32", "bf16")


@contextmanager
def _tf32_products() -> Iterator[None]:
    """CUDA float32 matmuls on TF32 tensor cores within the block, the setting restored after."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def rotate(a: Tensor, b: Tensor, precision: str = "fp32") -> Tensor:
    """``a @ b`` for two stacks (B, ., .) of float32 matrices, float32 out, at ``precision``:
    ``fp32`` exact float32; ``tf32`` TF32 tensor cores on CUDA (plain float32 elsewhere: CPUs
    have no TF32); ``bf16`` bfloat16 operands and product, on any device."""
    if precision == "bf16":
        return torch.bmm(a.to(torch.bfloat16), b.to(torch.bfloat16)).to(torch.float32)
    if precision == "tf32" and a.is_cuda:
        with _tf32_products():
            return torch.bmm(a, b)
    return torch.bmm(a, b)
