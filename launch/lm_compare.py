"""``python -m launch.lm_compare``: the same GPT on Tiny Shakespeare with AdamW, SOAP and BregTop.

Every method trains the same model (same initialisation, same batches in the same order, the
same warmup + cosine schedule, gradient clipping at 1.0) at the best learning rate of a small
sweep, and the script reports, against AdamW:

- validation loss at equal steps (a table at several step counts);
- validation loss at equal wall-clock time (each curve read at the same training-time budget;
  the clock counts training only, never the evaluations);
- how many steps (and seconds) each needs to reach AdamW's final validation loss.

The sweep trains every (method, lr) of the grid for ``--sweep-steps`` steps with its own
schedule and keeps, per method, the lr with the lowest validation loss at the end (a run whose
loss becomes non-finite is out). A method with one lr is not swept. When ``--sweep-steps`` equals
``--steps`` the best sweep run *is* the final run (it is not trained again).

Optimizers, all with weight decay 0 and every other setting their library's default:

- ``adamw``: ``torch.optim.AdamW`` on all parameters (betas 0.9, 0.999; eps 1e-8);
- ``soap``: ``pytorch_optimizer.SOAP`` (a port of Vyas et al.'s reference SOAP) on all
  parameters, as the reference code is used: betas (0.95, 0.95), precondition_frequency 10,
  max_precondition_dim 10000 (so the tied 50257 x dim embedding/head is preconditioned on its
  dim side only), 1-D tensors (norms, biases) get Adam;
- ``soap-heavyball``: ``heavyball.SOAP`` on all parameters, its defaults (betas (0.9, 0.95),
  shampoo_beta 0.95, max_precond_dim 2048) but precondition_frequency 10;
- BregTop methods (``bregtop-vn-v2``, ``kl``, ...): ``bregtop_dist.BregTop`` on
  ``bregtop_dist.param_groups(model)``: the matrices of the blocks are BregTop's, the tied
  embedding/head, norms and biases go to its AdamW side at the same lr; precondition_frequency 10;
  ``METHOD+graft`` runs it with ``graft="adamw"`` (each block's update at AdamW's norm),
  ``METHOD+unit`` with ``init="first-gradient-unit"``, ``METHOD+avg`` with
  ``init="first-gradient-averaged"``. Fused q/k/v projections are
  preconditioned as three blocks, ``param_groups``' default (``--no-split-qkv``: one).

Writes ``OUT/results.json`` (every curve, the sweep, the tables' numbers), ``OUT/curves.png``
(validation loss against step and against training seconds) and prints the tables as markdown.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from bregtop_dist import METHODS, BregTop, param_groups
from launch.bench import code_version, device_clock, machine_info
from launch.jobconfig import ConfigError, check_positive, from_sources, job_parser, parse_list
from launch.lm import PRESETS as LM_PRESETS
from launch.lm_data import DEFAULT_TEXT, GPT2_DIR, DataError, batch_at, gpt2_tokenizer, load_text, token_ids
from launch.models import GPT
from launch.schedule import make_scheduler

PRESETS = {name: LM_PRESETS[name] for name in ("tiny", "small")}
"""name -> (layers, heads, dim, block_size): launch.lm's presets that fit a CPU."""

BASELINE = "adamw"
PEER = "soap"
PEER_HEAVYBALL = "soap-heavyball"
VARIANTS: dict[str, dict[str, Any]] = {
    "+graft": {"graft": "adamw"},
    "+unit": {"init": "first-gradient-unit"},
    "+avg": {"init": "first-gradient-averaged"},
}
"""Suffixes of a BregTop method and the settings they add: ``kl+graft`` grafts each block's
update onto AdamW's norm; ``kl+unit`` and ``kl+avg`` are issue 28's other first-state
candidates (the unit state; running-average EMAs)."""
ROW_INIT = "first-gradient"
"""The first state of a BregTop row without a first-state suffix: pinned, so that ``kl`` names
the same optimizer in every results file, before and after the library's default moved to
``first-gradient-averaged`` (``kl+avg``) on 2026-12-07."""
ALL_METHODS = (BASELINE, PEER, PEER_HEAVYBALL, *METHODS, *(m + s for s in VARIANTS for m in METHODS))
DEFAULT_METHODS = (BASELINE, PEER, "bregtop-vn-v2", "kl")
DEFAULT_LRS = (1e-3, 3e-3, 1e-2)
CLIP = 1.0
"""Gradient-norm clipping of every method (torch.nn.utils.clip_grad_norm_)."""
PRECONDITION_FREQUENCY = 10
VAL_FRACTION = 0.1
"""The last tenth of the tokens is the validation set (as launch.lm)."""
MIN_LR_RATIO = 0.1
"""The cosine ends at this fraction of the peak lr."""


