"""Merging launch.sst2 runs made in parallel: every finished row with the lines of its last
run, gzipped metrics read, and settings or results that disagree refused before anything is
written."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

from launch.merge_runs import main
from launch.table4 import main as table4

SETTINGS = {"target_loss": "0.05", "init": "kl-methods", "eig_floor": "0.0", "lr": "0.001"}


def _run(path: Path, rows: dict[tuple[str, int], float], settings: dict[str, str] | None = None,
         partial: tuple[str, int] | None = None, packed: bool = False) -> None:
    """A run whose rows' EMAs fall at the given rate from 0.6; ``partial`` adds the lines of an
    interrupted row (no summary entry) and a stale earlier start of the first row."""
    summary, lines = {}, []
    for i, ((method, seed), rate) in enumerate(rows.items()):
        curve = [(s, 0.6 - rate * s) for s in range(1, 400) if 0.6 - rate * (s - 1) >= 0.05]
        if i == 0:  # an earlier start of this row, restarted by --resume
            lines += [json.dumps({"method": method, "seed": seed, "step": s, "ema": 9.0, "loss": 9.0}) for s in (1, 2)]
        lines += [json.dumps({"method": method, "seed": seed, "step": s, "ema": e, "loss": e}) for s, e in curve]
        summary[f"{method}/seed{seed}"] = {
            "method": method, "seed": seed, "steps_to_target": curve[-1][0], "final_step": curve[-1][0],
            "final_ema_loss": curve[-1][1], "dev_accuracy": 0.8, "wall_time_s": 1.0,
            "settings": {**SETTINGS, **(settings or {}), "seed": str(seed),
                         "exponent": "0.25" if method == "shampoo" else "None"}}
    if partial is not None:
        lines += [json.dumps({"method": partial[0], "seed": partial[1], "step": s, "ema": 0.5, "loss": 0.5})
                  for s in (1, 2, 3)]
    path.mkdir()
    (path / "summary.json").write_text(json.dumps(summary))
    text = "\n".join(lines) + "\n"
    if packed:
        (path / "metrics.jsonl.gz").write_bytes(gzip.compress(text.encode()))
    else:
        (path / "metrics.jsonl").write_text(text)


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def test_rows_of_several_runs_become_one_run(tmp_path):
    rate = {("kl", 0): random.uniform(1e-3, 3e-3), ("shampoo", 0): random.uniform(1e-3, 3e-3),
            ("kl", 1): random.uniform(1e-3, 3e-3), ("vn-v1", 1): random.uniform(1e-3, 3e-3)}
    _run(tmp_path / "a", {k: rate[k] for k in [("kl", 0), ("shampoo", 0)]}, packed=True)
    _run(tmp_path / "b", {k: rate[k] for k in [("kl", 1), ("vn-v1", 1)]}, partial=("f-v1", 1))
    assert main([str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "b")]) == 0

    summary = json.loads((tmp_path / "m/summary.json").read_text())
    assert sorted(summary) == ["kl/seed0", "kl/seed1", "shampoo/seed0", "vn-v1/seed1"]
    lines = _lines(tmp_path / "m")
    assert {(r["method"], r["seed"]) for r in lines} == set(rate)  # the interrupted f-v1 row is left out
    for method, seed in rate:
        steps = [x["step"] for x in lines if (x["method"], x["seed"]) == (method, seed)]
        assert steps == list(range(1, summary[f"{method}/seed{seed}"]["final_step"] + 1))  # last start only
    assert all(x["ema"] != 9.0 for x in lines)

    assert table4([str(tmp_path / "m"), "--out", str(tmp_path / "docs")]) == 0
    report = json.loads((tmp_path / "docs/table4.json").read_text())
    assert {r["seed"] for r in report["per_seed"]["kl"]} == {0, 1}


def test_a_row_finished_twice_alike_is_taken_once(tmp_path):
    _run(tmp_path / "a", {("kl", 0): 2e-3})
    _run(tmp_path / "b", {("kl", 0): 2e-3, ("vn-v2", 0): 1e-3})
    assert main([str(tmp_path / "m"), str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert [x["method"] for x in _lines(tmp_path / "m")].count("kl") == json.loads(
        (tmp_path / "m/summary.json").read_text())["kl/seed0"]["final_step"]


def _refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], *runs: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        main([str(tmp_path / "m"), *(str(tmp_path / r) for r in runs)])
    assert exit_.value.code == 2
    assert not (tmp_path / "m").exists()  # nothing written
    return capsys.readouterr().err


def test_rows_with_other_settings_are_refused(tmp_path, capsys):
    _run(tmp_path / "a", {("kl", 0): 2e-3})
    _run(tmp_path / "b", {("kl", 1): 2e-3}, settings={"init": "first-gradient", "lr": "0.002"})
    err = _refused(tmp_path, capsys, "a", "b")
    assert "'kl/seed1'" in err and "init, lr" in err and str(tmp_path / "b") in err


def test_a_row_finished_twice_differently_is_refused(tmp_path, capsys):
    _run(tmp_path / "a", {("kl", 0): 2e-3})
    _run(tmp_path / "b", {("kl", 0): 1e-3})
    err = _refused(tmp_path, capsys, "a", "b")
    assert "'kl/seed0' was finished by both" in err and "different results" in err


def test_a_folder_that_is_not_a_run_is_refused(tmp_path, capsys):
    _run(tmp_path / "a", {("kl", 0): 2e-3})
    (tmp_path / "empty").mkdir()
    assert "has no summary.json" in _refused(tmp_path, capsys, "a", "empty")


def test_an_existing_summary_is_not_overwritten(tmp_path, capsys):
    _run(tmp_path / "a", {("kl", 0): 2e-3})
    with pytest.raises(SystemExit):
        main([str(tmp_path / "a"), str(tmp_path / "a")])
    assert "already holds a summary.json" in capsys.readouterr().err
