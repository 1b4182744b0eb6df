"""``python -m launch.lm_study``: issue 28's language-model study, one run per file, resumable.

``launch.lm_compare`` trains a handful of optimizers in one process and writes nothing until
the last one ends; the study behind the README's recommendations (both shipped data sets,
three seeds, an lr sweep per method, about ten methods: over a hundred 500-step runs, hours
of CPU) does not fit one sitting. This job trains the same GPT with the same optimizers
(lm_compare's ``Trainer``, so a run here equals the run there bit for bit) one (data set,
method, lr, seed) at a time and writes each finished run to
``OUT/<data set>/seed<S>/<method>@<lr>.json``. A later invocation skips what is there, so a
study spread over several sessions, or over two workers on two cores, loses at most the runs
in progress.

The protocol, per data set and method:

- **lr sweep on seed 0** over the method's grid (:data:`GRIDS`); when the best lr is at an end
  of the lrs tried, the next rung of :data:`LADDER` past it is tried too, until the best is
  inside (a diverged run is never the best);
- **seeds 1 and 2 at seed 0's best lr**.

``python -m launch.lm_study run`` trains what is missing (methods in the order given, each on
every data set before the next method starts, so the first methods reach three seeds first);
``python -m launch.lm_study report`` prints the tables: the sweep, then per method at its best
lr the final validation loss over the seeds (mean and range), its difference from AdamW's on
the same seed, validation loss at equal steps, and steps to AdamW's final validation loss.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from launch.bench import code_version, machine_info
from launch.jobconfig import check_positive
from launch.lm_compare import (
    ALL_METHODS,
    BASELINE,
    PRESETS,
    Curve,
    Run,
    Setup,
    Trainer,
    load_data,
    loss_at_step,
    loss_at_time,
    optimizer_settings,
    steps_to_target,
)
from launch.lm_data import DEFAULT_TEXT, ROOT

DATA_SETS = {
    "wikitext-2": ROOT / "lm" / "wikitext-2-tokens" / "test.txt",
    "tiny-shakespeare": DEFAULT_TEXT,
}
"""name -> the shipped text it trains on (GPT-2 BPE; the last tenth is validation)."""

LADDER = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
"""Every lr a sweep may try: roughly half a decade apart."""

DIAGONAL_GRID = (1e-3, 3e-3, 1e-2)
KRONECKER_GRID = (3e-3, 1e-2, 3e-2)
GRIDS = {
    "adamw": DIAGONAL_GRID,
    "soap": DIAGONAL_GRID,
    "soap-heavyball": DIAGONAL_GRID,
}
"""Each method's first lrs (rungs of :data:`LADDER`). Grafted BregTop rows (``+graft``) start at
AdamW's grid, since grafting is meant to carry AdamW's lr over; other BregTop rows at
:data:`KRONECKER_GRID` (kl was best at the top of AdamW's grid on WikiText-2)."""

SWEEP_SEED = 0
PRIORITY = ("adamw", "kl", "kl+avg", "bregtop-vn-v2", "soap", "kl+graft", "kl+unit", "vn-v2",
            "bregtop-vn-v2+avg", "soap-heavyball", "bregtop-vn-v2+graft", "bregtop-vn-v2+unit", "vn-v2+avg")
"""The default methods, in the order they are trained."""


def grid(method: str) -> tuple[float, ...]:
    """The lrs ``method`` is swept over first."""
    if method in GRIDS:
        return GRIDS[method]
    return DIAGONAL_GRID if method.endswith("+graft") else KRONECKER_GRID


@dataclass(frozen=True)
class StudyConfig:
    """What every run of a study shares; a run file written under other settings is refused."""

    preset: str = "tiny"
    steps: int = 500
    eval_every: int = 50
    eval_batches: int = 16
    batch_size: int = 8
    warmup_fraction: float = 0.1
    seeds: tuple[int, ...] = (0, 1, 2)
    split_qkv: bool = True

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not allowed; use one of {', '.join(PRESETS)}")
        check_positive(self, ("steps", "eval_every", "eval_batches", "batch_size"))
        if SWEEP_SEED not in self.seeds:
            raise ValueError(f"seeds={list(self.seeds)} must include the sweep seed {SWEEP_SEED}")

    def setup(self, seed: int, device: torch.device) -> Setup:
        return Setup(PRESETS[self.preset], self.batch_size, self.eval_every, self.eval_batches,
                     self.warmup_fraction, seed, device, self.split_qkv)

    def record(self) -> dict[str, Any]:
        """The settings a run file carries (and must match to be read back)."""
        return {**dataclasses.asdict(self), "seeds": None, "dims": list(PRESETS[self.preset])}


@dataclass(frozen=True)
class Job:
    """One run of the study."""

    data: str
    method: str
    lr: float
    seed: int

    def path(self, out: Path) -> Path:
        return out / self.data / f"seed{self.seed}" / f"{self.method}@{self.lr:g}.json"


# ------------------------------------------------------------------------------ reading results
def _run_from(record: dict[str, Any]) -> Run:
    c = record["curve"]
    curve = Curve([int(s) for s in c["steps"]], [float(s) for s in c["seconds"]], [float(v) for v in c["val_loss"]],
                  [None if v is None else float(v) for v in c["train_loss"]])
    final = record["final_val_loss"]
    return Run(str(record["method"]), float(record["lr"]), int(record["steps"]), bool(record["diverged"]),
               None if final is None else float(final), float(record["seconds_per_step"]), curve)


def read_results(out: Path, cfg: StudyConfig) -> dict[Job, Run]:
    """Every run file under ``out``; a ValueError names a file that is malformed, was written
    under other settings than ``cfg``, or whose name disagrees with its contents."""
    found: dict[Job, Run] = {}
    expected = cfg.record()
    for path in sorted(out.glob("*/seed*/*.json")):
        try:
            record = json.loads(path.read_text())
            job = Job(str(record["data"]), str(record["run"]["method"]), float(record["run"]["lr"]), int(record["seed"]))
            run = _run_from(record["run"])
            settings = record["settings"]
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a run file of launch.lm_study ({err!r})") from err
        if settings != expected:
            raise ValueError(f"{path}: written with settings {settings}, this study's are {expected}")
        if job.path(out) != path or job.data not in DATA_SETS or job.method not in ALL_METHODS:
            raise ValueError(f"{path}: holds {job}, which belongs at {job.path(out)} (data sets: "
                             f"{', '.join(DATA_SETS)})")
        if run.final_val_loss is not None and not math.isfinite(run.final_val_loss):
            raise ValueError(f"{path}: final_val_loss={run.final_val_loss} (a finished run's loss is finite)")
        found[job] = run
    return found


# ------------------------------------------------------------------------------ the protocol
def best_lr(runs: dict[float, Run]) -> float | None:
    """The lr of the lowest final validation loss among runs that did not diverge."""
    finite = {lr: r.final_val_loss for lr, r in runs.items() if not r.diverged and r.final_val_loss is not None}
    return min(finite, key=lambda lr: finite[lr]) if finite else None


def _rung(lr: float, step: int) -> float | None:
    i = min(range(len(LADDER)), key=lambda k: abs(math.log(LADDER[k] / lr)))
    return LADDER[i + step] if 0 <= i + step < len(LADDER) else None


def sweep_jobs(data: str, method: str, done: dict[Job, Run]) -> tuple[list[Job], float | None]:
    """The seed-0 runs still needed to settle ``method``'s lr on ``data``, and that lr once
    settled (None until then, or when every lr diverged)."""
    todo = [Job(data, method, lr, SWEEP_SEED) for lr in grid(method)]
    missing = [j for j in todo if j not in done]
    if missing:
        return missing, None
    swept = {j.lr: r for j, r in done.items() if (j.data, j.method, j.seed) == (data, method, SWEEP_SEED)}
    best = best_lr(swept)
    if best is None:
        return [], None
    for step, edge in ((1, max(swept)), (-1, min(swept))):
        nxt = _rung(best, step)
        if best == edge and nxt is not None:
            return [Job(data, method, nxt, SWEEP_SEED)], None
    return [], best


def pending(methods: list[str], data_sets: list[str], cfg: StudyConfig, done: dict[Job, Run]) -> list[Job]:
    """The runs still to train, in the order to train them."""
    jobs: list[Job] = []
    for method in methods:
        for data in data_sets:
            sweep, best = sweep_jobs(data, method, done)
            jobs += sweep
            if best is not None:
                jobs += [j for s in cfg.seeds if s != SWEEP_SEED and (j := Job(data, method, best, s)) not in done]
    return jobs


# ------------------------------------------------------------------------------ training
def _claim(path: Path) -> bool:
    """Mark ``path`` as being trained by this process; False when another live process has it."""
    claim = path.with_suffix(".claim")
    claim.parent.mkdir(parents=True, exist_ok=True)
    if claim.exists():
        try:
            os.kill(int(claim.read_text()), 0)
            return False
        except (ValueError, ProcessLookupError):
            claim.unlink(missing_ok=True)  # its process is gone
        except PermissionError:
            return False
    try:
        with open(claim, "x") as f:
            f.write(str(os.getpid()))
    except FileExistsError:
        return False
    return True


def train(job: Job, cfg: StudyConfig, out: Path, device: torch.device, cache_dir: Path) -> Run:
    """Train ``job`` and write its run file (atomically: a file that exists is a finished run)."""
    begin, version = time.perf_counter(), code_version()
    data = load_data(DATA_SETS[job.data], cache_dir)
    trainer = Trainer(job.method, job.lr, cfg.steps, data, cfg.setup(job.seed, device))
    while trainer.running:
        trainer.advance(log=True)
    run = trainer.result()
    record = {"data": job.data, "seed": job.seed, "settings": cfg.record(), "run": dataclasses.asdict(run),
              "optimizer": optimizer_settings(job.method), "machine": machine_info(), "code_version": version,
              "threads": torch.get_num_threads(), "wall_s": time.perf_counter() - begin}
    path = job.path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(path)
    return run


def run_study(methods: list[str], data_sets: list[str], cfg: StudyConfig, out: Path, device: torch.device,
              cache_dir: Path, limit: int | None) -> int:
    """Train pending runs (not claimed by another worker) until none is left or ``limit`` ran."""
    trained = 0
    while limit is None or trained < limit:
        jobs = pending(methods, data_sets, cfg, read_results(out, cfg))
        job = next((j for j in jobs if _claim(j.path(out))), None)
        if job is None:
            print(f"nothing left to train ({len(jobs)} pending run(s) claimed by other workers)", flush=True)
            return 0
        print(f"train {job.data} seed {job.seed} {job.method} lr {job.lr:g} ({len(jobs)} pending)", flush=True)
        try:
            run = train(job, cfg, out, device, cache_dir)
        finally:
            job.path(out).with_suffix(".claim").unlink(missing_ok=True)
        print(f"  -> {'diverged' if run.diverged else f'val {run.final_val_loss:.4f}'}", flush=True)
        trained += 1
    return 0


# ------------------------------------------------------------------------------ report
def _fmt(values: list[float], fmt: str = ".3f") -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    text = f"{mean:{fmt}}"
    return text + (f" ({min(values):{fmt}} to {max(values):{fmt}})" if len(values) > 1 else "")


def _rows(done: dict[Job, Run], data: str) -> Iterator[tuple[str, float, dict[int, Run]]]:
    """(method, best lr, seed -> run at that lr) for each method swept on ``data``."""
    methods = list(dict.fromkeys(j.method for j in done if j.data == data))
    for method in sorted(methods, key=lambda m: PRIORITY.index(m) if m in PRIORITY else len(PRIORITY)):
        swept = {j.lr: r for j, r in done.items() if (j.data, j.method, j.seed) == (data, method, SWEEP_SEED)}
        best = best_lr(swept)
        if best is not None:
            yield method, best, {j.seed: r for j, r in done.items()
                                 if (j.data, j.method, j.lr) == (data, method, best)}


def _method_row(method: str, best: float, seeds: dict[int, Run], base: dict[int, Run], quarter: list[int]) -> str:
    """One row of the per-method table: each figure over the seeds that did not diverge, the
    paired ones against the baseline's run on the same seed."""
    ok = {s: r for s, r in seeds.items() if not r.diverged and r.final_val_loss is not None}
    pairs = {s: (r, b, b.final_val_loss) for s, r in ok.items()
             if (b := base.get(s)) is not None and b.final_val_loss is not None}
    at = [[v for r in ok.values() if (v := loss_at_step(r.curve, q)) is not None] for q in quarter]
    final = [float(r.final_val_loss) for r in ok.values() if r.final_val_loss is not None]
    paired = [float(r.final_val_loss or 0.0) - target for r, _, target in pairs.values()]
    reach = [steps_to_target(r.curve, target) for r, _, target in pairs.values()]
    reached = [float(n) for n in reach if n is not None]
    missed = len(reach) - len(reached)
    reach_text = _fmt(reached, ".0f") + (f", {missed} not reached" if missed else "")
    speed = [r.seconds_per_step / b.seconds_per_step for r, b, _ in pairs.values()]
    # a run faster than the baseline's ends before the baseline's wall-clock: its final loss stands
    clock = [loss_at_time(r.curve, b.curve.seconds[-1]) or float(r.final_val_loss or 0.0)
             for r, b, _ in pairs.values()]
    diverged = len(seeds) - len(ok)
    return (f"| {method} | {best:g} | {len(seeds)}" + (f" ({diverged} diverged)" if diverged else "")
            + f" | {_fmt(at[0])} | {_fmt(at[1])} | {_fmt(final)} | {_fmt(paired, '+.3f')} | {reach_text} | "
            f"{_fmt(speed, '.2f')} | {_fmt(clock)} |")


PAIRS = (("kl+avg", "kl"), ("kl+unit", "kl"), ("bregtop-vn-v2+avg", "bregtop-vn-v2"),
         ("bregtop-vn-v2+unit", "bregtop-vn-v2"), ("vn-v2+avg", "vn-v2"), ("bregtop-vn-v2", "vn-v2"),
         ("bregtop-vn-v2+avg", "vn-v2+avg"), ("bregtop-vn-v2", "kl"), ("bregtop-vn-v2+avg", "kl+avg"),
         ("vn-v2", "kl"), ("vn-v2+avg", "kl+avg"), ("kl+graft", "kl"), ("bregtop-vn-v2+graft", "bregtop-vn-v2"),
         ("soap-heavyball", "soap"), ("kl", "soap"), ("kl+avg", "soap"), ("kl+avg", "soap-heavyball"))
"""(method, other): the questions the study answers, each read as the final validation loss of
``method`` minus ``other``'s on the same seed, each at its own best lr."""


def _pair_rows(rows: list[tuple[str, float, dict[int, Run]]], seeds: tuple[int, ...]) -> list[str]:
    by_method = {m: s for m, _, s in rows}
    lines = []
    for a, b in PAIRS:
        if a not in by_method or b not in by_method:
            continue
        diffs = {s: ra.final_val_loss - rb.final_val_loss for s in seeds
                 if (ra := by_method[a].get(s)) is not None and (rb := by_method[b].get(s)) is not None
                 and ra.final_val_loss is not None and rb.final_val_loss is not None}
        if diffs:
            per_seed = " | ".join(f"{diffs[s]:+.3f}" if s in diffs else "-" for s in seeds)
            wins = sum(d < 0 for d in diffs.values())
            lines.append(f"| {a} minus {b} | {per_seed} | {statistics.fmean(diffs.values()):+.3f} | "
                         f"{wins} of {len(diffs)} |")
    return lines


def report(done: dict[Job, Run], cfg: StudyConfig) -> str:
    """Markdown tables of every data set in ``done``."""
    lines: list[str] = []
    for data in [d for d in DATA_SETS if any(j.data == d for j in done)]:
        swept = {(j.method, j.lr): r for j, r in done.items() if j.data == data and j.seed == SWEEP_SEED}
        lrs = sorted({lr for _, lr in swept})
        every = list(_rows(done, data))
        settled = {m for m, _, _ in every if sweep_jobs(data, m, done)[1] is not None}
        rows = [row for row in every if row[0] in settled]  # the tables below: settled lrs only
        lines += [f"### {data}: lr sweep, seed {SWEEP_SEED}, final validation loss after {cfg.steps} steps", "",
                  "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
        for method, best, _ in every:
            cells = []
            for lr in lrs:
                r = swept.get((method, lr))
                text = "-" if r is None else "diverged" if r.diverged else f"{r.final_val_loss:.3f}"
                cells.append(f"**{text}**" if lr == best else text)
            unfinished = "" if method in settled else " (sweep unfinished)"
            lines.append(f"| {method}{unfinished} | " + " | ".join(cells) + " |")
        base = dict(next(((b, s) for m, b, s in rows if m == BASELINE), (None, {}))[1])
        quarter = [round(f * cfg.steps / cfg.eval_every) * cfg.eval_every for f in (0.25, 0.5)]
        lines += ["", f"### {data}: each method at its best lr, over seeds {', '.join(map(str, cfg.seeds))} "
                  "(mean, range)", "",
                  f"| method | lr | seeds | val loss at step {quarter[0]} | at {quarter[1]} | final | "
                  f"final minus {BASELINE}'s | steps to {BASELINE}'s final | s/step over {BASELINE}'s | "
                  f"val loss at {BASELINE}'s final wall-clock |", "|---|---|---|---|---|---|---|---|---|---|"]
        for method, best, seeds in rows:
            lines.append(_method_row(method, best, seeds, base, quarter))
        pairs = _pair_rows(rows, cfg.seeds)
        if pairs:
            lines += ["", f"### {data}: paired final validation loss differences (same seed, each at its best lr)",
                      "", "| difference | " + " | ".join(f"seed {s}" for s in cfg.seeds) + " | mean | first lower |",
                      "|---|" + "---|" * (len(cfg.seeds) + 2), *pairs]
        lines.append("")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m launch.lm_study", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("run", "report", "pending"))
    parser.add_argument("--out", type=Path, default=Path("docs/results/lm-study"), help="the study's folder")
    parser.add_argument("--methods", nargs="+", default=list(PRIORITY), help="in training order")
    parser.add_argument("--data-sets", nargs="+", default=list(DATA_SETS), help=", ".join(DATA_SETS))
    parser.add_argument("--limit", type=int, default=None, help="run: stop after this many runs")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--cache-dir", type=Path, default=Path("runs/cache"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bad = [m for m in args.methods if m not in ALL_METHODS] + [d for d in args.data_sets if d not in DATA_SETS]
    if bad or (args.limit is not None and args.limit <= 0):
        print(f"python -m launch.lm_study: error: {bad or args.limit} not allowed: methods are "
              f"{', '.join(ALL_METHODS)}; data sets {', '.join(DATA_SETS)}; --limit > 0", file=sys.stderr)
        return 2
    cfg = StudyConfig()
    try:
        done = read_results(args.out, cfg)
    except ValueError as err:
        print(f"python -m launch.lm_study: error: {err}", file=sys.stderr)
        return 2
    if args.command == "report":
        print(report(done, cfg), end="")
        return 0
    if args.command == "pending":
        for job in pending(args.methods, args.data_sets, cfg, done):
            print(f"{job.data} seed {job.seed} {job.method} lr {job.lr:g}")
        return 0
    return run_study(args.methods, args.data_sets, cfg, args.out, torch.device(args.device), args.cache_dir, args.limit)


if __name__ == "__main__":
    sys.exit(main())