# ------------------------------------------------------------------------------ results
@dataclass
class Curve:
    """One training run's evaluations: step 0 (the initialisation) and every ``eval_every``
    steps. ``seconds`` is cumulative training time at that step, evaluations excluded."""

    steps: list[int] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    train_loss: list[float | None] = field(default_factory=list)  # None at step 0


@dataclass
class Run:
    """One (method, lr) trained for ``steps`` steps. ``diverged``: the training loss became
    non-finite and the run stopped there (its curve ends at the last finite evaluation)."""

    method: str
    lr: float
    steps: int
    diverged: bool
    final_val_loss: float | None
    seconds_per_step: float
    curve: Curve


@dataclass
class StepRow:
    """Validation loss of each method evaluated at ``step`` (None: not evaluated there)."""

    step: int
    val_loss: dict[str, float | None]


@dataclass
class TimeRow:
    """Validation loss of each method after ``seconds`` of training (None: its run was shorter)."""

    seconds: float
    val_loss: dict[str, float | None]


@dataclass
class Results:
    """Everything ``OUT/results.json`` holds."""

    settings: dict[str, Any]
    optimizers: dict[str, dict[str, Any]]  # method -> class and keywords (besides params and lr)
    machine: dict[str, Any]
    code_version: str | None  # git describe --always --dirty at the start
    sweep: list[Run]
    best_lr: dict[str, float]
    runs: list[Run]  # the final run of each method, at its best lr
    target_val_loss: float | None  # AdamW's final validation loss
    equal_steps: list[StepRow]
    wall_budget_s: float  # the shortest (non-diverged) final run's training time
    equal_time: list[TimeRow]
    steps_to_target: dict[str, int | None]  # method -> first evaluated step at or below the target
    seconds_to_target: dict[str, float | None]
    total_wall_s: float = 0.0


# ------------------------------------------------------------------------------ curve reading
def steps_to_target(curve: Curve, target: float) -> int | None:
    """The first evaluated step whose validation loss is at or below ``target`` (so exact to
    ``eval_every`` steps), or None when no evaluation reaches it."""
    for step, loss in zip(curve.steps, curve.val_loss, strict=True):
        if loss <= target:
            return step
    return None


def seconds_to_target(curve: Curve, target: float) -> float | None:
    """Training seconds at the evaluation :func:`steps_to_target` finds, or None."""
    for sec, loss in zip(curve.seconds, curve.val_loss, strict=True):
        if loss <= target:
            return sec
    return None


def loss_at_time(curve: Curve, seconds: float) -> float | None:
    """Validation loss at ``seconds`` of training time, linear between the two evaluations
    around it; None past the curve's last evaluation (the run was not that long)."""
    xs, ys = curve.seconds, curve.val_loss
    if not xs or seconds < xs[0] or seconds > xs[-1]:
        return None
    for i in range(1, len(xs)):
        if seconds <= xs[i]:
            span = xs[i] - xs[i - 1]
            frac = 0.0 if span <= 0 else (seconds - xs[i - 1]) / span
            return ys[i - 1] + frac * (ys[i] - ys[i - 1])
    return ys[0]  # a one-point curve at exactly that time


