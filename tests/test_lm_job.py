"""launch.lm's schedule, clipping, logging and outputs, through ``lm.main`` at tiny sizes: the lr
of each step is torch's warm-up + cosine value and resumes exactly from a checkpoint, tiny
``--grad-clip`` bounds AdamW's update, the train loss is the interval mean, summary.json is
typed, loss.png is a PNG, and a terminal gets a progress bar."""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest
import torch

from launch import checkpoints, lm

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny", "--block-size", "16", "--batch-size", "4", "--eval-batches", "1", "--method", "adamw"]
LR, WARMUP, STEPS, MIN_RATIO = 1e-3, 2, 6, 0.1
COSINE = ["--lr", str(LR), "--schedule", "cosine", "--warmup-steps", str(WARMUP), "--min-lr-ratio", str(MIN_RATIO),
          "--max-steps", str(STEPS), "--eval-every", "1", "--ckpt-every", "3"]
PNG = b"\x89PNG\r\n\x1a\n"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text((ROOT / "data/lm/tinyshakespeare/input.txt").read_text()[:20000])
    return path


@pytest.fixture(scope="module")
def cosine_run(tmp_path_factory, text) -> tuple[Path, list[str]]:
    """One 6-step AdamW run with warm-up + cosine, a log line every step, checkpoints at 3 and 6."""
    root = tmp_path_factory.mktemp("lm")
    common = [*TINY, *COSINE, "--data", str(text), "--cache-dir", str(root / "cache")]
    assert lm.main([*common, "--out", str(root / "straight")]) == 0
    return root / "straight", common


def _torch_schedule() -> list[float]:
    """The lr of each step from torch's schedulers, on a one-parameter SGD."""
    from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = SequentialLR(opt, [LinearLR(opt, 1.0 / (WARMUP + 1), 1.0, WARMUP),
                               CosineAnnealingLR(opt, STEPS - WARMUP, LR * MIN_RATIO)], [WARMUP])
    lrs = []
    for _ in range(STEPS):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


def test_lr_of_each_step_is_torchs_warmup_cosine_value(cosine_run):
    out, _ = cosine_run
    rows = _rows(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    logged = [r["lr"] for r in rows]
    assert logged == _torch_schedule()
    assert logged[:WARMUP + 1] == pytest.approx([LR / 3, 2 * LR / 3, LR])  # linear warm-up, then the peak
    from transformers import get_cosine_with_min_lr_schedule_with_warmup  # an independent closed form

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    hf = get_cosine_with_min_lr_schedule_with_warmup(opt, WARMUP, STEPS, min_lr_rate=MIN_RATIO)
    closed = [LR * hf.lr_lambdas[0](k) for k in range(STEPS)]
    assert logged[WARMUP:] == pytest.approx(closed[WARMUP:], rel=1e-12)


def test_resume_continues_the_schedule_exactly_and_refuses_another_horizon(cosine_run, tmp_path, capsys):
    """Resume from the straight run's step-3 checkpoint: steps 4-6 repeat it exactly, lr included."""
    out, common = cosine_run
    step3 = checkpoints.step_dir(out / "ckpt", 3)
    shutil.copytree(step3, checkpoints.step_dir(tmp_path / "ckpt", 3))
    assert lm.main([*common, "--out", str(tmp_path), "--resume"]) == 0
    resumed, straight = _rows(tmp_path / "metrics.jsonl"), _rows(out / "metrics.jsonl")[3:]
    assert [r["step"] for r in resumed] == [4, 5, 6]
    for a, b in zip(resumed, straight):
        assert (a["lr"], a["train_loss"], a["val_loss"]) == (b["lr"], b["train_loss"], b["val_loss"])
    assert json.loads((tmp_path / "summary.json").read_text())["resumed_from"] == 3

    capsys.readouterr()
    assert lm.main([*common, "--out", str(tmp_path), "--resume", "--max-steps", "9"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--resume: max_steps=9 differs from the checkpoint's 6" in err and "\n" not in err


def test_summary_holds_typed_values_and_loss_png_is_written(cosine_run):
    out, _ = cosine_run
    summary = json.loads((out / "summary.json").read_text())
    config = summary["config"]
    assert config["optimizer"]["lr"] == LR and config["optimizer"]["betas"] == [0.9, 0.98]  # BregTopConfig, nested
    assert config["max_steps"] == STEPS and config["warmup_steps"] == WARMUP
    assert config["resume"] is False and config["cpu"] is False and config["grad_clip"] == 0.0
    assert config["dataset"] is None and config["deepspeed"] is None and config["layers"] is None
    assert isinstance(config["data"], str) and isinstance(config["out"], str) and config["schedule"] == "cosine"
    assert summary["final_step"] == STEPS and summary["resumed_from"] is None and summary["grad_norm"] is None
    assert isinstance(summary["parameters"], int) and summary["processes"] == 1
    assert summary["val_loss"] == _rows(out / "metrics.jsonl")[-1]["val_loss"]
    assert summary["val_ppl"] == pytest.approx(math.exp(summary["val_loss"]))
    assert summary["train_ms_per_step"] > 0 and summary["wall_time_s"] > 0
    marker = checkpoints.latest(out / "ckpt")[1]
    assert marker["config"] == config  # the checkpoint's settings are typed too
    png = (out / "loss.png").read_bytes()
    assert png.startswith(PNG) and len(png) > 5000


def test_train_loss_is_the_mean_since_the_last_line(cosine_run, tmp_path):
    """Logged every 3 steps, the train loss is the mean of the 3 per-step losses logged above."""
    out, common = cosine_run
    assert lm.main([*common, "--eval-every", "3", "--out", str(tmp_path)]) == 0  # the last --eval-every wins
    per_step, rows = _rows(out / "metrics.jsonl"), _rows(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [3, 6]
    for row, chunk in zip(rows, (per_step[:3], per_step[3:])):
        assert row["train_loss"] == pytest.approx(sum(r["train_loss"] for r in chunk) / 3, rel=1e-6)
        assert row["lr"] == chunk[-1]["lr"] and row["ms_per_step"] > 0


def test_tiny_grad_clip_bounds_the_adamw_update_and_a_terminal_gets_a_bar(text, tmp_path, capsys, monkeypatch):
    """Gradients clipped to a global norm c move AdamW's weights by at most lr * c / eps per step
    (|m| <= c, sqrt(v) >= 0), far less than the lr an unclipped step moves them by."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    clip, lr, eps = 1e-10, 1e-2, 1e-8
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert lm.main([*TINY, "--data", str(text), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path),
                    "--lr", str(lr), "--grad-clip", str(clip), "--max-steps", "4", "--eval-every", "2",
                    "--ckpt-every", "2"]) == 0
    rows = _rows(tmp_path / "metrics.jsonl")
    assert all(r["grad_norm"] > 1e6 * clip for r in rows)  # the norm before clipping: the clip did bite
    weights = []
    for step in (2, 4):
        dcp_to_torch_save(checkpoints.step_dir(tmp_path / "ckpt", step), tmp_path / f"{step}.pt")
        weights.append(torch.load(tmp_path / f"{step}.pt", weights_only=True)["model"])
    moved = max(float((weights[1][k] - weights[0][k]).abs().max()) for k in weights[0])
    assert 0 < moved <= 2 * lr * clip / eps
    printed = capsys.readouterr().out
    assert "4/4" in printed and ("step/s" in printed or "s/step" in printed)  # tqdm's bar
    assert "     2" in printed and "val ppl" in printed  # the log lines above it
