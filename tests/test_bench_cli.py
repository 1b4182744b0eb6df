"""The ``python -m launch.bench`` command line: a --quick optimizer run and its error messages."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from launch.bench.__main__ import main

ROW_KEYS = {
    "name",
    "family",
    "optimizer",
    "options",
    "error",
    "median_step_s",
    "mean_step_s",
    "max_step_s",
    "raw_max_step_s",
    "max_over_median",
    "median_vs_adamw",
    "repeat_median_step_s",
    "state_bytes",
    "state_bytes_per_param",
    "step_s",
}


def test_quick_optimizer_bench_writes_json(tmp_path, capsys):
    """A tiny run writes the machine, settings, one timed row per optimizer, selection and
    targets. Two BregTop methods (one full, one top-set) and the eager peers keep it fast;
    heavyball is left out because its torch.compile alone takes longer than this test may."""
    out = tmp_path / "bench" / "optimizer.json"
    chosen = ["kl", "bregtop-vn-v2", "pto-soap", "pto-shampoo"]
    argv = ["optimizer", "--quick", "--steps", "4", "--repeats", "2", "--only", ",".join(chosen), "--out", str(out)]
    assert main(argv) == 0

    result = json.loads(out.read_text())
    assert set(result) == {"machine", "settings", "rows", "selection", "targets"}
    assert {"processor", "cpu_count", "torch", "torch_num_threads", "date_utc"} <= set(result["machine"])
    assert result["settings"]["steps"] == 4 and result["settings"]["quick"] is True
    assert [r["name"] for r in result["rows"]] == ["adamw", *chosen]
    for row in result["rows"]:
        assert row["error"] is None, row
        assert set(row) == ROW_KEYS
        assert 0 < row["median_step_s"] <= row["max_step_s"] <= row["raw_max_step_s"]
        assert 0 < row["mean_step_s"] <= row["raw_max_step_s"]
        assert len(row["step_s"]) == 8
        assert row["state_bytes_per_param"] > 0
    selection = result["selection"]
    assert selection["kron_precondition_s"] > 0 and selection["naive_s"] > 0
    assert selection["outputs_agree"] is True
    assert set(result["targets"]) == {
        "selection_speedup",
        "bregtop_vs_fastest_peer",
        "bregtop_max_over_median",
    }
    assert "median ms" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, names",
    [
        (["kernel"], "'kernel'"),
        (["optimizer", "--steps", "0"], "--steps"),
        (["optimizer", "--only", "adamw,sgd"], "'sgd'"),
        (["optimizer", "--frobnicate"], "--frobnicate"),
    ],
)
def test_bad_command_line_is_a_one_line_error(argv, names, capsys):
    """Errors exit 2 with one stderr line that names the bad value; nothing is run."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m launch.bench")
    assert "error:" in err and names in err


def test_steps_must_align_with_refresh_phase(capsys):
    assert main(["optimizer", "--steps", "7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--steps=7 must be a multiple of the precondition frequency 10" in err


def test_quick_kernels_bench_writes_json(tmp_path, capsys, monkeypatch):
    """A tiny run on GPT-2's block structure at 1/16: torch rows for every stack (Algorithm 2
    whole and its parts), the training step, and the targets; off a GPU and without the
    interpreter the Triton rows are skipped with the reason, and no target is judged."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreted rows: tests/test_bench_kernels.py
    out = tmp_path / "kernels.json"
    assert main(["kernels", "--quick", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"machine", "settings", "precondition", "rotated_stats", "training_step", "targets"}
    assert result["settings"]["stacks"] == [[4, 48, 48], [3, 48, 64], [3, 64, 48]]
    assert [r["shape"] for r in result["precondition"]] == result["settings"]["stacks"]
    for row in result["precondition"]:
        assert row["torch_precondition_s"] > 0 and row["torch_selection_s"] > 0 and row["torch_apply_s"] > 0
    for row in result["rotated_stats"]:
        assert row["torch_s"] > 0
    step = result["training_step"]
    assert step["forward_backward_s"] > 0 and step["bregtop_step_mean_s"] > 0 and step["adamw_step_s"] > 0
    assert len(result["targets"]) == 2 * 3 + 1
    if not torch.cuda.is_available():
        assert all("no CUDA device" in r["triton_skipped"] for r in result["precondition"] + result["rotated_stats"])
        assert all(g["met"] is None for g in result["targets"])
        assert step["model"]["autocast"] == "off (float32)"
    printed = capsys.readouterr().out
    assert "BregTop adds" in printed and "targets (GPU)" in printed


def test_dist_bench_traffic_matches_theory(tmp_path, capsys):
    """Quick sizes cut every matrix into whole 32x32 blocks split evenly between 2 ranks, so
    the measured elements per step equal the theory exactly."""
    out = tmp_path / "dist.json"
    assert main(["dist", "--quick", "--worlds", "1,2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert {(r["layout"], r["stagger"], r["world"]) for r in rows} == {
        (layout, stagger, w) for layout in ("replicated", "sharded") for stagger in (True, False) for w in (1, 2)
    }
    for r in rows:
        assert r["received_per_step"] == r["theory_per_step"], r
        if r["world"] == 2:
            assert r["state_vs_world1"] == pytest.approx(0.5)
    assert "recv elem/step" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["dist", "--worlds", "0,2"], "world sizes are integers >= 1"),
        (["dist", "--worlds", "two"], "is not a comma-separated list of integers"),
        (["dist", "--quick", "--steps", "3"], "must be a multiple of --frequency=2"),
    ],
)
def test_dist_bench_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) if argv[1] == "--worlds" else contextlib.nullcontext():
        assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_launches_bench_counts_ops_launches_and_scalar_reads(tmp_path, capsys):
    """``launch.bench launches`` on a 1-layer layout: a row per method and code path, each step
    issuing ATen ops and reading scalars; the counter sees a tensor's bool() as a read."""
    from launch.bench.counters import OpCounter, count_tolist

    counter = OpCounter()
    with counter:
        t = torch.ones(3)
        assert bool(t.sum() > 0)
    assert counter.ops >= 3 and counter.scalar_reads == 1
    with count_tolist(counter):
        t.tolist()
    assert counter.scalar_reads == 2

    out = tmp_path / "launches.json"
    assert main(["launches", "--methods", "kl", "--layers", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["method"], r["accelerator_paths"], r["backend"]) for r in rows] == [
        ("kl", False, "auto"), ("kl", True, "torch"), ("kl", True, "triton")]
    assert all(r["ops_per_step"] > 0 and r["scalar_reads_per_step"] > 0 for r in rows)
    assert rows[2]["triton_launches_per_step"] > 0 and rows[0]["triton_launches_per_step"] == 0
    assert "ops/step" in capsys.readouterr().out


def test_precision_bench_compares_each_precision_with_fp32(tmp_path):
    """``launch.bench precision`` at a few steps: a row for tf32 (emulated on the CPU) and one
    for bf16, each with finite errors measured against fp32 in the same run."""
    out = tmp_path / "precision.json"
    assert main(["precision", "--device", "cpu", "--steps", "3", "--repeats", "1", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["precision"], r["emulated"]) for r in rows] == [
        ("fp32, init x(1+1e-06 noise)", False), ("tf32", True), ("bf16", False)]
    assert all(0 < r["one_step_rel_error_median"] < 1 and r["run_rel_distance"] >= 0 for r in rows[1:])