def loss_at_step(curve: Curve, step: int) -> float | None:
    """Validation loss evaluated at ``step``, or None (not evaluated there, or diverged before)."""
    return curve.val_loss[curve.steps.index(step)] if step in curve.steps else None


# ------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class Data:
    train: Tensor
    val: Tensor
    vocab: int


def load_data(text: Path, cache_dir: Path) -> Data:
    """``text`` (Tiny Shakespeare by default) in GPT-2 BPE ids (cached); the last tenth is validation."""
    tokenizer = gpt2_tokenizer(GPT2_DIR)
    ids = token_ids(load_text(text, None), tokenizer, cache_dir)
    cut = int(ids.numel() * (1.0 - VAL_FRACTION))
    return Data(ids[:cut], ids[cut:], tokenizer.get_vocab_size())


def make_optimizer(method: str, model: nn.Module, lr: float, split_qkv: bool = True) -> torch.optim.Optimizer:
    """The optimizer of ``method`` at ``lr`` with the settings :func:`optimizer_settings` lists
    (``split_qkv``: fused q/k/v projections as three Kronecker blocks, else one)."""
    if method == BASELINE:
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    if method == PEER:
        import pytorch_optimizer

        return pytorch_optimizer.SOAP(model.parameters(), lr=lr, weight_decay=0.0,
                                      precondition_frequency=PRECONDITION_FREQUENCY)
    if method == PEER_HEAVYBALL:
        import heavyball

        opt: torch.optim.Optimizer = heavyball.SOAP(model.parameters(), lr=lr, weight_decay=0.0,
                                                    precondition_frequency=PRECONDITION_FREQUENCY)
        return opt
    base, extra = bregtop_method(method)
    return BregTop(param_groups(model, split_fused=split_qkv), lr=lr, method=base, weight_decay=0.0,
                   precondition_frequency=PRECONDITION_FREQUENCY, **{"init": ROW_INIT, **extra})


def bregtop_method(method: str) -> tuple[str, dict[str, Any]]:
    """A BregTop method name (``kl+graft``) as its base method and the settings its suffix adds."""
    for suffix, extra in VARIANTS.items():
        if method.endswith(suffix):
            return method.removesuffix(suffix), extra
    return method, {}


def optimizer_settings(method: str) -> dict[str, Any]:
    """What results.json records of each optimizer: its class and every hyperparameter
    (from a throw-away instance's param groups, so library defaults are written out)."""
    model = nn.Sequential(nn.Embedding(4, 3), nn.Linear(3, 3))
    opt = make_optimizer(method, model, 1e-3)
    group = opt.param_groups[0]
    keep = {k: v for k, v in group.items() if k not in ("params", "param_names", "lr", "initial_lr")}
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in keep.items()
                if isinstance(v, (int, float, str, bool, tuple, type(None)))}
    cls = type(opt)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "settings": settings,
            "params": "param_groups(model): matrices BregTop, embedding/head/norms/biases AdamW side"
            if method not in (BASELINE, PEER, PEER_HEAVYBALL) else "model.parameters() (all)"}


@dataclass(frozen=True)
class Setup:
    """What every run shares."""

    dims: tuple[int, int, int, int]  # layers, heads, dim, block
    batch_size: int
    eval_every: int
    eval_batches: int
    warmup_fraction: float
    seed: int
    device: torch.device
    split_qkv: bool = True


@torch.no_grad()
def evaluate(model: GPT, data: Data, setup: Setup) -> float:
    """Mean loss over ``eval_batches`` fixed validation batches (the same for every run)."""
    model.eval()
    block = setup.dims[3]
    losses = []
    for i in range(setup.eval_batches):
        x, y = batch_at(data.val, -1 - i, setup.batch_size, block, setup.seed)
        _, loss = model(x.to(setup.device), y.to(setup.device))
        losses.append(loss.item())
    model.train()
    return sum(losses) / len(losses)


