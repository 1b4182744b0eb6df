"""Stack pieces: a stack's rows as strided views of the parameters, checked against slicing
each block out of its parameter, on random shapes and tilings (uneven splits included), for
every owner's subset of blocks, and through the foreach copy in and foreach add out."""

from __future__ import annotations

import pytest
import torch

from bregtop_dist.core.descend import descend_
from bregtop_dist.distributed.assignment import plan_blocks
from bregtop_dist.distributed.layout import replicated_piece
from bregtop_dist.distributed.stack_views import StackViews, stack_runs


def _shapes(gen):
    dims = lambda: int(torch.randint(1, 40, (1,), generator=gen))  # noqa: E731
    return [(dims(), dims()) for _ in range(5)] + [(dims(), 3, dims() // 3 + 1)]


@pytest.mark.parametrize("world", [1, 3])
def test_pieces_cover_each_stack_in_order(gen, world):
    shapes = _shapes(gen)
    max_dim = int(torch.randint(2, 17, (1,), generator=gen))
    blocks = plan_blocks(shapes, max_dim, 10, True, world)
    params = [torch.randn(s, generator=gen) for s in shapes]
    for rank in range(world):
        stacks: dict[tuple[int, int], list[int]] = {}
        for i, b in enumerate(blocks):
            if b.owner == rank:
                stacks.setdefault(b.shape, []).append(i)
        for ids in stacks.values():
            pieces = stack_runs(ids, blocks)
            assert sum(p.rows for p in pieces) == len(ids)
            got = torch.cat([p.view(params[p.param].reshape(-1)) for p in pieces])
            want = torch.stack([
                params[blocks[i].param].reshape(params[blocks[i].param].shape[0], -1)[
                    blocks[i].slice.r0:blocks[i].slice.r1, blocks[i].slice.c0:blocks[i].slice.c1]
                for i in ids])
            assert torch.equal(got, want)


def test_gather_and_apply_round_trip(gen):
    shapes = _shapes(gen)
    blocks = plan_blocks(shapes, 8, 10, True, 1)
    params = [torch.randn(s, generator=gen) for s in shapes]
    shards = []
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=gen)
        shards.append(replicated_piece(p, f"p{i}", 1))
    stacks: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(blocks):
        stacks.setdefault(b.shape, []).append(i)
    views = StackViews(stacks, blocks)
    buffers = {shape: torch.full((len(ids), *shape), float("nan")) for shape, ids in stacks.items()}
    views.gather(shards, buffers)
    before = [p.clone() for p in params]
    descend_(*views.update_pairs(shards, buffers), 0.5)  # value -= 0.5 * grad, block by block
    for p, b in zip(params, before):
        assert torch.allclose(p, b - 0.5 * p.grad, rtol=0, atol=1e-6)
