"""Step time, state memory and top-set selection time of BregTop against AdamW, SOAP and Shampoo.

Every optimizer steps the matrices of a small transformer (per layer q, k, v, o and the
MLP's up and down projections; no vectors, so this measures the Kronecker side). Each one
is warmed up for two precondition periods (first-step set-up and at least one basis
refresh done, torch.compile'd peers compiled), then only ``opt.step()`` is timed for
``--steps`` steps, ``--repeats`` times. Gradients come from a pool generated once, so all
optimizers see the same sequence; a fresh copy is put in ``.grad`` before each step,
outside the timing. State memory is numel * element_size over every state tensor.
Selection compares :func:`bregtop_dist.kron_precondition` with the straightforward
materialise-S / topk / quantile reference on one block (1024 x 4096 unless --quick).
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import statistics
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bregtop_dist import METHODS, BregTop, kron_precondition
from bregtop_dist.core.precondition import SELECTION_BAND
from launch.bench import Timing, code_version, machine_info, samples, timed, write_json
from launch.cli import positive_int

HELP = "step time, state bytes/param and selection time of BregTop vs AdamW, SOAP and Shampoo"

LR = 1e-3
GRAD_POOL = 8
"""Distinct random gradient sets, cycled (a fresh copy of one is assigned before each step)."""
SEED = 0
RHO, Q, C = 0.06, 0.01, 3.0
"""Selection setting of the selection benchmark (BregTop-VN, appendix D)."""
SELECTION_TARGET = 10.0
"""kron_precondition should be at least this many times faster than the naive reference."""
JITTER_TARGET = 1.5
"""BregTop rows' max step / median step should stay below this."""
DEFAULT_OUT = Path("runs/bench/optimizer.json")
BASELINE = "adamw"
PEERS = ("heavyball-soap", "pto-soap", "pto-shampoo")
NAMES = (BASELINE, *METHODS, *PEERS)


@dataclass(frozen=True)
class Sizes:
    """How much to run: timing, model shape, precondition period and selection block."""

    steps: int
    repeats: int
    layers: int
    dim: int
    precondition_frequency: int
    selection: tuple[int, int]


FULL = Sizes(steps=60, repeats=3, layers=4, dim=256, precondition_frequency=10, selection=(1024, 4096))
QUICK = Sizes(steps=6, repeats=1, layers=1, dim=32, precondition_frequency=2, selection=(64, 256))


@dataclass(frozen=True)
class Candidate:
    """One benchmarked optimizer: its row name, family, class (imported lazily, so a missing
    optional package becomes an error row) and constructor keywords besides ``params``."""

    name: str
    family: str  # "baseline", "bregtop" or "peer"
    load: Callable[[], type[torch.optim.Optimizer]]
    options: dict[str, Any]


def _heavyball_soap() -> type[torch.optim.Optimizer]:
    import heavyball

    cls: type[torch.optim.Optimizer] = heavyball.SOAP  # heavyball has no type hints
    return cls


def _pto_soap() -> type[torch.optim.Optimizer]:
    import pytorch_optimizer

    return pytorch_optimizer.SOAP


def _pto_shampoo() -> type[torch.optim.Optimizer]:
    import pytorch_optimizer

    return pytorch_optimizer.Shampoo


def candidates(frequency: int) -> list[Candidate]:
    """AdamW, the ten BregTop methods and the peers, each Kronecker one refreshing every
    ``frequency`` steps; every other setting is the library's default."""
    kron = {"lr": LR, "precondition_frequency": frequency}
    return [
        Candidate(BASELINE, "baseline", lambda: torch.optim.AdamW, {"lr": LR}),
        *(Candidate(m, "bregtop", lambda: BregTop, {**kron, "method": m}) for m in METHODS),
        Candidate("heavyball-soap", "peer", _heavyball_soap, kron),
        Candidate("pto-soap", "peer", _pto_soap, kron),
        Candidate(
            "pto-shampoo", "peer", _pto_shampoo, {"lr": LR, "preconditioning_compute_steps": frequency}
        ),
    ]


# ------------------------------------------------------------------------------ step time
def transformer_shapes(layers: int, dim: int) -> list[tuple[int, int]]:
    """The matrices of ``layers`` transformer blocks as nn.Linear stores them (out x in):
    q, k, v, o (dim x dim), MLP up (4 dim x dim) and down (dim x 4 dim)."""
    return ([(dim, dim)] * 4 + [(4 * dim, dim), (dim, 4 * dim)]) * layers


