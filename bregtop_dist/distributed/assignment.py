"""Which rank owns each Kronecker block, and on which step of the period it refreshes.

Both are computed identically on every rank from the block shapes alone, with no
communication. Refresh offsets come first and do not depend on the world size, so a sharded
run takes exactly the single-process run's steps; owners are then chosen so that every rank's
heaviest step (its share of the every-step work plus the refreshes due on that step) is as
light as possible.
"""

from __future__ import annotations

from dataclasses import dataclass

from bregtop_dist.core.block_step import lpt_refresh_offsets
from bregtop_dist.core.blocking import BlockSlice, block_slices, matrix_shape


def step_cost(m: int, n: int) -> float:
    """Flops of the every-step work on an m x n block: about six m x n x (m + n) products
    (rotating the gradient, the two factor EMAs, rotating the update back)."""
    return 6.0 * m * n * (m + n)


def refresh_cost(m: int, n: int) -> float:
    """Flops of one basis refresh: the power step ``L U`` and a QR on each side. An empty
    block (a zero-size parameter) never refreshes: it costs nothing, so it takes no refresh
    phase from the blocks beside it."""
    return 4.0 * (m**3 + n**3) if m * n else 0.0


@dataclass(frozen=True)
class Block:
    """One Kronecker block of a plan: the parameter it lives in (``param``, an index into the
    plan's Kronecker parameters), its ``index`` among that parameter's blocks (how a
    checkpoint names it), its slice of the parameter's 2-D view, its refresh phase and owner."""

    param: int
    index: int
    cols: int  # columns of the parameter's 2-D view
    slice: BlockSlice
    phase: int
    owner: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.slice.shape

    @property
    def numel(self) -> int:
        m, n = self.slice.shape
        return m * n


def plan_blocks(
    shapes: list[tuple[int, ...]], max_dim: int, frequency: int, stagger: bool, world: int,
    parts: tuple[int, int] = (1, 0),
) -> list[Block]:
    """The blocks of parameters with global ``shapes`` (each cut into ``parts[0]`` equal parts
    along side ``parts[1]`` first), in parameter then block-index order."""
    cut: list[tuple[int, int, int, BlockSlice]] = []
    for j, shape in enumerate(shapes):
        rows, cols = matrix_shape(shape)
        cut.extend((j, t, cols, b) for t, b in enumerate(block_slices(rows, cols, max_dim, *parts)))
    refresh = [refresh_cost(*b.shape) for *_, b in cut]
    phases = lpt_refresh_offsets(refresh, frequency, stagger)
    owners = assign_owners([step_cost(*b.shape) for *_, b in cut], refresh, phases, world)
    return [
        Block(j, t, cols, b, phase, owner) for (j, t, cols, b), phase, owner in zip(cut, phases, owners)
    ]


def assign_owners(step: list[float], refresh: list[float], offsets: list[int], world: int) -> list[int]:
    """Greedy longest-processing-time: largest blocks first, each to the rank whose peak step
    (every-step load plus the largest per-offset refresh load) stays lowest; ties go to the
    rank with less total work, then the lower rank. Each block weighs every rank at once
    (arrays over the ranks), so a plan of B blocks costs O(B) array operations of length W."""
    if world == 1:
        return [0] * len(step)
    import numpy as np

    phases = max(offsets, default=0) + 1
    base = np.zeros(world)
    slots = np.zeros((world, phases))
    peak_refresh = np.zeros(world)
    total_refresh = np.zeros(world)
    ranks = np.arange(world)
    owners = [0] * len(step)
    for i in sorted(range(len(step)), key=lambda i: (-(step[i] + refresh[i]), i)):
        o = offsets[i]
        peak = base + step[i] + np.maximum(peak_refresh, slots[:, o] + refresh[i])
        tied = ranks[peak == peak.min()]
        if len(tied) > 1:
            work = (base + total_refresh)[tied]
            tied = tied[work == work.min()]
        r = int(tied[0])
        owners[i] = r
        base[r] += step[i]
        slots[r, o] += refresh[i]
        peak_refresh[r] = max(peak_refresh[r], slots[r, o])
        total_refresh[r] += refresh[i]
    return owners
