"""Stand-ins for the Triton kernels when launches are counted on a machine without a GPU.

Triton's interpreter takes seconds per launch, too slow to count a training step. A stand-in
replaces a kernel (the ``@triton.jit`` function, not its Python wrapper, whose own torch ops
are counted as they are) and writes the kernel's outputs with the kernel's torch reference,
uncounted: on a GPU the launch is one kernel. The kernels themselves are tested against the
same references (tests/test_triton_*.py).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from bregtop_dist.core.precondition import TopSet, apply_top_set
from bregtop_dist.core.selection import kth_largest_product


def _top_set(a, b_asc, ranks, values, m, n, **_: Any) -> None:
    bsz = a.shape[0]
    a_desc = torch.sort(a, dim=-1, descending=True).values
    values.copy_(kth_largest_product(a_desc, b_asc, ranks.expand(bsz, 3).contiguous(), fixed_passes=False))


def _masked_scale(mt, out, lam_l, lam_r, thr, chi, m, n, eps, band, *_: Any, EPS_ZERO, POWER_ONE, **__: Any) -> None:
    bsz = lam_l.shape[0]
    view = torch.as_strided(mt, (bsz, m, n), (mt.stride(0), mt.stride(1), 1))
    res = apply_top_set(view.float(), lam_l, lam_r, TopSet(threshold=thr, chi=chi), 0.0 if EPS_ZERO else eps,
                        1.0 if POWER_ONE else 0.5, band)
    out.copy_(res.to(out.dtype))


def _rotated_stats(gt, mt, wl, wr, row_part, col_part, m, n, weight, tiles_m, tiles_n, *, WL_VECTOR,
                   WR_VECTOR, UPDATE_MOMENTUM, **_: Any) -> None:
    sq = gt * gt
    row_part.zero_()
    col_part.zero_()
    row_part[:, 0] = (sq * (wl[:, None, :] if WL_VECTOR else wl[:, :, None])).sum(-1)
    col_part[:, 0] = (sq * (wr[:, :, None] if WR_VECTOR else wr[:, :, None])).sum(-2)
    if UPDATE_MOMENTUM:
        mt.lerp_(gt, weight)


class _StandIn:
    """Looks like a JIT function to ``kernel[grid](...)``; counts the launch."""

    def __init__(self, reference: Callable[..., None], on_launch: Callable[[Callable[[], None]], None]) -> None:
        self.reference = reference
        self.on_launch = on_launch

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            self.on_launch(lambda: self.reference(*args, **kwargs))

        return launch


@contextmanager
def stand_in_kernels(on_launch: Callable[[Callable[[], None]], None]) -> Iterator[None]:
    """Replace the three kernels; ``on_launch(run)`` is called per launch and must call ``run``
    (with counting paused)."""
    import triton_kernels.masked_scale as ms
    import triton_kernels.rotated_stats as rs
    import triton_kernels.top_set as ts

    swaps = [(ts, "_top_set_kernel", _top_set), (ms, "_masked_scale_kernel", _masked_scale),
             (rs, "_rotated_stats_kernel", _rotated_stats)]
    originals = [(module, name, getattr(module, name)) for module, name, _ in swaps]
    try:
        for module, name, reference in swaps:
            setattr(module, name, _StandIn(reference, on_launch))
        yield
    finally:
        for module, name, original in originals:
            setattr(module, name, original)