def make_params(shapes: list[tuple[int, int]], seed: int) -> list[nn.Parameter]:
    """float32 parameters of ``shapes``, initialised like nn.Linear (std 1/sqrt(in))."""
    gen = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=gen) * s[1] ** -0.5) for s in shapes]


def make_grad_pool(shapes: list[tuple[int, int]], size: int, seed: int) -> list[list[Tensor]]:
    """``size`` sets of standard-normal gradients, one tensor per shape."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen) for s in shapes] for _ in range(size)]


def timed_steps(
    opt: torch.optim.Optimizer, params: list[nn.Parameter], pool: list[list[Tensor]], first: int, count: int
) -> list[float]:
    """Seconds of ``opt.step()`` alone for steps ``first .. first+count-1``.

    Before each step every ``.grad`` gets a fresh copy of the pool's next gradient set (a copy
    because some optimizers modify the gradient in place); that is not timed.
    """
    steps = iter(range(first, first + count))

    def load() -> None:
        for p, g in zip(params, pool[next(steps) % len(pool)], strict=True):
            p.grad = g.clone()

    return samples(opt.step, torch.device("cpu"), Timing(count, warmup=0), setup=load)[0]


def tensor_bytes(obj: Any, seen: set[int]) -> int:
    """numel * element_size over the tensors in ``obj`` and its nested dicts, lists and
    tuples; a tensor already in ``seen`` (by id) is not counted again."""
    if isinstance(obj, Tensor):
        if id(obj) in seen:
            return 0
        seen.add(id(obj))
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v, seen) for v in obj)
    return 0


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of all optimizer state: ``opt.state`` plus, for BregTop, its Kronecker block
    stacks (``opt.state[p]["kron"]`` holds views of them, which are not counted twice)."""
    seen: set[int] = set()
    total = tensor_bytes(list(opt.state.values()), seen)  # KronBlocks are not dicts: skipped here
    if isinstance(opt, BregTop):
        total += tensor_bytes(
            [stack.state.tensors() for stack in opt.kron_stacks.values() if stack.state is not None], seen
        )
    return total


@dataclass
class Trial:
    """One optimizer being measured: built and warmed up once, then timed in windows that
    are interleaved with the other optimizers' (so drift in machine speed hits all alike)."""

    cand: Candidate
    row: dict[str, Any]
    params: list[nn.Parameter]
    opt: torch.optim.Optimizer | None
    windows: list[list[float]]


def _error(exc: Exception) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def start_trial(cand: Candidate, sizes: Sizes, shapes: list[tuple[int, int]], pool: list[list[Tensor]]) -> Trial:
    """Build ``cand`` on fresh parameters and run its warm-up (two precondition periods);
    a failure is recorded in the row and the trial is not timed."""
    row: dict[str, Any] = {"name": cand.name, "family": cand.family, "options": cand.options, "error": None}
    params = make_params(shapes, SEED)
    try:
        cls = cand.load()
        row["optimizer"] = f"{cls.__module__}.{cls.__qualname__}"
        opt = cls(params, **cand.options)
        timed_steps(opt, params, pool, 0, 2 * sizes.precondition_frequency)
    except Exception as exc:  # a broken peer must not stop the benchmark
        return Trial(cand, {**row, "error": _error(exc)}, params, None, [])
    return Trial(cand, row, params, opt, [])


def time_window(trial: Trial, sizes: Sizes, pool: list[list[Tensor]]) -> None:
    """Time the trial's next window of ``sizes.steps`` steps (garbage collection off)."""
    if trial.opt is None:
        return
    first = 2 * sizes.precondition_frequency + len(trial.windows) * sizes.steps
    gc.collect()
    gc.disable()  # a collection inside a window would be charged to the optimizer
    try:
        trial.windows.append(timed_steps(trial.opt, trial.params, pool, first, sizes.steps))
    except Exception as exc:
        trial.row["error"] = _error(exc)
        trial.opt = None
    finally:
        gc.enable()


