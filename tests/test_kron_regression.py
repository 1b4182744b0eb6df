"""launch.kron_regression's ratios: tuned is each scale's own best lr, carried the lr best at
scale 1, both over AdamW's best at the same scale and seed."""

from __future__ import annotations

import random

from launch.kron_regression import markdown, ratios


def test_tuned_takes_each_scales_best_and_carried_the_lr_best_at_scale_one():
    rng = random.Random()
    lrs = ["0.01", "0.1", "1.0"]
    losses: dict = {"adamw": {}, "kl first-gradient": {}}
    for seed in ("0", "1"):
        adamw_best = {s: rng.uniform(1.0, 2.0) for s in ("0.01", "1.0", "100.0")}
        losses["adamw"][seed] = {s: {lr: adamw_best[s] * (1 + k) for k, lr in enumerate(lrs)} for s in adamw_best}
        # kl: at scale 1 the middle lr is best; at 0.01 the largest lr, at 100 the smallest
        kl = {"1.0": [3.0, 1.0, 2.0], "0.01": [9.0, 4.0, 0.5], "100.0": [0.25, 8.0, 9.0]}
        losses["kl first-gradient"][seed] = {s: dict(zip(lrs, [v * adamw_best[s] for v in vals], strict=True))
                                             for s, vals in kl.items()}
    table = ratios(losses)
    kl = table["kl first-gradient"]
    assert kl["1.0"] == {"tuned": [1.0, 1.0], "carried": [1.0, 1.0]}
    assert kl["0.01"]["tuned"] == [0.5, 0.5] and kl["0.01"]["carried"] == [4.0, 4.0]
    assert kl["100.0"]["tuned"] == [0.25, 0.25] and kl["100.0"]["carried"] == [8.0, 8.0]
    assert table["adamw"]["100.0"] == {"tuned": [1.0, 1.0], "carried": [1.0, 1.0]}
    text = markdown(table, [0, 1])
    assert "| kl first-gradient | 0.5 (0.5-0.5) | 4 (4-4) | 1 (1-1) | 1 (1-1) | 0.25 (0.25-0.25) | 8 (8-8) |" in text