class Trainer:
    """One (method, lr) being trained: a fresh GPT (seeded, so every run starts from the same
    weights), its optimizer and schedule, and its curve so far (step 0 evaluated on creation)."""

    def __init__(self, method: str, lr: float, steps: int, data: Data, setup: Setup) -> None:
        layers, heads, dim, block = setup.dims
        self.method, self.lr, self.steps, self.data, self.setup = method, lr, steps, data, setup
        torch.manual_seed(setup.seed)
        self.model = GPT(data.vocab, layers, heads, dim, block).to(setup.device)
        self.opt = make_optimizer(method, self.model, lr, setup.split_qkv)
        warmup = max(1, round(setup.warmup_fraction * steps))  # ramps from lr / warmup (launch.lm: lr / (warmup + 1))
        self.schedule = make_scheduler(self.opt, "cosine", warmup, steps, MIN_LR_RATIO, start_factor=1.0 / warmup)
        self.curve = Curve([0], [0.0], [evaluate(self.model, data, setup)], [None])
        self.elapsed, self.done, self.diverged = 0.0, 0, False

    def step(self) -> float:
        """One training step on batch number ``self.done``, timed (evaluation never is);
        returns the training loss."""
        setup = self.setup
        clock = device_clock(setup.device)
        start = clock()
        x, y = batch_at(self.data.train, self.done, setup.batch_size, setup.dims[3], setup.seed)
        _, loss = self.model(x.to(setup.device), y.to(setup.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.opt.step()
        self.schedule.step()
        train_loss = loss.item()
        self.elapsed += clock() - start
        self.done += 1
        return train_loss

    @property
    def running(self) -> bool:
        return self.done < self.steps and not self.diverged

    def advance(self, log: bool) -> None:
        """A step, then an evaluation when one is due; a non-finite loss ends the run."""
        train_loss = self.step()
        if not math.isfinite(train_loss):
            self.diverged = True
            return
        if self.done % self.setup.eval_every and self.done != self.steps:
            return
        val = evaluate(self.model, self.data, self.setup)
        if not math.isfinite(val):
            self.diverged = True
            return
        c = self.curve
        c.steps.append(self.done)
        c.seconds.append(self.elapsed)
        c.val_loss.append(val)
        c.train_loss.append(train_loss)
        if log:
            print(f"  {self.method:>14} lr {self.lr:.0e} step {self.done:>5}  train {train_loss:.4f}  val {val:.4f}  "
                  f"{self.elapsed:7.1f}s", flush=True)

    def result(self) -> Run:
        return Run(self.method, self.lr, self.steps, self.diverged, None if self.diverged else self.curve.val_loss[-1],
                   self.elapsed / max(1, self.done), self.curve)


def train_together(specs: list[tuple[str, float]], steps: int, data: Data, setup: Setup, log: bool = True) -> list[Run]:
    """Train every (method, lr) of ``specs`` for ``steps`` steps in lockstep: step 1 of each,
    then step 2 of each, ... so a change in machine load during the run hits every method
    alike (each one's clock counts only its own steps)."""
    trainers = [Trainer(m, lr, steps, data, setup) for m, lr in specs]
    while any(t.running for t in trainers):
        for t in trainers:
            if t.running:
                t.advance(log)
    return [t.result() for t in trainers]


# ------------------------------------------------------------------------------ tables
def report_steps(steps: int, eval_every: int) -> list[int]:
    """Evaluated steps nearest to a quarter, half, three quarters and all of ``steps``."""
    grid = sorted({*range(eval_every, steps + 1, eval_every), steps})
    return sorted({min(grid, key=lambda s: abs(s - f * steps)) for f in (0.25, 0.5, 0.75, 1.0)})


def summarise(runs: list[Run], steps: int, eval_every: int) -> dict[str, Any]:
    """The three comparisons: equal steps, equal wall-clock, steps to AdamW's final loss."""
    by = {r.method: r for r in runs}
    equal_steps = [StepRow(s, {m: loss_at_step(r.curve, s) for m, r in by.items()}) for s in report_steps(steps, eval_every)]
    budget = min(r.curve.seconds[-1] for r in runs if not r.diverged) if any(not r.diverged for r in runs) else 0.0
    equal_time = [TimeRow(f * budget, {m: loss_at_time(r.curve, f * budget) for m, r in by.items()})
                  for f in (0.25, 0.5, 0.75, 1.0)]
    base = by.get(BASELINE)
    target = base.final_val_loss if base is not None else None
    return {
        "target_val_loss": target,
        "equal_steps": equal_steps,
        "wall_budget_s": budget,
        "equal_time": equal_time,
        "steps_to_target": {m: (steps_to_target(r.curve, target) if target is not None else None) for m, r in by.items()},
        "seconds_to_target": {m: (seconds_to_target(r.curve, target) if target is not None else None)
                              for m, r in by.items()},
    }


def _cell(value: float | int | None, fmt: str = ".4f", missing: str = "—") -> str:
    return missing if value is None else format(value, fmt)


def markdown(res: Results) -> str:
    """The sweep and the three comparison tables, as markdown."""
    methods = [r.method for r in res.runs]
    head = "| " + " | ".join(methods) + " |"
    rule = "|---" * (len(methods) + 1) + "|"
    lines = ["### Sweep (validation loss after the sweep's steps; best lr in bold)", ""]
    lrs = sorted({r.lr for r in res.sweep})
    if res.sweep:
        lines += ["| lr " + head, rule]
        for lr in lrs:
            cells = []
            for m in methods:
                hit = [r for r in res.sweep if r.method == m and r.lr == lr]
                if not hit:
                    cells.append("")
                    continue
                text = "diverged" if hit[0].diverged else _cell(hit[0].final_val_loss)
                cells.append(f"**{text}**" if res.best_lr.get(m) == lr else text)
            lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    else:
        lines.append("(no sweep: one lr per method)")
    lines += ["", "### Final runs", "", "| | " + " | ".join(methods) + " |", rule,
              "| lr | " + " | ".join(f"{res.best_lr[m]:g}" for m in methods) + " |",
              "| s/step | " + " | ".join(f"{r.seconds_per_step:.2f}" for r in res.runs) + " |",
              "| final val loss | " + " | ".join(_cell(r.final_val_loss) for r in res.runs) + " |"]
    lines += ["", "### Validation loss at equal steps", "", "| step " + head, rule]
    for srow in res.equal_steps:
        lines.append(f"| {srow.step} | " + " | ".join(_cell(srow.val_loss[m]) for m in methods) + " |")
    lines += ["", f"### Validation loss at equal training time (budget {res.wall_budget_s:.1f} s, the fastest run's "
              "total; linear between evaluations)", "", "| seconds " + head, rule]
    for trow in res.equal_time:
        lines.append(f"| {trow.seconds:.1f} | " + " | ".join(_cell(trow.val_loss[m]) for m in methods) + " |")
    lines += ["", f"### Reaching AdamW's final validation loss ({_cell(res.target_val_loss)}; first evaluation "
              "at or below it)", "", "| | " + " | ".join(methods) + " |", rule,
              "| steps | " + " | ".join(_cell(res.steps_to_target[m], "d", "not reached") for m in methods) + " |",
              "| seconds | " + " | ".join(_cell(res.seconds_to_target[m], ".1f", "not reached") for m in methods) + " |"]
    return "\n".join(lines)


def plot(runs: list[Run], path: Path) -> None:
    """Validation loss against step (left) and against training seconds (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for r in runs:
        label = f"{r.method} (lr {r.lr:g})"
        left.plot(r.curve.steps, r.curve.val_loss, marker=".", label=label)
        right.plot(r.curve.seconds, r.curve.val_loss, marker=".", label=label)
    left.set_xlabel("step")
    right.set_xlabel("training seconds (evaluation excluded)")
    left.set_ylabel("validation loss")
    # The y range starts at the evaluation nearest a quarter of the run: the start (about
    # ln vocab) and early warmup spikes would flatten the part where the methods differ.
    low = min(min(r.curve.val_loss) for r in runs)
    quarter = [r.curve.val_loss[min(range(len(r.curve.steps)), key=lambda i: abs(r.curve.steps[i] - r.steps / 4))]
               for r in runs]
    left.set_ylim(low - 0.1, max(max(quarter), low + 0.2) + 0.3)
    left.set_title("validation loss vs step (earlier points clipped)", fontsize=9)
    right.set_title("vs training time", fontsize=9)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ------------------------------------------------------------------------------ command line
@dataclass(frozen=True, kw_only=True)
class CompareConfig:
    """Every setting of the comparison; ``--config FILE`` (YAML) may set any of them."""

    HELP: ClassVar[dict[str, str]] = {
        "methods": "optimizers to compare: adamw (torch.optim.AdamW; its final loss is the target), soap "
                   "(pytorch_optimizer.SOAP), soap-heavyball (heavyball.SOAP) or any BregTop method: "
                   + ", ".join(METHODS) + " (with +graft: graft='adamw'; +unit: init='first-gradient-unit'; "
                   "+avg: init='first-gradient-averaged')",
        "lrs": "comma-separated learning rates swept for every method without its own --method-lrs",
        "method_lrs": "a method's own sweep list, METHOD=LR[,LR...] (one or more), e.g. soap=1e-3,3e-3",
        "preset": "model size: tiny (2 layers, 2 heads, dim 64, block 64) or small (4, 4, 128, 128)",
        "steps": "training steps of the final runs",
        "sweep_steps": "training steps of each sweep run (its own warmup + cosine); equal to --steps reuses "
                       "the best sweep run as the final run",
        "eval_every": "evaluate the validation loss every this many steps (and at the end)",
        "eval_batches": "validation batches per evaluation",
        "batch_size": "sequences per training step",
        "warmup_fraction": "share of each run's steps spent in linear warmup (at least one step)",
        "seed": "seed of the initialisation and of the batches (one for all)",
        "device": "where to train: auto, cpu or cuda (auto takes cuda when present)",
        "data": "the training text file (the last tenth is validation)",
        "cache_dir": "where the tokenised text is cached",
        "out": "output folder for results.json and curves.png",
        "split_qkv": "precondition fused q/k/v projections as three Kronecker blocks (param_groups' default); "
                     "--no-split-qkv keeps each one block, as docs/results/lm.md's earlier runs",
    }

    methods: tuple[str, ...] = DEFAULT_METHODS
    lrs: tuple[float, ...] = DEFAULT_LRS
    method_lrs: tuple[str, ...] = ()
    preset: str = "small"
    steps: int = 300
    sweep_steps: int = 50
    eval_every: int = 25
    eval_batches: int = 8
    batch_size: int = 16
    warmup_fraction: float = 0.1
    seed: int = 0
    device: str = "auto"
    data: Path = DEFAULT_TEXT
    cache_dir: Path = Path("runs/cache")
    out: Path = Path("runs/lm-compare")
    split_qkv: bool = True

    def __post_init__(self) -> None:
        check_positive(self, ("steps", "sweep_steps", "eval_every", "eval_batches", "batch_size"))
        unknown = [m for m in self.methods if m not in ALL_METHODS]
        if unknown or not self.methods:
            raise ValueError(f"methods={list(self.methods)}: use one or more of {', '.join(ALL_METHODS)}")
        if not self.lrs or not all(lr > 0 for lr in self.lrs):
            raise ValueError(f"lrs={list(self.lrs)}: give one or more learning rates > 0, comma-separated")
        self.grids  # noqa: B018 - checks method_lrs
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not allowed; use one of {', '.join(PRESETS)}")
        if not 0.0 <= self.warmup_fraction < 1.0:
            raise ValueError(f"warmup_fraction={self.warmup_fraction!r} must be in [0, 1)")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device={self.device!r} is not allowed; use auto, cpu or cuda")

    @property
    def grids(self) -> dict[str, list[float]]:
        """Each method's sweep: its ``method_lrs`` entry (the last one wins), else ``lrs``."""
        grids = {m: list(self.lrs) for m in dict.fromkeys(self.methods)}
        for item in self.method_lrs:
            method, sep, text = item.partition("=")
            lrs = parse_list(text, f"method_lrs {method}", float) if sep else ()
            if method not in ALL_METHODS or not lrs or not all(lr > 0 for lr in lrs):
                raise ValueError(f"method_lrs: {item!r}: use METHOD=LR[,LR...] with METHOD one of "
                                 f"{', '.join(ALL_METHODS)} and each LR > 0")
            if method in grids:
                grids[method] = list(lrs)
        return grids


def build_parser() -> argparse.ArgumentParser:
    return job_parser(CompareConfig, "python -m launch.lm_compare", __doc__.split("\n\n")[0])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(from_sources(CompareConfig, args.config, args))
    except (ConfigError, DataError) as err:
        print(f"python -m launch.lm_compare: error: {err}", file=sys.stderr)
        return 2


def run(cfg: CompareConfig) -> int:
    methods, grids = list(dict.fromkeys(cfg.methods)), cfg.grids
    device = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    setup = Setup(PRESETS[cfg.preset], cfg.batch_size, cfg.eval_every, cfg.eval_batches, cfg.warmup_fraction,
                  cfg.seed, device, cfg.split_qkv)
    begin, version = time.perf_counter(), code_version()  # the code as the run starts
    data = load_data(cfg.data, cfg.cache_dir)
    layers, heads, dim, block = setup.dims
    print(f"GPT {layers} layers, {heads} heads, dim {dim}, block {block}; batch {cfg.batch_size}; "
          f"{data.train.numel():,} train / {data.val.numel():,} val tokens; {device}, "
          f"{torch.get_num_threads()} thread(s)", flush=True)

    sweep: list[Run] = []
    best: dict[str, float] = {}
    reused: dict[str, Run] = {}
    for m in methods:
        if len(grids[m]) == 1:
            best[m] = grids[m][0]
            continue
        print(f"sweep {m}: lrs {grids[m]}, {cfg.sweep_steps} steps", flush=True)
        trials = train_together([(m, lr) for lr in grids[m]], cfg.sweep_steps, data, setup, log=False)
        for t in trials:
            print(f"  {m:>14} lr {t.lr:.0e}: " + ("diverged" if t.diverged else f"val {t.final_val_loss:.4f}"),
                  flush=True)
        sweep += trials
        finite = [t for t in trials if t.final_val_loss is not None]
        pick = min(finite, key=lambda t: t.final_val_loss or math.inf) if finite else trials[0]
        best[m] = pick.lr
        if cfg.sweep_steps == cfg.steps:
            reused[m] = pick

    fresh = [m for m in methods if m not in reused]
    if fresh:
        print(f"final runs, {cfg.steps} steps, in lockstep: " + ", ".join(f"{m} lr {best[m]:g}" for m in fresh),
              flush=True)
    trained = dict(zip(fresh, train_together([(m, best[m]) for m in fresh], cfg.steps, data, setup), strict=True))
    runs = [reused.get(m) or trained[m] for m in methods]

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items() if k != "method_lrs"}
    res = Results(
        settings={**settings, "grids": grids, "dims": list(setup.dims), "device": str(device), "clip_grad_norm": CLIP,
                  "schedule": f"LinearLR warmup from lr/warmup over round({cfg.warmup_fraction} * steps) steps, "
                              f"then CosineAnnealingLR to {MIN_LR_RATIO} * lr (SequentialLR)",
                  "val_fraction": VAL_FRACTION},
        optimizers={m: optimizer_settings(m) for m in methods},
        machine=machine_info(),
        code_version=version,
        sweep=sweep,
        best_lr=best,
        runs=runs,
        **summarise(runs, cfg.steps, cfg.eval_every),
    )
    res.total_wall_s = time.perf_counter() - begin
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "results.json").write_text(json.dumps(dataclasses.asdict(res), indent=2) + "\n")
    plot(runs, cfg.out / "curves.png")
    print()
    print(markdown(res))
    print(f"\nwrote {cfg.out / 'results.json'} and {cfg.out / 'curves.png'} ({res.total_wall_s:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