def finish_trial(trial: Trial) -> dict[str, Any]:
    """The row: median and mean step (the mean is the amortised cost, refreshes included),
    max step, and state bytes per parameter.

    ``max_step_s`` is robust to a stall of the machine in one window: windows start on the
    same refresh phase, so step i of every window does the same work; the per-position median
    over windows keeps a periodic spike (a refresh) and drops a one-off one. The raw maximum
    is ``raw_max_step_s``.
    """
    if trial.opt is None:
        return trial.row
    times = [t for w in trial.windows for t in w]
    median = statistics.median(times)
    per_position = [statistics.median(step) for step in zip(*trial.windows, strict=True)]
    robust_max = max(per_position)
    nbytes = state_bytes(trial.opt)
    return {
        **trial.row,
        "median_step_s": median,
        "mean_step_s": statistics.fmean(times),
        "max_step_s": robust_max,
        "raw_max_step_s": max(times),
        "max_over_median": robust_max / median,
        "repeat_median_step_s": [statistics.median(w) for w in trial.windows],
        "state_bytes": nbytes,
        "state_bytes_per_param": nbytes / sum(p.numel() for p in trial.params),
        "step_s": times,
    }


def add_baseline_ratios(rows: list[dict[str, Any]]) -> None:
    """Set each timed row's ``median_vs_adamw`` (None when AdamW itself failed)."""
    base = next((r for r in rows if r["name"] == BASELINE and r["error"] is None), None)
    for r in rows:
        if r["error"] is None:
            r["median_vs_adamw"] = r["median_step_s"] / base["median_step_s"] if base else None


# ------------------------------------------------------------------------------ selection
def naive_precondition(m: Tensor, lam_l: Tensor, lam_r: Tensor, rho: float, q: float, c: float) -> Tensor:
    """Algorithm 2 with identity bases the straightforward way: materialise S = lam_L lam_R^T,
    ``topk`` its K = ceil(rho m n) largest entries, ``torch.quantile`` the rest's S^-1/2; then
    the library's continuity rules (ties with the K-th largest take S^-1/2, entries within
    ``SELECTION_BAND`` below it on sqrt(S) blend from chi to S^-1/2)."""
    s = torch.outer(lam_l, lam_r)
    k = math.ceil(rho * s.numel())
    top = torch.zeros(s.numel(), dtype=torch.bool)
    top[torch.topk(s.flatten(), k, sorted=False).indices] = True
    top = top.view_as(s)
    chi = c * torch.quantile(s[~top] ** -0.5, q, interpolation="linear")
    threshold = s[top].min()
    ramp = ((s / threshold).sqrt() - (1.0 - SELECTION_BAND)).div(SELECTION_BAND).clamp(0.0, 1.0)
    return m * torch.where(s >= threshold, s**-0.5, chi + ramp * (s**-0.5 - chi))


def bench_selection(shape: tuple[int, int], repeats: int) -> dict[str, Any]:
    """Time kron_precondition (U = None) against :func:`naive_precondition` on one block
    with log-normal eigenvalues, and check that the two outputs agree (rtol 1e-4: inside the
    selection band the blend turns float32 rounding of the spectrum into up to about
    c / SELECTION_BAND = 300 ulps)."""
    m, n = shape
    gen = torch.Generator().manual_seed(SEED)
    mat = torch.randn(m, n, generator=gen)
    lam_l = torch.randn(m, generator=gen).exp()
    lam_r = torch.randn(n, generator=gen).exp()
    def fast_fn() -> Tensor:
        return kron_precondition(mat, None, None, lam_l, lam_r, rho=RHO, q=Q, c=C)

    def naive_fn() -> Tensor:
        return naive_precondition(mat, lam_l, lam_r, RHO, Q, C)

    fast_s, fast = timed(fast_fn, mat.device, Timing(repeats))
    naive_s, naive = timed(naive_fn, mat.device, Timing(repeats))
    close = torch.isclose(fast, naive, rtol=1e-4)
    return {
        "shape": [m, n],
        "rho": RHO,
        "q": Q,
        "c": C,
        "top_count": math.ceil(RHO * m * n),
        "repeats": repeats,
        "kron_precondition_s": fast_s,
        "naive_s": naive_s,
        "speedup": naive_s / fast_s,
        "outputs_agree": bool(close.all()),
        "mismatched_entries": int((~close).sum()),
    }


