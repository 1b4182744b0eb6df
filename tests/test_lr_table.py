"""launch.lr_table: final loss against lr over seeds, from hand-made lm_compare results."""

from __future__ import annotations

import json
from pathlib import Path

from launch import lr_table


def _run(method: str, lr: float, loss: float | None) -> dict:
    return {"method": method, "lr": lr, "steps": 10, "diverged": loss is None, "final_val_loss": loss,
            "seconds_per_step": 0.1, "curve": {}}


def _write(folder: Path, seed: int, sweep: list[dict], sweep_steps: int = 10) -> Path:
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(
        {"settings": {"steps": 10, "sweep_steps": sweep_steps, "seed": seed}, "sweep": sweep}))
    return folder


def test_means_ranges_best_lr_and_divergence(tmp_path, capsys):
    a = _write(tmp_path / "a", 0, [_run("adamw", 1e-3, 5.0), _run("adamw", 1e-2, 4.0),
                                    _run("kl", 1e-3, 3.0), _run("kl", 1e-2, None)])
    b = _write(tmp_path / "b", 1, [_run("adamw", 1e-3, 6.0), _run("adamw", 1e-2, 4.5),
                                    _run("kl", 1e-3, 3.5), _run("kl", 1e-2, 2.0)])
    assert lr_table.main([str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "| adamw | 5.500 (5.000-6.000) | **4.250 (4.000-4.500)** | 0.01 |" in out
    # one seed diverged at 1e-2: that lr cannot be kl's best although its other seed is lowest
    assert "| kl | **3.250 (3.000-3.500)** | 2.000, 1 diverged | 0.001 |" in out
    assert "seeds 0, 1" in out


def test_a_sweep_shorter_than_the_runs_is_refused(tmp_path, capsys):
    a = _write(tmp_path / "a", 0, [_run("adamw", 1e-3, 5.0)], sweep_steps=5)
    assert lr_table.main([str(a)]) == 2
    assert "sweep_steps=5 but steps=10" in capsys.readouterr().err
