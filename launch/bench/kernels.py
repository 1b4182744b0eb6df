"""Triton kernels against the torch path, on the stacks GPT-2 small really has, and BregTop's
share of a bf16 GPT-2-small training step.

Every measurement derives from one model, the project's GPT (:class:`launch.models.GPT`, what
``launch.lm`` trains): its matrices cut by ``max_precond_dim`` into blocks
(:func:`bregtop_dist.core.blocking.block_slices`) give the stacks timed below; for GPT-2 small
with ``max_precond_dim=1024`` these are 48 x 768 x 768, 36 x 768 x 1024 and 36 x 1024 x 768.
Each figure is a median over repeated calls, and every ratio is of two figures of the same run:

1. Algorithm 2 on a stack, ``precondition_rotated`` (top-set selection and masked scaling),
   with the Triton backend against the torch backend: the selection is inside the timed
   region, because the optimizer pays for it on either backend. Also, separately, the masked
   scaling alone: the fused kernel's bandwidth against a device copy of the same bytes, and
   against the unfused torch ``apply_top_set``;
2. the eigenvalue statistics fused with the momentum update against the torch path;
3. the ``bregtop-vn-v2`` step against ``torch.optim.AdamW`` (fused on CUDA), and the amortised
   BregTop step added to a training step whose forward and backward run under bf16 autocast
   (on CUDA; float32 on a CPU) with AdamW as its optimizer.

The GPU targets of issue 14 are reported against these figures: the fused kernel at least 70%
of a copy's bandwidth and at least 3x the torch path; BregTop adds at most 10% to a bf16
training step. Triton rows need CUDA; on a CPU they are skipped with the reason, unless
``TRITON_INTERPRET=1`` (then they run in Triton's interpreter: a check of the wiring, whose
times say nothing about a GPU).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bregtop_dist import PRESETS, BregTop, param_groups
from bregtop_dist.core.blocking import block_slices, matrix_shape
from bregtop_dist.core.dispatch import launcher_missing, triton_available
from bregtop_dist.core.precondition import (
    SELECTION_BAND,
    apply_top_set,
    precondition_rotated,
    select_top_set,
    spectrum_root,
)
from bregtop_dist.core.stats import weighted_square_sums
from launch.bench import Timing, code_version, machine_info, samples, timed, write_json
from launch.cli import positive_int
from launch.models import GPT

HELP = "Triton kernels vs the torch path on GPT-2's stacks, and BregTop's share of a bf16 training step"
DEFAULT_OUT = Path("runs/bench/kernels.json")
METHOD = "bregtop-vn-v2"
EPS = 1e-8
BETA1 = 0.9
TARGETS: dict[str, tuple[str, float]] = {
    "bandwidth_vs_copy": (">=", 0.70),
    "speedup_vs_torch": (">=", 3.0),
    "bregtop_added_to_training_step": ("<=", 0.10),
}
"""Issue 14's GPU targets: figure name -> (comparison, bound)."""


@dataclass(frozen=True)
class KernelSizes:
    """The GPT-shaped model every measurement derives from, and how often each is timed."""

    layers: int
    heads: int
    dim: int
    vocab: int
    seq: int  # tokens per sequence of the training step
    batch: int
    max_precond_dim: int
    repeats: int  # timed samples per measurement (the median is reported)


GPU = KernelSizes(layers=12, heads=12, dim=768, vocab=50257, seq=1024, batch=8, max_precond_dim=1024, repeats=20)
"""GPT-2 small (124M parameters), batch 8 x 1024 tokens."""
CPU = KernelSizes(layers=2, heads=3, dim=192, vocab=50257, seq=128, batch=4, max_precond_dim=256, repeats=5)
"""GPT-2 small's block structure at 1/4 width (dim and max_precond_dim), two layers."""
QUICK = KernelSizes(layers=1, heads=1, dim=48, vocab=512, seq=16, batch=2, max_precond_dim=64, repeats=2)
"""One layer at 1/16 width: stacks 4 x 48 x 48, 3 x 48 x 64, 3 x 64 x 48 (a smoke test)."""


def build_model(sizes: KernelSizes, device: torch.device | str) -> GPT:
    """The project's GPT at ``sizes`` (``GPU`` is GPT-2 small), on ``device`` ("meta" is
    allowed: shapes only, no memory)."""
    with torch.device(device):
        return GPT(sizes.vocab, sizes.layers, sizes.heads, sizes.dim, sizes.seq)