# -------------------------------------------------------------------------------- targets
def evaluate_targets(rows: list[dict[str, Any]], selection: dict[str, Any]) -> dict[str, Any]:
    """Whether the measured numbers meet the targets; ``holds`` is None where nothing was measured."""
    timed = [r for r in rows if r["error"] is None]
    bregtop = [r for r in timed if r["family"] == "bregtop"]
    fastest = min((r for r in timed if r["family"] == "peer"), key=lambda r: r["median_step_s"], default=None)
    slower: dict[str, float] = {}
    if fastest is not None:
        slower = {
            r["name"]: r["median_step_s"] / fastest["median_step_s"]
            for r in bregtop
            if r["median_step_s"] > fastest["median_step_s"]
        }
    jittery = {r["name"]: r["max_over_median"] for r in bregtop if r["max_over_median"] >= JITTER_TARGET}
    return {
        "selection_speedup": {
            "target": f">= {SELECTION_TARGET:g}x",
            "value": selection["speedup"],
            "holds": selection["speedup"] >= SELECTION_TARGET,
        },
        "bregtop_vs_fastest_peer": {
            "target": "BregTop median step <= the fastest peer's",
            "fastest_peer": fastest["name"] if fastest else None,
            "fastest_peer_median_step_s": fastest["median_step_s"] if fastest else None,
            "slower_by": slower,
            "holds": (not slower) if fastest and bregtop else None,
        },
        "bregtop_max_over_median": {
            "target": f"< {JITTER_TARGET:g}",
            "failing": jittery,
            "holds": (not jittery) if bregtop else None,
        },
    }


# --------------------------------------------------------------------------------- report
def _verdict(holds: bool | None) -> str:
    return {True: "holds", False: "DOES NOT HOLD", None: "not measured"}[holds]


def format_table(rows: list[dict[str, Any]]) -> str:
    """The step-time and memory table, one line per optimizer (error rows show the error).

    The mean is shown beside the median because an optimizer that refreshes every block on
    the same step has a low median and a high mean (its refresh cost is all in the max).
    "max ms" is the stall-robust maximum (see :func:`finish_trial`), "raw max" the plain one."""
    head = (
        f"{'optimizer':<16}{'median ms':>11}{'mean ms':>10}{'max ms':>10}{'max/med':>9}{'raw max':>10}"
        f"{'vs AdamW':>10}{'state B/param':>15}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        if r["error"] is not None:
            lines.append(f"{r['name']:<16}  error: {r['error'][:200]}")
            continue
        ratio = f"{r['median_vs_adamw']:.2f}" if r["median_vs_adamw"] is not None else "-"
        lines.append(
            f"{r['name']:<16}{r['median_step_s'] * 1e3:>11.2f}{r['mean_step_s'] * 1e3:>10.2f}"
            f"{r['max_step_s'] * 1e3:>10.2f}{r['max_over_median']:>9.2f}{r['raw_max_step_s'] * 1e3:>10.2f}"
            f"{ratio:>10}{r['state_bytes_per_param']:>15.2f}"
        )
    return "\n".join(lines)


def format_report(result: dict[str, Any]) -> str:
    """Everything a reader needs: machine and settings, the table, selection, targets."""
    mc, st, sel, tg = result["machine"], result["settings"], result["selection"], result["targets"]
    peer, jit, spd = tg["bregtop_vs_fastest_peer"], tg["bregtop_max_over_median"], tg["selection_speedup"]
    n_bregtop = sum(r["family"] == "bregtop" and r["error"] is None for r in result["rows"])
    fastest = (
        f"{peer['fastest_peer']}, {peer['fastest_peer_median_step_s'] * 1e3:.2f} ms"
        if peer["fastest_peer"]
        else "none ran"
    )
    slower = ", ".join(f"{k} {v:.2f}x" for k, v in peer["slower_by"].items())
    failing = ", ".join(f"{k} {v:.2f}" for k, v in jit["failing"].items())
    return "\n".join(
        [
            f"machine: {mc['processor']} ({mc['machine']}), {mc['cpu_count']} CPUs, torch {mc['torch']}, "
            f"{mc['torch_num_threads']} threads, {mc['date_utc']}; load average 1 min "
            f"{mc['load_average'][0]:.2f} at start, {mc['load_average_end'][0]:.2f} at end",
            f"model: layers={st['layers']}, dim={st['dim']} ({st['n_params']:,} matrix params); "
            f"warm-up {st['warmup_steps']} steps, then {st['repeats']} x {st['steps']} timed steps; "
            f"precondition frequency {st['precondition_frequency']}; code {st['code_version']}",
            "",
            format_table(result["rows"]),
            "",
            f"selection on {sel['shape'][0]}x{sel['shape'][1]} (rho={sel['rho']}, q={sel['q']}, c={sel['c']}, "
            f"K={sel['top_count']:,}): kron_precondition {sel['kron_precondition_s'] * 1e3:.2f} ms, "
            f"naive {sel['naive_s'] * 1e3:.2f} ms, speedup {sel['speedup']:.1f}x; outputs agree: "
            f"{'yes' if sel['outputs_agree'] else 'NO'} ({sel['mismatched_entries']} entries differ at rtol 1e-4)",
            "",
            "targets:",
            f"  selection {spd['target']} faster than naive: {spd['value']:.1f}x -> {_verdict(spd['holds'])}",
            f"  BregTop median step <= fastest peer ({fastest}): "
            f"{n_bregtop - len(peer['slower_by'])}/{n_bregtop} -> {_verdict(peer['holds'])}"
            + (f"; slower: {slower}" if slower else ""),
            f"  BregTop max/median {jit['target']}: {n_bregtop - len(jit['failing'])}/{n_bregtop} -> "
            f"{_verdict(jit['holds'])}" + (f"; failing: {failing}" if failing else ""),
        ]
    )


# ------------------------------------------------------------------------------------ CLI
def optimizer_names(text: str) -> tuple[str, ...]:
    """argparse type of ``--only``: comma-separated names, each one of :data:`NAMES`."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in NAMES]
    if unknown or not names:
        bad = repr(unknown[0]) if unknown else f"{text!r} names no optimizer"
        raise argparse.ArgumentTypeError(f"unknown optimizer {bad}; allowed: {', '.join(NAMES)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``optimizer`` subcommand's options; unset sizes come from the full or --quick set."""
    for flag, field, what in (
        ("--steps", "steps", "timed steps per repeat"),
        ("--repeats", "repeats", "timed windows per optimizer"),
        ("--layers", "layers", "transformer layers"),
        ("--dim", "dim", "model width"),
    ):
        parser.add_argument(
            flag,
            type=positive_int,
            help=f"{what} (default {getattr(FULL, field)}; with --quick {getattr(QUICK, field)})",
        )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        metavar="PATH.json",
        help=f"JSON output (default {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke-test sizes: precondition frequency {QUICK.precondition_frequency} "
        f"instead of {FULL.precondition_frequency}, selection block {QUICK.selection[0]}x{QUICK.selection[1]}, small model and few steps",
    )
    parser.add_argument(
        "--only",
        type=optimizer_names,
        metavar="NAME[,NAME...]",
        help=f"comma-separated subset of: {', '.join(NAMES)} (AdamW, the baseline, always runs)",
    )


