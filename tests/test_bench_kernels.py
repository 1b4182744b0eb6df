"""``launch.bench kernels``: the stacks it times are the ones BregTop forms on GPT-2 small, the
Triton rows time the whole of Algorithm 2 (selection included) and agree with the torch rows,
and the targets are judged only on a GPU."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from bregtop_dist.core.blocking import block_slices
from launch.bench import kernels


def test_gpt2_small_stacks_are_the_blocks_of_its_48_matrices():
    """GPT-2 small (built on the meta device: no memory) cut by max_precond_dim=1024: per layer
    qkv 2304x768 -> 3 blocks 768x768, projection 768x768 -> 1, MLP 3072x768 -> 3 of 1024x768
    and 768x3072 -> 3 of 768x1024; the tied embedding/head and the vectors are on the AdamW side."""
    model = kernels.build_model(kernels.GPU, "meta")
    stacks = kernels.model_stacks(model, kernels.GPU.max_precond_dim)
    assert stacks == [(48, 768, 768), (36, 768, 1024), (36, 1024, 768)]

    by_hand: Counter[tuple[int, int]] = Counter()
    for rows, cols in [(2304, 768), (768, 768), (3072, 768), (768, 3072)] * 12:
        by_hand.update(b.shape for b in block_slices(rows, cols, 1024))
    assert sorted(stacks) == sorted((count, m, n) for (m, n), count in by_hand.items())
    assert sum(p.numel() for p in model.parameters()) == 124_439_808  # GPT-2 small


@pytest.mark.parametrize("sizes, stacks", [
    (kernels.CPU, [(8, 192, 192), (6, 192, 256), (6, 256, 192)]),
    (kernels.QUICK, [(4, 48, 48), (3, 48, 64), (3, 64, 48)]),
])
def test_small_sizes_keep_gpt2_block_structure(sizes, stacks):
    """The CPU and quick sizes scale width and max_precond_dim together: GPT-2's three stack
    shapes per layer, at 1/4 and 1/16."""
    assert kernels.model_stacks(kernels.build_model(sizes, "meta"), sizes.max_precond_dim) == stacks


def test_timed_counts_warmup_repeats_and_inner_calls():
    calls = []
    seconds, last = kernels.timed(lambda: calls.append(1) or len(calls), torch.device("cpu"),
                                  kernels.Timing(repeats=3, inner=4, warmup=2))
    assert len(calls) == 2 + 3 * 4 and last == 14 and seconds >= 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's reasons")
def test_triton_rows_need_cuda_or_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = kernels.triton_skip_reason(torch.device("cpu"))
    assert reason is not None and "no CUDA device" in reason and "TRITON_INTERPRET=1" in reason
    assert kernels.triton_plans(3, kernels.Timing(5), reason) == [(None, reason)] * 3

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pytest.importorskip("triton")
    assert kernels.triton_skip_reason(torch.device("cpu")) is None
    plans = kernels.triton_plans(3, kernels.Timing(5), None)
    assert plans[0] == (kernels.Timing(repeats=1, warmup=0), None)  # interpreted: once, first stack
    assert plans[1:] == [(None, kernels.INTERPRETED_ONCE)] * 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreted CPU run; on a GPU the bench itself runs")
def test_precondition_row_times_selection_and_scaling_on_both_backends(monkeypatch):
    """On a tiny stack in Triton's interpreter: every part timed on both backends, and the
    whole Triton path equal to the torch one."""
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cpu = torch.device("cpu")
    once = kernels.Timing(repeats=1, warmup=0)
    row = kernels.bench_precondition((2, 8, 12), cpu, once, once, None)
    for key in ("copy_s", "torch_selection_s", "torch_apply_s", "torch_precondition_s", "kernel_selection_s",
                "kernel_apply_s", "triton_precondition_s"):
        assert row[key] > 0, key
    assert row["speedup_vs_torch"] == row["torch_precondition_s"] / row["triton_precondition_s"]
    assert row["bandwidth_vs_copy"] == row["copy_s"] / row["kernel_apply_s"]
    assert row["max_rel_diff"] <= 1e-6

    skipped = kernels.bench_precondition((2, 8, 12), cpu, once, None, "why")
    assert skipped["triton_skipped"] == "why" and "kernel_apply_s" not in skipped
    stats = kernels.bench_rotated_stats((2, 8, 12), cpu, once, once, None)
    assert stats["torch_s"] > 0 and stats["kernel_s"] > 0


def _result(device_type: str, bandwidth: float | None) -> dict:
    row = {"shape": [48, 768, 768]}
    if bandwidth is not None:
        row.update(bandwidth_vs_copy=bandwidth, speedup_vs_torch=3.5)
    return {"machine": {"device_type": device_type}, "precondition": [row],
            "training_step": {"bregtop_added_to_training_step": 0.12}}


def test_targets_are_judged_only_on_a_gpu():
    got = {g["figure"]: g for g in kernels.check_targets(_result("cuda", 0.69))}
    assert got["bandwidth_vs_copy"]["met"] is False and got["bandwidth_vs_copy"]["target"] == ">= 0.7"
    assert got["speedup_vs_torch"]["met"] is True
    assert got["bregtop_added_to_training_step"]["met"] is False and got["bregtop_added_to_training_step"]["shape"] is None

    on_cpu = kernels.check_targets(_result("cpu", 0.9))
    assert all(g["met"] is None for g in on_cpu)
    assert "not judged" in kernels.target_line(on_cpu[0])
    unmeasured = kernels.check_targets(_result("cuda", None))
    assert [g["value"] for g in unmeasured[:2]] == [None, None]
    assert "not measured" in kernels.target_line(unmeasured[0])
