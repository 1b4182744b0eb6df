"""launch.lm_compare: a tiny end-to-end run (results.json's fields and types) and the curve
readings (steps to a target loss, loss at equal wall-clock) on hand-made curves."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from launch import lm_compare
from launch.lm_compare import (
    Curve,
    loss_at_step,
    loss_at_time,
    report_steps,
    seconds_to_target,
    steps_to_target,
)

ROOT = Path(__file__).resolve().parent.parent

# step:     0     10    20    30    40
# seconds:  0.0   2.0   4.0   7.0   8.0
# val loss: 10.0  6.0   5.0   4.5   4.0
CURVE = Curve(steps=[0, 10, 20, 30, 40], seconds=[0.0, 2.0, 4.0, 7.0, 8.0],
              val_loss=[10.0, 6.0, 5.0, 4.5, 4.0], train_loss=[None, 6.1, 5.1, 4.6, 4.1])


def test_steps_to_target_is_the_first_evaluation_at_or_below_it():
    assert steps_to_target(CURVE, 5.0) == 20  # equal counts as reached
    assert steps_to_target(CURVE, 4.9) == 30
    assert steps_to_target(CURVE, 4.0) == 40
    assert steps_to_target(CURVE, 10.0) == 0
    assert steps_to_target(CURVE, 3.99) is None  # not reached
    assert seconds_to_target(CURVE, 4.9) == 7.0
    assert seconds_to_target(CURVE, 3.99) is None
    bumpy = Curve([0, 10, 20, 30], [0.0, 1.0, 2.0, 3.0], [10.0, 4.0, 6.0, 3.0], [None, 0.0, 0.0, 0.0])
    assert steps_to_target(bumpy, 5.0) == 10  # the first crossing, not the last


def test_loss_at_time_interpolates_linearly_between_evaluations():
    assert loss_at_time(CURVE, 0.0) == 10.0
    assert loss_at_time(CURVE, 1.0) == pytest.approx(8.0)  # halfway from (0, 10) to (2, 6)
    assert loss_at_time(CURVE, 2.0) == pytest.approx(6.0)  # on an evaluation
    assert loss_at_time(CURVE, 5.5) == pytest.approx(4.75)  # halfway from (4, 5) to (7, 4.5)
    assert loss_at_time(CURVE, 7.25) == pytest.approx(4.375)
    assert loss_at_time(CURVE, 8.0) == pytest.approx(4.0)  # the end
    assert loss_at_time(CURVE, 8.01) is None  # past the run
    assert loss_at_step(CURVE, 30) == 4.5 and loss_at_step(CURVE, 25) is None


def test_report_steps_are_evaluated_steps_near_the_quarters():
    assert report_steps(160, 20) == [40, 80, 120, 160]
    assert report_steps(4, 2) == [2, 4]
    assert report_steps(12, 5) == [5, 10, 12]  # the last step is always evaluated


def test_tiny_run_writes_typed_results(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "data/lm/tinyshakespeare/input.txt").read_text()[:20000])
    out = tmp_path / "out"
    argv = ["--preset", "tiny", "--methods", "adamw", "kl", "--lrs", "3e-3", "--steps", "4", "--sweep-steps", "4",
            "--eval-every", "2", "--eval-batches", "1", "--batch-size", "2", "--data", str(text),
            "--cache-dir", str(tmp_path / "cache"), "--out", str(out)]
    assert lm_compare.main(argv) == 0
    printed = capsys.readouterr().out
    assert "### Validation loss at equal steps" in printed and "| step | adamw | kl |" in printed
    assert (out / "curves.png").stat().st_size > 1000

    res = json.loads((out / "results.json").read_text())
    assert res["sweep"] == []  # one lr each: nothing to sweep
    assert res["best_lr"] == {"adamw": 3e-3, "kl": 3e-3}
    assert [r["method"] for r in res["runs"]] == ["adamw", "kl"]
    for run in res["runs"]:
        assert run["steps"] == 4 and run["diverged"] is False and run["lr"] == 3e-3
        assert isinstance(run["seconds_per_step"], float) and run["seconds_per_step"] > 0
        curve = run["curve"]
        assert curve["steps"] == [0, 2, 4]
        assert curve["train_loss"][0] is None and all(isinstance(v, float) for v in curve["train_loss"][1:])
        assert curve["seconds"][0] == 0.0 and curve["seconds"] == sorted(curve["seconds"])
        assert all(isinstance(v, float) and math.isfinite(v) for v in curve["val_loss"])
        assert run["final_val_loss"] == curve["val_loss"][-1]
    adamw = res["runs"][0]
    assert res["target_val_loss"] == adamw["final_val_loss"]
    assert res["steps_to_target"]["adamw"] == 4
    assert res["seconds_to_target"]["adamw"] == adamw["curve"]["seconds"][-1]
    kl, target = res["runs"][1]["curve"], res["target_val_loss"]
    reached = [i for i, loss in enumerate(kl["val_loss"]) if loss <= target]  # kl's evaluations at or below it
    assert res["steps_to_target"]["kl"] == (kl["steps"][reached[0]] if reached else None)
    assert res["seconds_to_target"]["kl"] == (kl["seconds"][reached[0]] if reached else None)
    assert [row["step"] for row in res["equal_steps"]] == [2, 4]
    assert res["equal_steps"][-1]["val_loss"] == {r["method"]: r["final_val_loss"] for r in res["runs"]}
    budget = min(r["curve"]["seconds"][-1] for r in res["runs"])
    assert res["wall_budget_s"] == budget
    assert [row["seconds"] for row in res["equal_time"]] == pytest.approx([f * budget for f in (0.25, 0.5, 0.75, 1.0)])
    assert all(isinstance(v, float) for row in res["equal_time"] for v in row["val_loss"].values())
    assert res["optimizers"]["adamw"]["class"] == "torch.optim.adamw.AdamW"
    assert res["optimizers"]["kl"]["class"].endswith("BregTop") and res["optimizers"]["kl"]["settings"]["method"] == "kl"
    assert res["settings"]["dims"] == [2, 2, 64, 64] and res["settings"]["clip_grad_norm"] == 1.0
    assert isinstance(res["machine"], dict) and isinstance(res["total_wall_s"], float)


def test_bad_lr_list_is_refused(capsys):
    assert lm_compare.main(["--lrs", "fast"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("python -m launch.lm_compare: error: --lrs='fast'") and "comma-separated" in err
    assert "\n" not in err


def test_grafted_rows_and_heavyballs_soap_are_the_optimizers_they_name():
    """``kl+graft`` is BregTop's kl with graft='adamw', ``soap-heavyball`` heavyball's SOAP,
    as results.json records them."""
    grafted, plain = lm_compare.optimizer_settings("kl+graft"), lm_compare.optimizer_settings("kl")
    assert grafted["class"].endswith("BregTop") and grafted["settings"]["method"] == "kl"
    assert grafted["settings"]["graft"] == "adamw" and plain["settings"]["graft"] == "none"
    heavy = lm_compare.optimizer_settings("soap-heavyball")
    assert heavy["class"].startswith("heavyball") and heavy["class"].endswith("SOAP"), heavy["class"]
    opt = lm_compare.make_optimizer("soap-heavyball", torch.nn.Linear(3, 3), 1e-3)
    assert opt.precond_schedule == 1 / lm_compare.PRECONDITION_FREQUENCY  # heavyball keeps it off the groups
    with pytest.raises(ValueError, match=r"use one or more of"):
        lm_compare.CompareConfig(methods=("adamw+graft",))


def test_unit_state_rows_and_the_split_of_fused_projections():
    """``bregtop-vn-v2+unit`` is bregtop-vn-v2 from the unit first state; BregTop rows
    precondition a fused q/k/v as three blocks unless ``split_qkv`` is off."""
    unit = lm_compare.optimizer_settings("bregtop-vn-v2+unit")
    assert unit["settings"]["method"] == "bregtop-vn-v2" and unit["settings"]["init"] == "first-gradient-unit"
    assert lm_compare.optimizer_settings("kl")["settings"]["init"] == "first-gradient"
    assert lm_compare.optimizer_settings("kl+avg")["settings"]["init"] == "first-gradient-averaged"
    model = lm_compare.GPT(50, 1, 1, 12, 8)
    for split, parts in ((True, 3), (False, 1)):
        opt = lm_compare.make_optimizer("kl", model, 1e-3, split_qkv=split)
        qkv = [g for g in opt.param_groups if any(p is model.blocks[0].attn.qkv.weight for p in g["params"])]
        assert len(qkv) == 1 and qkv[0]["parts"] == parts, (split, qkv[0]["parts"])
    with pytest.raises(ValueError, match=r"use one or more of"):
        lm_compare.CompareConfig(methods=("kl+unit+graft",))