def resolve_sizes(args: argparse.Namespace) -> Sizes:
    """The full (or --quick) sizes with the options given on the command line."""
    base = QUICK if args.quick else FULL
    given = {
        k: getattr(args, k) for k in ("steps", "repeats", "layers", "dim") if getattr(args, k) is not None
    }
    return replace(base, **given)


def run(args: argparse.Namespace) -> int:
    """Measure every selected optimizer and the selection, print the report, write the JSON."""
    sizes = resolve_sizes(args)
    if sizes.steps % sizes.precondition_frequency:
        print(
            f"python -m launch.bench optimizer: error: --steps={sizes.steps} must be a multiple of the "
            f"precondition frequency {sizes.precondition_frequency}, so every timed window starts on the "
            "same refresh phase",
            file=sys.stderr,
        )
        return 2
    machine = machine_info()
    version = code_version()  # before timing: the code imported now is the code timed
    names = {BASELINE, *(args.only or NAMES)}
    shapes = transformer_shapes(sizes.layers, sizes.dim)
    pool = make_grad_pool(shapes, GRAD_POOL, SEED + 1)
    trials = []
    for cand in candidates(sizes.precondition_frequency):
        if cand.name in names:
            print(f"[bench optimizer] building and warming up {cand.name}", file=sys.stderr, flush=True)
            trials.append(start_trial(cand, sizes, shapes, pool))
    for r in range(sizes.repeats):
        print(f"[bench optimizer] timed window {r + 1}/{sizes.repeats}", file=sys.stderr, flush=True)
        for trial in trials:
            time_window(trial, sizes, pool)
    rows = [finish_trial(t) for t in trials]
    add_baseline_ratios(rows)
    print("[bench optimizer] timing selection", file=sys.stderr, flush=True)
    selection = bench_selection(sizes.selection, sizes.repeats)
    machine["load_average_end"] = list(os.getloadavg())
    result = {
        "machine": machine,
        "settings": {
            **asdict(sizes),
            "warmup_steps": 2 * sizes.precondition_frequency,
            "quick": args.quick,
            "code_version": version,
            "lr": LR,
            "grad_pool": GRAD_POOL,
            "n_params": sum(math.prod(s) for s in shapes),
        },
        "rows": rows,
        "selection": selection,
        "targets": evaluate_targets(rows, selection),
    }
    write_json(args.out, result)
    print(format_report(result))
    print(f"wrote {args.out}")
    return 0
