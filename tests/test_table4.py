"""The Table 4 report: thresholds and the paper's three claims, on a synthetic run."""

from __future__ import annotations

import json

import pytest

from launch.sst2 import PAPER_TABLE4
from launch.table4 import claims, main


def _fake_run(path, speed):
    """EMA curves falling at ``speed[m]`` per step from 0.6; every row capped at 400 steps."""
    summary, lines = {}, []
    for m, rate in speed.items():
        curve = [(s, 0.6 - rate * s) for s in range(1, 401)]
        reached = next((s for s, e in curve if e < 0.05), None)
        curve = curve[: reached or 400]
        lines += [json.dumps({"method": m, "step": s, "loss": e, "ema": e}) for s, e in curve]
        summary[m] = {"steps_to_target": reached, "final_step": curve[-1][0], "final_ema_loss": curve[-1][1],
                      "dev_accuracy": 0.8, "wall_time_s": 1.0, "settings": {"target_loss": "0.05"}}
    path.mkdir()
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_paper_ordering_holds_in_the_paper():
    assert all(ok for _, ok in claims(dict(PAPER_TABLE4), {m: 0.0 for m in PAPER_TABLE4}))


def test_report_uses_a_common_threshold_when_rows_miss_the_target(tmp_path):
    speed = {m: 1e-3 for m in PAPER_TABLE4}
    speed.update({"bregtop-vn-v2": 2e-3, "f-v1": 5e-4, "f-v2": 6e-4, "vn-v1": 1.2e-3})
    _fake_run(tmp_path / "run", speed)
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "docs")]) == 0
    data = json.loads((tmp_path / "docs/table4.json").read_text())
    first = next(s for s in range(1, 401) if 0.6 - 2e-3 * s < 0.05)
    assert data["steps_to_target"]["bregtop-vn-v2"] == first and data["steps_to_target"]["kl"] is None
    assert data["common_threshold"] == pytest.approx(0.4)  # f-v1 ends at 0.6 - 0.2 = 0.4
    common = data["claims"]["at the common threshold 0.400"]
    assert common["bregtop-vn-v2 is the fastest row"] and common["f-v1 and f-v2 are the two slowest rows"]
    assert not common["bregtop-vn-v1 faster than vn-v1"]
    assert f"| bregtop-vn-v2 | 1003 | {first} |" in (tmp_path / "docs/table4-measured.md").read_text()


def test_missing_run_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "run launch.sst2 first" in capsys.readouterr().err


def test_budget_judges_every_row_on_its_first_steps(tmp_path):
    speed = {m: 1e-3 for m in PAPER_TABLE4}
    speed["bregtop-vn-v2"] = 2e-3
    _fake_run(tmp_path / "run", speed)
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "docs"), "--steps", "100"]) == 0
    data = json.loads((tmp_path / "docs/table4.json").read_text())
    assert data["budget"] == 100 and data["steps_to_target"]["bregtop-vn-v2"] is None
    assert data["common_threshold"] == pytest.approx(0.5)  # the slow rows end at 0.6 - 0.1
    assert data["final_ema"]["kl"] == pytest.approx(0.5)
