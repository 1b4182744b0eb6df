"""Layout, owner assignment and exchange plans, checked without processes."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from state_tensors import kron_blocks

from bregtop_dist import BregTop
from bregtop_dist.core.block_step import refresh_due
from bregtop_dist.core.blocking import block_slices
from bregtop_dist.distributed.assignment import assign_owners, plan_blocks, refresh_cost, step_cost
from bregtop_dist.distributed.exchange import Exchange, intersect
from bregtop_dist.distributed.layout import Box, chunk_rows, flat_boxes, flat_piece, rect_view


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


def test_flat_boxes_hold_exactly_the_range_where_the_holder_keeps_it(gen):
    for _ in range(50):
        rows, cols = (int(x) for x in torch.randint(1, 12, (2,), generator=gen))
        a, b = sorted(int(x) for x in torch.randint(0, rows * cols + 1, (2,), generator=gen))
        full = torch.arange(rows * cols)
        local = full[a:b].clone()
        boxes = flat_boxes((a, b), cols)
        assert len(boxes) <= 3 and sum(box.numel for box in boxes) == b - a
        for box in boxes:
            view = rect_view(local, box.start, box.stride, (box.rows[1] - box.rows[0], box.cols[1] - box.cols[0]))
            assert torch.equal(view, full.view(rows, cols)[box.rows[0] : box.rows[1], box.cols[0] : box.cols[1]])


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
                for rect in intersect(i, blk, flat_boxes(held, cols)):
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
    for rect in intersect(1, blk, flat_boxes((start, stop), 7)):
        view = rect_view(local, rect.at, rect.stride, rect.shape)
        assert torch.equal(view, full[rect.rows[0] : rect.rows[1], rect.cols[0] : rect.cols[1]])


def test_a_piece_takes_its_part_of_a_full_tensor(gen):
    full = torch.randn(6, 2, 3, generator=gen)
    start, stop = 5, 29
    piece = flat_piece(full, "p", (6, 2, 3), ((0, start), (start, stop), (stop, 36)), full.view(-1)[start:stop], None)
    assert torch.equal(piece.local_of(full, 1), full.reshape(-1)[start:stop])


def test_exchange_lists_agree_between_sender_and_owner(gen):
    shapes = [(13, 20), (3, 9), (20, 12)]
    world = 4
    blocks = plan_blocks(shapes, 8, 3, True, world)
    ranges = [_random_ranges(gen, math.prod(s), world) for s in shapes]
    held = [[flat_boxes(ranges[j][r], s[1]) for r in range(world)] for j, s in enumerate(shapes)]
    plans = [Exchange.build(blocks, held, r, world, replicated=False) for r in range(world)]
    for src in range(world):
        for dst in range(world):
            assert plans[src].grads_to[dst] == plans[dst].grads_from[src]
            assert plans[dst].updates_to[src] == plans[src].updates_from[dst] == plans[dst].grads_from[src]
    replicated = [Exchange.build(blocks, held, r, world, replicated=True) for r in range(world)]
    for r, ex in enumerate(replicated):
        assert [rect.block for rect in ex.grads_to[r]] == ex.owned[r]
        assert all(not ex.grads_to[d] for d in range(world) if d != r)


def _grid_boxes(gen, rows, cols, bands, cuts):
    """Boxes of a rows x cols matrix cut into ``bands`` row bands and ``cuts`` column ranges
    (random sizes, some empty), each laid out contiguously."""
    def cut(size, parts):
        bounds = sorted(torch.randint(0, size + 1, (parts - 1,), generator=gen).tolist())
        edges = [0, *bounds, size]
        return [(edges[k], edges[k + 1]) for k in range(parts)]

    return [Box(r, c, 0, c[1] - c[0]) for r in cut(rows, bands) for c in cut(cols, cuts)]


@pytest.mark.parametrize("replicas", [2, 3])
def test_replicated_boxes_send_each_gradient_once_and_every_holder_gets_its_update(gen, replicas):
    """HSDP-like layouts: every box held by ``replicas`` ranks. Each block element reaches its
    owner from exactly one holder, and every holder of it receives its update exactly once."""
    shapes = [(13, 20), (3, 9), (20, 12)]
    shards = 2
    world = shards * replicas
    blocks = plan_blocks(shapes, 8, 3, True, world)
    held = []
    for rows, cols in shapes:
        boxes = _grid_boxes(gen, rows, cols, shards, 1)
        held.append([(boxes[r % shards],) for r in range(world)])  # rank r holds shard r mod shards
    plans = [Exchange.build(blocks, held, r, world, replicated=False) for r in range(world)]
    for j, (rows, cols) in enumerate(shapes):
        grads = torch.zeros(rows, cols, dtype=torch.int64)
        updates = torch.zeros(world, rows, cols, dtype=torch.int64)
        for owner, plan in enumerate(plans):
            for src in range(world):
                assert plan.grads_from[src] == plans[src].grads_to[owner]
                assert plan.updates_to[src] == plans[src].updates_from[owner]
                for rect in plan.grads_from[src]:
                    if blocks[rect.block].param == j:
                        assert blocks[rect.block].owner == owner
                        grads[rect.rows[0] : rect.rows[1], rect.cols[0] : rect.cols[1]] += 1
                for rect in plan.updates_to[src]:
                    if blocks[rect.block].param == j:
                        updates[src, rect.rows[0] : rect.rows[1], rect.cols[0] : rect.cols[1]] += 1
        assert bool((grads == 1).all()), j
        for r in range(world):
            box = held[j][r][0]
            want = torch.zeros(rows, cols, dtype=torch.int64)
            want[box.rows[0] : box.rows[1], box.cols[0] : box.cols[1]] = 1
            assert torch.equal(updates[r], want), (j, r)


def test_refresh_offsets_do_not_depend_on_the_world_size():
    shapes = [(64, 32), (13, 20), (300, 40), (5, 5)]
    offsets = {w: [b.phase for b in plan_blocks(shapes, 16, 5, True, w)] for w in (1, 2, 3, 8)}
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


def _greedy_owners(step, refresh, offsets, world):
    """The owner rule written out plainly: largest blocks first, each to the rank whose peak
    step (every-step load plus its largest per-phase refresh load) would be lowest; ties to the
    rank with less total work, then the lower rank."""
    base, total = [0.0] * world, [0.0] * world
    slots = [dict() for _ in range(world)]
    peak = [0.0] * world
    owners = [0] * len(step)
    for i in sorted(range(len(step)), key=lambda i: (-(step[i] + refresh[i]), i)):
        o = offsets[i]
        r = min(range(world), key=lambda r: (base[r] + step[i] + max(peak[r], slots[r].get(o, 0.0) + refresh[i]),
                                             base[r] + total[r], r))
        owners[i] = r
        base[r] += step[i]
        slots[r][o] = slots[r].get(o, 0.0) + refresh[i]
        peak[r] = max(peak[r], slots[r][o])
        total[r] += refresh[i]
    return owners


def test_owners_follow_the_greedy_rule(gen):
    """assign_owners (arrays over the ranks) picks exactly the plainly written rule's owners,
    equal costs (ties) included."""
    for _ in range(40):
        n = int(torch.randint(0, 80, (), generator=gen))
        world = int(torch.randint(2, 17, (), generator=gen))
        if bool(torch.rand((), generator=gen) < 0.3):
            step, refresh = [1.0] * n, [1.0] * n
        else:
            sizes = torch.randint(0, 48, (n, 2), generator=gen).tolist()
            step, refresh = [step_cost(m, k) for m, k in sizes], [refresh_cost(m, k) for m, k in sizes]
        offsets = torch.randint(0, 5, (n,), generator=gen).tolist()
        assert assign_owners(step, refresh, offsets, world) == _greedy_owners(step, refresh, offsets, world)


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


FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("commit", ["0183b2f", "6367370"])
def test_the_earlier_per_rank_format_loads_at_its_world_size_only(commit):
    """A state dict in the per-rank format before block indices (stacks keyed "<group>:<m>x<n>",
    ``world_size``; at 6367370 also without ``ready``), written by that commit's own code
    (tests/fixtures/README.md), loads into today's optimizer: each block gets the row of the
    stack the old plan gave it, and the next step is the old code's next step."""
    fx = torch.load(FIXTURES / f"legacy_kron_blocks_{commit}.pt", weights_only=True)
    legacy = fx["state_dict"]
    assert fx["commit"] == commit and legacy["world_size"] == 1
    assert all("kron" not in entry for entry in legacy["state"].values())
    assert all(("ready" in stack) == (commit == "0183b2f") for stack in legacy["kron_blocks"].values())
    params = [torch.nn.Parameter(t.clone()) for t in fx["params"]]
    opt = BregTop(params, **fx["settings"])
    opt.load_state_dict(legacy)

    max_dim = fx["settings"]["max_precond_dim"]
    want = {}  # (param, block index) -> the old stack row of that block, by the slice the old plan recorded
    for key, rows in fx["rows"].items():
        for row, (pi, r0, r1, c0, c1) in enumerate(rows):
            p = params[pi]
            slices = [(s.r0, s.r1, s.c0, s.c1) for s in block_slices(p.shape[0], p[0].numel(), max_dim)]
            want[(pi, str(slices.index((r0, r1, c0, c1))))] = {f: t[row] for f, t in legacy["kron_blocks"][key].items()}
    got = kron_blocks(opt.state_dict())
    assert set(got) == set(want) == {(0, "0"), (1, "0"), (1, "1"), (1, "2")}
    for key, fields in want.items():
        assert set(got[key]) == set(fields) | {"ready"}
        assert all(torch.equal(got[key][f], t) for f, t in fields.items()), key
        assert bool(got[key]["ready"]) and int(got[key]["step"]) == fx["steps"]
    adamw = opt.state_dict()["state"][2]
    assert set(adamw) == set(legacy["state"][2]) and all(torch.equal(adamw[k], v) for k, v in legacy["state"][2].items())

    frequency = fx["settings"]["precondition_frequency"]
    due = [refresh_due(torch.tensor(fx["steps"] + 1), s.phases, frequency) for s in opt.kron_stacks.values()]
    assert not any(d.any() for d in due), "the old and today's refresh differ on purpose (df47d8d): pick a step without"
    for p, g in zip(params, fx["next_grads"]):
        p.grad = g.clone()
    opt.step()
    for p, old in zip(params, fx["next_params"]):
        torch.testing.assert_close(p.detach(), old, rtol=1e-6, atol=1e-7)

    legacy["world_size"] = 2
    with pytest.raises(ValueError, match=r"saved with world_size=2 in BregTop's earlier per-rank format .* this run has 1"):
        BregTop(params, **fx["settings"]).load_state_dict(legacy)
