"""launch.sst2's report from a synthetic run (no training): the plot shows each row's raw loss
faintly under its bias-corrected EMA with the target in the legend, and the printed table has
the paper's column only for rows run to the protocol's length."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from launch import sst2


def _summary_and_metrics(tmp_path: Path, max_steps: int) -> tuple[dict, Path]:
    losses = {"kl": [0.30, 0.20, 0.25, 0.10], "bregtop-vn-v2": [0.28, 0.15, 0.12, 0.05]}
    summary, lines = {}, []
    for method, values in losses.items():
        key = sst2.row_key(method, 0)
        summary[key] = {"method": method, "seed": 0, "steps_to_target": None, "final_ema_loss": values[-1],
                        "dev_accuracy": 0.5, "wall_time_s": 1.0, "settings": {"max_steps": str(max_steps)}}
        lines += [json.dumps({"method": method, "seed": 0, "step": i + 1, "loss": v, "ema": v})
                  for i, v in enumerate(values)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return summary, path


def test_debiased_ema_starts_at_the_first_loss_and_corrects_the_zero_start():
    assert sst2.debiased_ema([0.7, 0.7, 0.7], 0.98) == pytest.approx([0.7, 0.7, 0.7])
    smoothed = sst2.debiased_ema([1.0, 3.0], 0.5)
    assert smoothed == pytest.approx([1.0, (0.5 * 0.5 * 1.0 + 0.5 * 3.0) / (1 - 0.25)])


def test_plot_shows_raw_loss_faintly_under_the_debiased_ema_with_the_target(tmp_path):
    import matplotlib.pyplot as plt

    summary, metrics = _summary_and_metrics(tmp_path, 30)
    fig = sst2.loss_figure(summary, metrics, 0.05, 0.98)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["kl", "bregtop-vn-v2", "target 0.05"]
    raw = [line for line in ax.get_lines() if line.get_alpha() is not None]
    smooth = [line for line in ax.get_lines() if line.get_alpha() is None and len(line.get_xdata()) == 4]
    assert [list(line.get_ydata()) for line in raw] == [[0.30, 0.20, 0.25, 0.10], [0.28, 0.15, 0.12, 0.05]]
    assert all(line.get_alpha() <= 0.3 for line in raw)
    for r, s in zip(raw, smooth):
        assert list(s.get_ydata()) == pytest.approx(sst2.debiased_ema(list(r.get_ydata()), 0.98))
        assert s.get_color() == r.get_color() and ax.get_lines().index(r) < ax.get_lines().index(s)  # drawn under
    plt.close(fig)
    sst2.plot(summary, metrics, 0.05, tmp_path / "ema_loss.png")
    assert (tmp_path / "ema_loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize("max_steps, shown", [(30, False), (1999, False), (2000, True), (3000, True)])
def test_table_has_the_paper_column_only_for_full_length_runs(tmp_path, max_steps, shown):
    summary, _ = _summary_and_metrics(tmp_path, max_steps)
    table = sst2.format_table(summary)
    head, rows = table.splitlines()[0], table.splitlines()[2:]
    assert ("paper" in head) == shown
    assert (str(sst2.PAPER_TABLE4["kl"]) in rows[0]) == shown


def test_table_marks_short_rows_beside_a_full_length_one(tmp_path):
    summary, _ = _summary_and_metrics(tmp_path, 3000)
    summary["kl/seed0"]["settings"]["max_steps"] = "30"
    kl, bregtop = sst2.format_table(summary).splitlines()[2:]
    assert str(sst2.PAPER_TABLE4["kl"]) not in kl and str(sst2.PAPER_TABLE4["bregtop-vn-v2"]) in bregtop
