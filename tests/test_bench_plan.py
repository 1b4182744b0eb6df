"""``python -m launch.bench plan``: its traffic figures are what the exchange the optimizer
builds would move, its boxes are what torch's placements give, and the suite runs."""

from __future__ import annotations

import json

import pytest

from bregtop_dist.distributed.assignment import plan_blocks
from bregtop_dist.distributed.exchange import Exchange
from launch.bench import plan
from launch.bench.__main__ import main as bench_main

SHAPES = [("layers.0.q.weight", (40, 24)), ("layers.0.w2.weight", (24, 40)), ("layers.0.w1.weight", (13, 7))]


@pytest.mark.parametrize("layout", ["fsdp", "hsdp", "fsdp_tp"])
def test_exchange_figures_are_the_exchange_s_own(layout, gen):
    """Per rank, the elements exchange_elements counts equal those of the rectangle lists
    Exchange.build makes on that rank (sent: gradients to owners and updates to holders)."""
    world = 16
    max_dim = int(__import__("torch").randint(4, 12, (), generator=gen))
    blocks = plan_blocks([s for _, s in SHAPES], max_dim, 3, True, world)
    held = [plan.held_boxes(layout, name, shape, world) for name, shape in SHAPES]
    sent, received = plan.exchange_elements(blocks, [plan._Grid(h) for h in held], False, world)
    for rank in range(world):
        ex = Exchange.build(blocks, [[(b,) for b in h] for h in held], rank, world, replicated=False)
        out = sum(r.numel for d in range(world) if d != rank for r in ex.grads_to[d] + ex.updates_to[d])
        inc = sum(r.numel for s in range(world) if s != rank for r in ex.grads_from[s] + ex.updates_from[s])
        assert (sent[rank], received[rank]) == (out, inc), (layout, rank, max_dim)


def test_tensor_parallel_boxes_follow_torchtitan_s_plan():
    """Column-wise weights are cut by rows over "tp" then "dp", row-wise ones by columns over
    "tp" and rows over "dp"; the rest by rows over "dp" only (replicated over "tp")."""
    world = 16  # mesh (2, 8)
    col = plan.held_boxes("fsdp_tp", "layers.0.q.weight", (32, 8), world)
    assert [b.rows for b in col[:3]] == [(0, 2), (4, 6), (8, 10)] and col[8].rows == (2, 4)
    row = plan.held_boxes("fsdp_tp", "layers.0.o.weight", (8, 32), world)
    assert (row[0].rows, row[0].cols) == ((0, 4), (0, 4)) and (row[9].rows, row[9].cols) == ((4, 8), (4, 8))
    norm = plan.held_boxes("fsdp_tp", "layers.0.attention_norm.weight", (32,), world)
    assert norm[0] == norm[7] and norm[8].rows == (16, 32)


def test_the_plan_suite_writes_its_table(tmp_path, capsys):
    out = tmp_path / "plan.json"
    assert bench_main(["plan", "--models", "gpt2-xl", "--layouts", "fsdp,hsdp", "--worlds", "8", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["layout"], r["world"]) for r in rows] == [("fsdp", 8), ("hsdp", 8)]
    fsdp = rows[0]
    assert fsdp["blocks"] == 2016 and 1.5e9 < fsdp["parameters"] < 1.6e9  # GPT-2 XL: 48 layers, 1.56B parameters
    assert fsdp["adamw_state_gb"] == pytest.approx(8 * fsdp["parameters"] / 8 / 1e9, rel=0.01)
    assert "gpt2-xl" in capsys.readouterr().out