def model_stacks(model: nn.Module, max_dim: int) -> list[tuple[int, int, int]]:
    """(blocks, m, n) of every stack BregTop forms on ``model``: its Kronecker-side matrices
    (as :func:`bregtop_dist.param_groups` picks them) cut into blocks of at most ``max_dim``
    a side, blocks of equal shape stacked; the largest stacks first."""
    shapes: Counter[tuple[int, int]] = Counter()
    for group in param_groups(model):
        if group["bregtop"]:
            for p in group["params"]:
                shapes.update(b.shape for b in block_slices(*matrix_shape(p.shape), max_dim))
    return sorted(((count, m, n) for (m, n), count in shapes.items()), key=lambda s: (-s[0], s[1], s[2]))


def triton_skip_reason(device: torch.device) -> str | None:
    """Why the Triton rows cannot run on ``device``, or None when they can (compiled on CUDA,
    interpreted with ``TRITON_INTERPRET=1``)."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if device.type != "cuda" and not interpreted:
        return "no CUDA device (TRITON_INTERPRET=1 runs them in Triton's interpreter: a wiring check, not a timing)"
    if not triton_available():
        return "triton is not installed"
    missing = None if interpreted else launcher_missing()
    if missing is not None:
        return f"Triton cannot build its launcher: {missing}"
    return None


def _stack_inputs(shape: tuple[int, int, int], device: torch.device, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """A rotated momentum (B, m, n) and positive eigenvalues (B, m), (B, n), all float32."""
    bsz, m, n = shape
    gen = torch.Generator().manual_seed(seed)
    mt = torch.randn(bsz, m, n, generator=gen)
    lam_l, lam_r = torch.randn(bsz, m, generator=gen).exp(), torch.randn(bsz, n, generator=gen).exp()
    return mt.to(device), lam_l.to(device), lam_r.to(device)


def bench_precondition(shape: tuple[int, int, int], device: torch.device, timing: Timing,
                       triton_timing: Timing | None, skip: str | None) -> dict[str, Any]:
    """Algorithm 2 on one stack: ``precondition_rotated`` whole on each backend, and its two
    parts, the selection and the masked scaling (the fused kernel also against a copy).
    Triton rows use ``triton_timing`` and are skipped with ``skip`` as the reason."""
    preset = PRESETS[METHOD]
    mt, lam_l, lam_r = _stack_inputs(shape, device, seed=0)
    # the operands the optimizer hands the selection and the scaling: root spectrum, power 1 (p = 1/2)
    root_l, root_r = spectrum_root(lam_l), spectrum_root(lam_r)
    selection = (root_l, root_r, preset.rho, preset.q, preset.c, EPS, 1.0)
    top = select_top_set(*selection)
    out = torch.empty_like(mt)

    def whole(backend: str) -> Tensor:
        return precondition_rotated(mt, lam_l, lam_r, preset.rho, preset.q, preset.c, EPS, backend)

    torch_s, want = timed(lambda: whole("torch"), device, timing)
    row: dict[str, Any] = {
        "shape": list(shape),
        "copy_s": timed(lambda: out.copy_(mt), device, timing)[0],
        "torch_selection_s": timed(lambda: select_top_set(*selection), device, timing)[0],
        "torch_apply_s": timed(lambda: apply_top_set(mt, root_l, root_r, top, EPS, 1.0), device, timing)[0],
        "torch_precondition_s": torch_s,
    }
    if skip is not None or triton_timing is None:
        return {**row, "triton_skipped": skip}
    from triton_kernels.masked_scale import masked_scale

    def kernel() -> Tensor:
        return masked_scale(mt, root_l, root_r, top.threshold, top.chi, EPS, SELECTION_BAND, out=out, power=1.0)

    kernel_s = timed(kernel, device, triton_timing)[0]
    selection_s = timed(lambda: select_top_set(*selection, kernel=True), device, triton_timing)[0]
    triton_s, got = timed(lambda: whole("triton"), device, triton_timing)
    moved = 2 * mt.numel() * mt.element_size()  # read Mt, write the result; the vectors are negligible
    return {
        **row,
        "kernel_selection_s": selection_s,
        "kernel_apply_s": kernel_s,
        "triton_precondition_s": triton_s,
        "copy_gb_s": moved / row["copy_s"] / 1e9,
        "kernel_gb_s": moved / kernel_s / 1e9,
        "bandwidth_vs_copy": row["copy_s"] / kernel_s,
        "selection_speedup_vs_torch": row["torch_selection_s"] / selection_s,
        "apply_speedup_vs_torch": row["torch_apply_s"] / kernel_s,
        "speedup_vs_torch": torch_s / triton_s,
        "max_rel_diff": float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)),
    }


def bench_rotated_stats(shape: tuple[int, int, int], device: torch.device, timing: Timing,
                        triton_timing: Timing | None, skip: str | None) -> dict[str, Any]:
    """Eigenvalue statistics and momentum on one stack, as the step does them on each backend
    (vn-v2's per-block scalar weights): torch sums + ``lerp``, or a copy + the fused kernel."""
    gen = torch.Generator().manual_seed(1)
    gt, momentum = (torch.randn(shape, generator=gen).to(device) for _ in range(2))
    w_l, w_r = (torch.rand(shape[0], 1, generator=gen).to(device) for _ in range(2))

    def reference() -> tuple[Tensor, Tensor, Tensor]:
        diag_l, diag_r = weighted_square_sums(gt, w_l, w_r)
        return diag_l, diag_r, torch.lerp(momentum, gt, 1.0 - BETA1)

    row: dict[str, Any] = {"shape": list(shape), "torch_s": timed(reference, device, timing)[0]}
    if skip is not None or triton_timing is None:
        return {**row, "triton_skipped": skip}
    from triton_kernels.rotated_stats import rotated_stats

    def fused() -> tuple[Tensor, Tensor]:
        return rotated_stats(gt, w_l, w_r, momentum.clone(), BETA1)

    kernel_s = timed(fused, device, triton_timing)[0]
    return {**row, "kernel_s": kernel_s, "speedup_vs_torch": row["torch_s"] / kernel_s}


def bench_training_step(sizes: KernelSizes, device: torch.device) -> dict[str, Any]:
    """Median forward+backward (bf16 autocast on CUDA), AdamW step and BregTop step, and the
    BregTop step's mean over one refresh period (refreshes are staggered over it)."""
    torch.manual_seed(0)
    model = build_model(sizes, device)
    tokens = torch.randint(0, sizes.vocab, (sizes.batch, sizes.seq + 1), device=device)
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    bf16 = device.type == "cuda"

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            _, loss = model(inputs, targets)
        assert loss is not None
        loss.backward()

    fwd_bwd_s = timed(forward_backward, device, Timing(sizes.repeats))[0]
    forward_backward()  # leave gradients in place for the optimizer steps
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    adamw_s = timed(adamw.step, device, Timing(sizes.repeats))[0]
    bregtop = BregTop(param_groups(model), lr=1e-4, method=METHOD, max_precond_dim=sizes.max_precond_dim)
    period = int(bregtop.param_groups[0]["precondition_frequency"])
    bregtop_s = timed(bregtop.step, device, Timing(max(sizes.repeats, 2 * period)))[0]
    mean_s = statistics.fmean(samples(bregtop.step, device, Timing(period, warmup=0))[0])  # each refresh phase once
    return {
        "model": {"layers": sizes.layers, "heads": sizes.heads, "dim": sizes.dim, "vocab": sizes.vocab,
                  "seq": sizes.seq, "batch": sizes.batch, "params": sum(p.numel() for p in model.parameters()),
                  "autocast": "bf16" if bf16 else "off (float32)"},
        "forward_backward_s": fwd_bwd_s,
        "adamw_step_s": adamw_s,
        "adamw_fused": device.type == "cuda",
        "bregtop_step_median_s": bregtop_s,
        "bregtop_step_mean_s": mean_s,
        "bregtop_vs_adamw": bregtop_s / adamw_s,
        "bregtop_added_to_training_step": (mean_s - adamw_s) / (fwd_bwd_s + adamw_s),
    }


def check_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Each figure of :data:`TARGETS` per stack (and the step), its bound, and whether it is
    met: None where it was not measured or not on a GPU (the targets are for a GPU)."""
    on_gpu = result["machine"]["device_type"] == "cuda"
    rows: list[dict[str, Any]] = []
    for name, (op, bound) in TARGETS.items():
        sources = ([(None, result["training_step"])] if name == "bregtop_added_to_training_step"
                   else [(r["shape"], r) for r in result["precondition"]])
        for shape, src in sources:
            value = src.get(name)
            met = None if value is None or not on_gpu else (value >= bound if op == ">=" else value <= bound)
            rows.append({"figure": name, "shape": shape, "value": value, "target": f"{op} {bound:g}", "met": met})
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--repeats", type=positive_int, help="timed samples per measurement")


def describe_machine(device: torch.device) -> dict[str, Any]:
    """:func:`machine_info` plus the device, CUDA and Triton versions, and how Triton runs."""
    machine = machine_info()
    machine["device_type"] = device.type
    machine["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    machine["cuda"] = torch.version.cuda
    try:
        import triton

        machine["triton"] = triton.__version__
    except ImportError:
        machine["triton"] = None
    machine["triton_interpret"] = os.environ.get("TRITON_INTERPRET") == "1"
    return machine


INTERPRETED_ONCE = "interpreted: Triton rows on the first stack only"


def triton_plans(count: int, timing: Timing, skip: str | None) -> list[tuple[Timing | None, str | None]]:
    """Per stack, how its Triton rows are timed, or why they are skipped: like the torch rows
    when compiled; once, on the first stack only, when interpreted (a check that they run,
    not a timing)."""
    if skip is not None:
        return [(None, skip)] * count
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [(Timing(repeats=1, warmup=0), None)] + [(None, INTERPRETED_ONCE)] * (count - 1)
    return [(timing, None)] * count


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = QUICK if args.quick else (GPU if device.type == "cuda" else CPU)
    if args.repeats:
        sizes = KernelSizes(**{**asdict(sizes), "repeats": args.repeats})
    machine = describe_machine(device)
    skip = triton_skip_reason(device)
    timing = Timing(repeats=sizes.repeats, inner=10 if device.type == "cuda" else 1)
    stacks = model_stacks(build_model(sizes, "meta"), sizes.max_precond_dim)
    plans = triton_plans(len(stacks), timing, skip)
    print(f"[bench kernels] device {machine['device']}; stacks {stacks}; triton rows: {skip or 'run'}",
          file=sys.stderr, flush=True)
    result: dict[str, Any] = {
        "machine": machine,
        "settings": {**asdict(sizes), "method": METHOD, "calls_per_sample": timing.inner, "stacks": stacks,
                     "code_version": code_version()},
        "precondition": [bench_precondition(s, device, timing, *plan) for s, plan in zip(stacks, plans)],
        "rotated_stats": [bench_rotated_stats(s, device, timing, *plan) for s, plan in zip(stacks, plans)],
        "training_step": bench_training_step(sizes, device),
    }
    result["targets"] = check_targets(result)
    write_json(args.out, result)
    print(format_report(result))
    print(f"wrote {args.out}")
    return 0


def _ms(row: dict[str, Any], key: str) -> str:
    return f"{row[key] * 1e3:.3f}" if key in row else "-"


def _ratio(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.2f}" if key in row else "-"


def format_report(result: dict[str, Any]) -> str:
    """The tables printed to stdout: per-stack times (ms) and ratios, the step, the targets."""
    m = result["machine"]
    lines = [f"device: {m['device']}; torch {m['torch']}, cuda {m['cuda']}, triton {m['triton']}; {m['date_utc']}", "",
             "Algorithm 2 per stack (ms)  ---------- torch ----------  ---------- triton ---------    copy",
             "                              select    apply    whole    select    apply    whole"]
    for r in result["precondition"]:
        cells = [_ms(r, k) for k in ("torch_selection_s", "torch_apply_s", "torch_precondition_s",
                                     "kernel_selection_s", "kernel_apply_s", "triton_precondition_s", "copy_s")]
        lines.append(f"  {str(tuple(r['shape'])):<24}" + "".join(f"{c:>9}" for c in cells))
    lines += ["", "ratios per stack             kernel vs copy  select vs torch  apply vs torch  whole vs torch"]
    for r in result["precondition"]:
        cells = [_ratio(r, k) for k in ("bandwidth_vs_copy", "selection_speedup_vs_torch", "apply_speedup_vs_torch",
                                        "speedup_vs_torch")]
        lines.append(f"  {str(tuple(r['shape'])):<24}{cells[0]:>16}{cells[1]:>17}{cells[2]:>16}{cells[3]:>16}")
    lines += ["", "statistics + momentum (ms)    torch   kernel  vs torch"]
    for r in result["rotated_stats"]:
        lines.append(f"  {str(tuple(r['shape'])):<24}{_ms(r, 'torch_s'):>9}{_ms(r, 'kernel_s'):>9}"
                     f"{_ratio(r, 'speedup_vs_torch'):>10}")
    skipped = {r["triton_skipped"] for r in result["precondition"] if r.get("triton_skipped")}
    lines += [f"  Triton rows skipped: {reason}" for reason in sorted(skipped)]
    t = result["training_step"]
    lines += ["", f"training step, model {t['model']}:",
              f"  forward+backward {t['forward_backward_s'] * 1e3:.2f} ms, AdamW step {t['adamw_step_s'] * 1e3:.2f} ms, "
              f"BregTop step median {t['bregtop_step_median_s'] * 1e3:.2f} ms / mean {t['bregtop_step_mean_s'] * 1e3:.2f}"
              f" ms ({t['bregtop_vs_adamw']:.1f}x AdamW); BregTop adds "
              f"{100 * t['bregtop_added_to_training_step']:.1f}% to a training step", "",
              "targets (GPU):"]
    lines += [f"  {target_line(g)}" for g in result["targets"]]
    return "\n".join(lines)


def target_line(g: dict[str, Any]) -> str:
    """One row of :func:`check_targets` as text: figure, stack, value, bound, verdict."""
    if g["value"] is None:
        value, verdict = "-", "not measured"
    else:
        value = f"{g['value']:.3f}"
        verdict = {True: "met", False: "NOT met", None: "not judged (not a GPU)"}[g["met"]]
    where = f" {tuple(g['shape'])}" if g["shape"] else ""
    return f"{g['figure']}{where}: {value} (target {g['target']}): {verdict}"
