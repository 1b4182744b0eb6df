"""launch.lm_study: the sweep protocol (which runs it asks for, and when an lr is settled) on
made-up results, the run files (written, read back, refused when wrong), workers' claims, a
tiny run equal to lm_compare's run bit for bit, and the report's paired figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from launch import lm_study
from launch.lm_compare import Curve, Run, load_data, train_together
from launch.lm_study import (
    LADDER,
    SWEEP_SEED,
    Job,
    StudyConfig,
    best_lr,
    pending,
    read_results,
    report,
    sweep_jobs,
)

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")


def made_up(method: str, lr: float, final: float | None, diverged: bool = False, per_step: float = 1.0,
            losses: tuple[float, ...] | None = None) -> Run:
    """A 4-step run evaluated every 2 steps; its curve falls from 10 to ``final`` unless given."""
    if losses is None:
        losses = (10.0, (10.0 + (final or 10.0)) / 2, final or 10.0)
    curve = Curve([0, 2, 4][:len(losses)], [0.0, 2 * per_step, 4 * per_step][:len(losses)], list(losses),
                  [None] + list(losses[1:]))
    return Run(method, lr, 4, diverged, None if diverged else final, per_step, curve)


def sweep(data: str, method: str, finals: dict[float, float | None]) -> dict[Job, Run]:
    """Seed-0 runs of ``method`` on ``data``: lr -> final loss (None: diverged)."""
    return {Job(data, method, lr, SWEEP_SEED): made_up(method, lr, f, diverged=f is None) for lr, f in finals.items()}


def test_a_sweep_asks_for_its_grid_first():
    jobs, best = sweep_jobs("wikitext-2", "kl", {})
    assert best is None
    assert jobs == [Job("wikitext-2", "kl", lr, 0) for lr in (3e-3, 1e-2, 3e-2)]
    half = sweep("wikitext-2", "kl", {3e-3: 5.0})
    assert sweep_jobs("wikitext-2", "kl", half) == ([Job("wikitext-2", "kl", lr, 0) for lr in (1e-2, 3e-2)], None)
    assert [j.lr for j in sweep_jobs("tiny-shakespeare", "adamw", {})[0]] == [1e-3, 3e-3, 1e-2]
    assert [j.lr for j in sweep_jobs("tiny-shakespeare", "kl+graft", {})[0]] == [1e-3, 3e-3, 1e-2]  # AdamW's grid


def test_a_best_lr_at_an_edge_extends_the_sweep_by_one_rung_until_it_is_inside():
    done = sweep("wikitext-2", "kl", {3e-3: 5.4, 1e-2: 5.3, 3e-2: 5.2})  # best at the top
    assert sweep_jobs("wikitext-2", "kl", done) == ([Job("wikitext-2", "kl", 1e-1, 0)], None)
    done |= sweep("wikitext-2", "kl", {1e-1: 5.1})  # still the top: once more
    assert sweep_jobs("wikitext-2", "kl", done) == ([Job("wikitext-2", "kl", 3e-1, 0)], None)
    done |= sweep("wikitext-2", "kl", {3e-1: 5.15})  # now inside
    assert sweep_jobs("wikitext-2", "kl", done) == ([], 1e-1)

    low = sweep("wikitext-2", "adamw", {1e-3: 5.0, 3e-3: 5.1, 1e-2: 5.2})  # best at the bottom
    assert sweep_jobs("wikitext-2", "adamw", low) == ([Job("wikitext-2", "adamw", 3e-4, 0)], None)
    top = sweep("wikitext-2", "kl", {3e-3: 6.1, 1e-2: 6.0, 3e-2: 5.9, 1e-1: 5.8, 3e-1: 5.7})
    assert sweep_jobs("wikitext-2", "kl", top) == ([], LADDER[-1])  # the ladder's end: settled there


def test_a_diverged_run_is_never_best_and_a_sweep_that_only_diverged_settles_nothing():
    done = sweep("wikitext-2", "kl", {3e-3: 5.4, 1e-2: 5.3, 3e-2: None})
    assert best_lr({j.lr: r for j, r in done.items()}) == 1e-2
    assert sweep_jobs("wikitext-2", "kl", done) == ([], 1e-2)  # diverged at the top edge: the best is inside
    dead = sweep("wikitext-2", "kl", {3e-3: None, 1e-2: None, 3e-2: None})
    assert sweep_jobs("wikitext-2", "kl", dead) == ([], None)
    assert pending(["kl"], ["wikitext-2"], StudyConfig(), dead) == []


def test_seeds_follow_seed_zeros_best_lr_method_by_method():
    done = sweep("wikitext-2", "adamw", {1e-3: 5.6, 3e-3: 5.4, 1e-2: 5.5})
    done[Job("wikitext-2", "adamw", 3e-3, 1)] = made_up("adamw", 3e-3, 5.41)
    jobs = pending(["adamw", "kl"], ["wikitext-2", "tiny-shakespeare"], StudyConfig(), done)
    assert jobs[0] == Job("wikitext-2", "adamw", 3e-3, 2)  # seed 1 is done
    assert jobs[1:4] == [Job("tiny-shakespeare", "adamw", lr, 0) for lr in (1e-3, 3e-3, 1e-2)]
    assert jobs[4:] == [Job(d, "kl", lr, 0) for d in ("wikitext-2", "tiny-shakespeare") for lr in (3e-3, 1e-2, 3e-2)]
    assert pending(["adamw"], ["wikitext-2"], StudyConfig(seeds=(0, 1)), done) == []


def write_run(out: Path, job: Job, run: Run, cfg: StudyConfig, change: dict | None = None) -> Path:
    record = {"data": job.data, "seed": job.seed, "settings": cfg.record(), "run": asdict(run)} | (change or {})
    path = job.path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record))
    return path


def test_run_files_read_back_and_wrong_ones_are_refused_by_name(tmp_path):
    cfg = StudyConfig()
    job = Job("wikitext-2", "kl", 1e-2, 1)
    run = made_up("kl", 1e-2, 5.25)
    write_run(tmp_path, job, run, cfg)
    assert read_results(tmp_path, cfg) == {job: run}

    with pytest.raises(ValueError, match=r"written with settings .*'steps': 500.*this study's are .*'steps': 400"):
        read_results(tmp_path, StudyConfig(steps=400))

    moved = tmp_path / "tiny-shakespeare" / "seed1" / "kl@0.01.json"
    moved.parent.mkdir(parents=True)
    job.path(tmp_path).rename(moved)
    with pytest.raises(ValueError, match=r"kl@0.01.json: holds .*'wikitext-2'.*belongs at .*wikitext-2/seed1/kl@0.01"):
        read_results(tmp_path, cfg)
    moved.unlink()

    write_run(tmp_path, job, run, cfg, {"run": {"method": "kl"}})
    with pytest.raises(ValueError, match=r"kl@0.01.json: not a run file of launch.lm_study \(KeyError\('lr'\)"):
        read_results(tmp_path, cfg)
    job.path(tmp_path).write_text("{not json")
    with pytest.raises(ValueError, match="not a run file of launch.lm_study"):
        read_results(tmp_path, cfg)

    bad = made_up("kl", 1e-2, 5.25)
    bad.final_val_loss = math.inf
    write_run(tmp_path, job, bad, cfg)
    with pytest.raises(ValueError, match=r"final_val_loss=inf \(a finished run's loss is finite\)"):
        read_results(tmp_path, cfg)
    other = Job("wikitext-2", "no-such-method", 1e-2, 0)
    job.path(tmp_path).unlink()
    write_run(tmp_path, other, made_up("no-such-method", 1e-2, 5.0), cfg)
    with pytest.raises(ValueError, match="no-such-method"):
        read_results(tmp_path, cfg)


def test_a_bad_study_config_is_refused_by_name():
    with pytest.raises(ValueError, match="preset='huge' is not allowed; use one of"):
        StudyConfig(preset="huge")
    with pytest.raises(ValueError, match="steps=0 must be an integer >= 1"):
        StudyConfig(steps=0)
    with pytest.raises(ValueError, match=r"seeds=\[1, 2\] must include the sweep seed 0"):
        StudyConfig(seeds=(1, 2))


@pytest.fixture
def tiny_study(tmp_path, monkeypatch):
    """A study on the first 20k characters of Tiny Shakespeare, 4 steps a run."""
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "data/lm/tinyshakespeare/input.txt").read_text()[:20000])
    monkeypatch.setattr(lm_study, "DATA_SETS", {"tiny": text})
    cfg = StudyConfig(steps=4, eval_every=2, eval_batches=1, batch_size=2, seeds=(0, 1))
    return cfg, text, tmp_path / "out", tmp_path / "cache"


def test_a_study_run_equals_lm_compares_run_bit_for_bit(tiny_study):
    cfg, text, out, cache = tiny_study
    job = Job("tiny", "kl", 3e-3, 1)
    mine = lm_study.train(job, cfg, out, CPU, cache)
    theirs, = train_together([("kl", 3e-3)], cfg.steps, load_data(text, cache), cfg.setup(1, CPU), log=False)
    assert mine.curve.val_loss == theirs.curve.val_loss and mine.curve.train_loss == theirs.curve.train_loss
    assert mine.curve.steps == [0, 2, 4] and mine.final_val_loss == theirs.final_val_loss
    back = read_results(out, cfg)[job]
    assert back.curve.val_loss == mine.curve.val_loss and back.final_val_loss == mine.final_val_loss
    record = json.loads(job.path(out).read_text())
    assert record["optimizer"]["class"].endswith(".BregTop") and record["seed"] == 1 and record["data"] == "tiny"
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("*.claim"))


def test_workers_skip_runs_a_live_worker_claims_and_take_over_a_dead_ones(tiny_study, capsys):
    cfg, _, out, cache = tiny_study
    first, second = pending(["adamw"], ["tiny"], cfg, {})[:2]
    live = first.path(out).with_suffix(".claim")
    live.parent.mkdir(parents=True)
    live.write_text(str(os.getpid()))  # this process is alive: another worker has it
    assert lm_study.run_study(["adamw"], ["tiny"], cfg, out, CPU, cache, limit=1) == 0
    assert not first.path(out).exists() and second.path(out).exists()
    assert not second.path(out).with_suffix(".claim").exists()

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    live.write_text(gone.stdout.strip())  # its process has ended
    assert lm_study.run_study(["adamw"], ["tiny"], cfg, out, CPU, cache, limit=1) == 0
    assert first.path(out).exists() and not live.exists()
    assert "train tiny seed 0 adamw lr 0.001" in capsys.readouterr().out


def test_the_report_pairs_each_seed_with_adamws(tmp_path):
    cfg = StudyConfig(steps=4, eval_every=2, seeds=(0, 1))
    done: dict[Job, Run] = {}
    # adamw: finals 5.0 (seed 0) and 6.0 (seed 1); kl: 4.5 and 5.9, twice as slow per step
    for seed, (a, k) in enumerate(((5.0, 4.5), (6.0, 5.9))):
        done[Job("wikitext-2", "adamw", 3e-3, seed)] = made_up("adamw", 3e-3, a, losses=(10.0, 7.0, a))
        done[Job("wikitext-2", "kl", 1e-2, seed)] = made_up("kl", 1e-2, k, per_step=2.0, losses=(10.0, a, k))
    done |= sweep("wikitext-2", "adamw", {1e-3: 5.7, 1e-2: 5.5})
    done |= sweep("wikitext-2", "kl", {3e-3: None, 3e-2: 4.6})  # 3e-3 diverged
    text = report(done, cfg)
    assert "| adamw | 5.700 | **5.000** | 5.500 | - |" in text and "| kl | - | diverged | **4.500** | 4.600 |" in text
    kl = next(line for line in text.splitlines() if line.startswith("| kl | 0.01 |"))
    cells = [c.strip() for c in kl.strip("|").split("|")]
    assert cells[2] == "2"  # seeds
    assert cells[5] == "5.200 (4.500 to 5.900)"  # final
    assert cells[6] == "-0.300 (-0.500 to -0.100)"  # paired differences with adamw
    assert cells[7] == "2 (2 to 2)"  # kl reaches adamw's final loss at step 2 on each seed
    assert cells[8] == "2.00 (2.00 to 2.00)"  # s/step over adamw's
    # adamw's 4 steps take 4 s; kl's curve at 4 s is its step-2 evaluation, adamw's final
    assert cells[9] == "5.500 (5.000 to 6.000)"


def test_the_report_pairs_the_studys_questions_seed_by_seed():
    cfg = StudyConfig(steps=4, eval_every=2, seeds=(0, 1, 2))
    done = {Job("tiny-shakespeare", "kl", 1e-2, s): made_up("kl", 1e-2, f) for s, f in enumerate((5.0, 5.2, 5.1))}
    done |= {Job("tiny-shakespeare", "kl+avg", 1e-2, s): made_up("kl+avg", 1e-2, f) for s, f in ((0, 4.9), (2, 5.15))}
    done |= sweep("tiny-shakespeare", "kl", {3e-3: 5.5, 3e-2: 5.6}) | sweep("tiny-shakespeare", "kl+avg", {3e-3: 5.5, 3e-2: 5.6})
    done |= sweep("tiny-shakespeare", "kl+unit", {3e-3: 4.0})  # swept at one lr of three: not settled
    text = report(done, cfg)
    assert "| kl+avg minus kl | -0.100 | - | +0.050 | -0.025 | 1 of 2 |" in text  # seed 1 not run: left out
    assert "| kl+unit (sweep unfinished) | **4.000** | - | - |" in text
    assert "kl+unit minus kl" not in text and "| kl+unit | 0.003 |" not in text  # its lr is not settled yet
