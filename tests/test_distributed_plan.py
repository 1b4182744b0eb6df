"""Layout, owner assignment and exchange plans, checked without processes."""

from __future__ import annotations

import math

import pytest
import torch
from state_tensors import state_tensors

from bregtop_dist import BregTop
from bregtop_dist.core.blocking import block_slices
from bregtop_dist.distributed.assignment import assign_owners, plan_blocks, refresh_cost, step_cost
from bregtop_dist.distributed.exchange import Exchange, intersect
from bregtop_dist.distributed.layout import chunk_rows, rect_view


def _random_ranges(gen, numel, world):
    cuts = sorted(torch.randint(0, numel + 1, (world - 1,), generator=gen).tolist())
    bounds = [0, *cuts, numel]
    return [(bounds[r], bounds[r + 1]) for r in range(world)]


@pytest.mark.parametrize("rows, world", [(13, 4), (3, 4), (8, 2), (0, 3), (1, 1), (17, 5)])
def test_chunk_rows_is_torch_chunk(rows, world):
    got = [b - a for a, b in chunk_rows(rows, world)]
    want = [c.shape[0] for c in torch.arange(rows).chunk(world)] if rows else []
    assert got[: len(want)] == want and all(n == 0 for n in got[len(want):])
    assert chunk_rows(rows, world)[-1][1] == rows


def test_pieces_cover_every_block_exactly_once(gen):
    for _ in range(20):
        rows, cols = (int(x) for x in torch.randint(1, 30, (2,), generator=gen))
        world = int(torch.randint(1, 6, (1,), generator=gen))
        max_dim = int(torch.randint(1, 12, (1,), generator=gen))
        blocks = plan_blocks([(rows, cols)], max_dim, 3, True, world)
        ranges = _random_ranges(gen, rows * cols, world)
        seen = torch.zeros(rows, cols, dtype=torch.int64)
        for i, blk in enumerate(blocks):
            for held in ranges:
                for rect in intersect(i, blk, held):
                    (i0, i1), (j0, j1) = rect.rows, rect.cols
                    assert blk.slice.r0 <= i0 < i1 <= blk.slice.r1 and blk.slice.c0 <= j0 < j1 <= blk.slice.c1
                    flat = torch.arange(rows * cols).view(rows, cols)[i0:i1, j0:j1]
                    assert bool(((flat >= held[0]) & (flat < held[1])).all())
                    seen[i0:i1, j0:j1] += 1
        assert bool((seen == 1).all()), (rows, cols, world, max_dim, ranges)


def test_rect_view_reads_the_local_range(gen):
    full = torch.randn(9, 7, generator=gen)
    start, stop = 10, 50
    local = full.view(-1)[start:stop].clone()
    blk = plan_blocks([(9, 7)], 4, 3, True, 1)[1]  # rows 0:5, cols 4:7
    for rect in intersect(1, blk, (start, stop)):
        view = rect_view(local, start, 7, rect.rows, rect.cols)
        assert torch.equal(view, full[rect.rows[0] : rect.rows[1], rect.cols[0] : rect.cols[1]])


def test_exchange_lists_agree_between_sender_and_owner(gen):
    shapes = [(13, 20), (3, 9), (20, 12)]
    world = 4
    blocks = plan_blocks(shapes, 8, 3, True, world)
    ranges = [_random_ranges(gen, math.prod(s), world) for s in shapes]
    ranges = [[ranges[j][r] for r in range(world)] for j in range(len(shapes))]
    plans = [Exchange.build(blocks, ranges, r, world, replicated=False) for r in range(world)]
    for src in range(world):
        for dst in range(world):
            assert plans[src].send[dst] == plans[dst].recv[src]
    replicated = [Exchange.build(blocks, ranges, r, world, replicated=True) for r in range(world)]
    for r, ex in enumerate(replicated):
        assert [rect.block for rect in ex.send[r]] == ex.owned[r]
        assert all(not ex.send[d] for d in range(world) if d != r)


def test_refresh_offsets_do_not_depend_on_the_world_size():
    shapes = [(64, 32), (13, 20), (300, 40), (5, 5)]
    offsets = {w: [b.offset for b in plan_blocks(shapes, 16, 5, True, w)] for w in (1, 2, 3, 8)}
    assert len({tuple(v) for v in offsets.values()}) == 1
    assert set(offsets[1]) == set(range(5))


def test_owners_balance_the_peak_step(gen):
    sizes = torch.randint(4, 64, (60, 2), generator=gen).tolist()
    step = [step_cost(m, n) for m, n in sizes]
    refresh = [refresh_cost(m, n) for m, n in sizes]
    offsets = [i % 5 for i in range(len(sizes))]
    for world in (2, 3, 4):
        owners = assign_owners(step, refresh, offsets, world)
        assert owners == assign_owners(step, refresh, offsets, world)  # deterministic
        peak = [max(sum(step[i] + refresh[i] * (offsets[i] == t) for i in range(len(owners)) if owners[i] == r)
                    for t in range(5)) for r in range(world)]
        best = max(sum(step[i] + refresh[i] * (offsets[i] == t) for i in range(len(owners))) / world for t in range(5))
        assert max(peak) <= best + max(s + q for s, q in zip(step, refresh)), (world, peak, best)


def test_identical_blocks_are_shared_evenly():
    owners = assign_owners([1.0] * 10, [1.0] * 10, [0] * 10, 4)
    assert sorted(owners.count(r) for r in range(4)) == [2, 2, 3, 3]


def test_single_process_owns_everything():
    assert {b.owner for b in plan_blocks([(40, 30)], 8, 3, True, 1)} == {0}
    assert len(plan_blocks([(40, 30)], 8, 3, True, 1)) == len(block_slices(40, 30, 8))


@pytest.mark.parametrize("bad", ["fp16", torch.float16, "bfloat"])
def test_comm_dtype_is_checked(bad):
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"comm_dtype=.* is not allowed; use one of \['bf16', 'bfloat16', 'float32', 'fp32'\]"):
        BregTop([p], comm_dtype=bad)


def _legacy(opt: BregTop) -> dict:
    """The state dict as the per-rank format before tiles wrote it: stacks keyed
    "<group>:<m>x<n>", no ``ready`` field, ``world_size``."""
    sd = opt.state_dict()
    state = {pid: e for pid, e in sd["state"].items() if "kron" not in e}
    stacks = {
        key: {k: v.clone() for k, v in stack.state.tensors().items() if k != "ready"}
        for key, stack in opt.kron_stacks.items()
    }
    return {"state": state, "param_groups": sd["param_groups"], "kron_blocks": stacks, "world_size": 1}


def test_the_earlier_per_rank_format_loads_at_its_world_size_only(gen):
    params = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in [(6, 5), (20, 3), (4,)]]
    opt = BregTop(params, max_precond_dim=8)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    legacy = _legacy(opt)
    fresh = BregTop(params, max_precond_dim=8)
    fresh.load_state_dict(legacy)
    want, got = state_tensors(opt.state_dict()), state_tensors(fresh.state_dict())
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    legacy["world_size"] = 2
    with pytest.raises(ValueError, match=r"saved with world_size=2 in BregTop's earlier per-rank format .* this run has 1"):
        BregTop(params, max_precond_dim=8).load_state_dict(legacy)
