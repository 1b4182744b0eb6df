"""Triton kernels against their torch references, and BregTop's step inside a training step.

Three measurements, each a median over repeated calls, reported as ratios measured in the
same run:

1. masked scaling (Algorithm 2's ``Mt * W``) on stacks of blocks: the fused kernel's achieved
   bandwidth against a device-to-device copy of the same bytes, and its speedup over the
   unfused torch reference ``apply_top_set``;
2. the eigenvalue statistics fused with the momentum update, against the torch reference;
3. the whole optimizer step of ``bregtop-vn-v2`` against ``torch.optim.AdamW`` (fused on
   CUDA) on the matrices of a GPT-2-small-sized model, and the amortised BregTop step as a
   fraction of a full training step (forward + backward) of that model.

Kernel rows need a CUDA device; on a CPU only the torch references and the optimizer step
are timed (the kernels would run in Triton's interpreter, which says nothing about speed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bregtop_dist import BregTop, param_groups
from bregtop_dist.core.precondition import apply_top_set, select_top_set
from launch.bench import code_version, machine_info, median_seconds, positive_int, timer, write_json

HELP = "Triton kernels vs torch references (bandwidth, speedup) and BregTop's share of a training step"
DEFAULT_OUT = Path("runs/bench/kernels.json")


@dataclass(frozen=True)
class KernelSizes:
    """Stacks of blocks for the kernels, and the model for the step measurements."""

    stacks: tuple[tuple[int, int, int], ...]  # (blocks, m, n)
    layers: int
    dim: int
    seq: int
    batch: int
    repeats: int


GPU = KernelSizes(stacks=((48, 768, 768), (12, 1024, 3072), (4, 4096, 4096)), layers=12, dim=768, seq=1024,
                  batch=8, repeats=20)
CPU = KernelSizes(stacks=((8, 256, 256), (4, 1024, 256)), layers=2, dim=256, seq=128, batch=4, repeats=5)
QUICK = KernelSizes(stacks=((2, 32, 48),), layers=1, dim=32, seq=16, batch=2, repeats=2)


def bench_masked_scale(shape: tuple[int, int, int], device: torch.device, repeats: int) -> dict[str, Any]:
    """Fused kernel vs copy (bandwidth) and vs the unfused torch reference, on one stack."""
    bsz, m, n = shape
    gen = torch.Generator().manual_seed(0)
    mt = torch.randn(bsz, m, n, generator=gen).to(device)
    lam_l = torch.randn(bsz, m, generator=gen).exp().to(device)
    lam_r = torch.randn(bsz, n, generator=gen).exp().to(device)
    top = select_top_set(lam_l, lam_r, 0.06, 0.01, 3.0, 1e-8)
    row: dict[str, Any] = {"shape": list(shape)}
    row["torch_reference_s"] = median_seconds(lambda: apply_top_set(mt, lam_l, lam_r, top, 1e-8), device, repeats)
    if device.type != "cuda":
        return row
    from triton_kernels.masked_scale import masked_scale

    out = torch.empty_like(mt)
    copy_s = median_seconds(lambda: out.copy_(mt), device, repeats)
    kernel_s = median_seconds(
        lambda: masked_scale(mt, lam_l, lam_r, top.threshold, top.cutoff, top.chi, 1e-8, out=out), device, repeats
    )
    moved = 2 * mt.numel() * mt.element_size()  # read Mt, write the result; lam is negligible
    row.update(
        copy_s=copy_s,
        kernel_s=kernel_s,
        kernel_gb_s=moved / kernel_s / 1e9,
        copy_gb_s=moved / copy_s / 1e9,
        bandwidth_vs_copy=copy_s / kernel_s,
        speedup_vs_torch=row["torch_reference_s"] / kernel_s,
    )
    return row


def bench_rotated_stats(shape: tuple[int, int, int], device: torch.device, repeats: int) -> dict[str, Any]:
    """Fused statistics + momentum kernel vs the torch reference, on one stack."""
    bsz, m, n = shape
    gen = torch.Generator().manual_seed(1)
    gt = torch.randn(bsz, m, n, generator=gen).to(device)
    momentum = torch.randn(bsz, m, n, generator=gen).to(device)
    w_l, w_r = torch.rand(bsz, 1, device=device), torch.rand(bsz, 1, device=device)

    def reference() -> tuple[Tensor, Tensor]:
        sq = gt * gt
        momentum.lerp_(gt, 0.1)
        return (sq * w_l[:, None, :]).sum(-1), (sq * w_r[:, :, None]).sum(-2)

    row: dict[str, Any] = {"shape": list(shape), "torch_reference_s": median_seconds(reference, device, repeats)}
    if device.type != "cuda":
        return row
    from triton_kernels.rotated_stats import rotated_stats

    kernel_s = median_seconds(lambda: rotated_stats(gt, w_l, w_r, momentum, 0.9), device, repeats)
    row.update(kernel_s=kernel_s, speedup_vs_torch=row["torch_reference_s"] / kernel_s)
    return row


class GPTBlockStack(nn.Module):
    """A GPT-2-shaped decoder stack (token embedding, pre-norm blocks, tied head) for timing."""

    def __init__(self, layers: int, dim: int, vocab: int = 50257) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        block = nn.TransformerEncoderLayer(dim, dim // 64 or 1, 4 * dim, dropout=0.0, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, idx: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1], device=idx.device)
        h = self.norm(self.blocks(self.embed(idx), mask=mask, is_causal=True))
        return h @ self.embed.weight.T


def bench_training_step(sizes: KernelSizes, device: torch.device) -> dict[str, Any]:
    """Median forward+backward, AdamW step and BregTop step (bregtop-vn-v2) on the model."""
    torch.manual_seed(0)
    model = GPTBlockStack(sizes.layers, sizes.dim).to(device)
    idx = torch.randint(0, 50257, (sizes.batch, sizes.seq), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def forward_backward() -> None:
        model.zero_grad(set_to_none=True)
        with autocast:
            logits = model(idx)
        nn.functional.cross_entropy(logits.float().flatten(0, 1), idx.flatten()).backward()

    fwd_bwd_s = median_seconds(forward_backward, device, sizes.repeats)
    forward_backward()  # leave gradients in place for the optimizer steps
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    adamw_s = median_seconds(adamw.step, device, sizes.repeats)
    bregtop = BregTop(param_groups(model), lr=1e-4, method="bregtop-vn-v2")
    steps = max(sizes.repeats, 2 * 10)  # cover the refresh cycle (T = 10)
    bregtop_s = median_seconds(bregtop.step, device, steps)
    run = timer(device)
    mean_bregtop_s = statistics.fmean(run(bregtop.step) for _ in range(10))  # one full refresh cycle
    return {
        "model": {"layers": sizes.layers, "dim": sizes.dim, "seq": sizes.seq, "batch": sizes.batch,
                  "params": sum(p.numel() for p in model.parameters())},
        "forward_backward_s": fwd_bwd_s,
        "adamw_step_s": adamw_s,
        "bregtop_step_median_s": bregtop_s,
        "bregtop_step_mean_s": mean_bregtop_s,
        "bregtop_vs_adamw": bregtop_s / adamw_s,
        "bregtop_added_to_training_step": (mean_bregtop_s - adamw_s) / (fwd_bwd_s + adamw_s),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON output (default {DEFAULT_OUT})")
    parser.add_argument("--quick", action="store_true", help="tiny sizes (a smoke test)")
    parser.add_argument("--repeats", type=positive_int, help="timed calls per measurement")


def run(args: argparse.Namespace) -> int:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes = QUICK if args.quick else (GPU if device.type == "cuda" else CPU)
    if args.repeats:
        sizes = KernelSizes(**{**asdict(sizes), "repeats": args.repeats})
    machine = machine_info()
    machine["device"] = torch.cuda.get_device_name() if device.type == "cuda" else "cpu (no GPU: kernel rows empty)"
    print(f"[bench kernels] device {machine['device']}", file=sys.stderr, flush=True)
    result = {
        "machine": machine,
        "settings": {**asdict(sizes), "code_version": code_version()},
        "masked_scale": [bench_masked_scale(s, device, sizes.repeats) for s in sizes.stacks],
        "rotated_stats": [bench_rotated_stats(s, device, sizes.repeats) for s in sizes.stacks],
        "training_step": bench_training_step(sizes, device),
    }
    write_json(args.out, result)
    print(format_report(result))
    print(f"wrote {args.out}")
    return 0


def _ms(row: dict[str, Any], key: str) -> str:
    return f"{row[key] * 1e3:.3f}" if key in row else "-"


def format_report(result: dict[str, Any]) -> str:
    lines = [f"device: {result['machine']['device']}; {result['machine']['date_utc']}", "",
             "masked scaling (ms)       torch ref    kernel      copy   GB/s   vs copy   vs torch"]
    for r in result["masked_scale"]:
        extra = (f"{r['kernel_gb_s']:>7.0f}{r['bandwidth_vs_copy']:>10.2f}{r['speedup_vs_torch']:>11.2f}"
                 if "kernel_s" in r else "")
        lines.append(f"  {str(tuple(r['shape'])):<22}{_ms(r, 'torch_reference_s'):>10}{_ms(r, 'kernel_s'):>10}"
                     f"{_ms(r, 'copy_s'):>10}{extra}")
    lines += ["", "rotated stats + momentum (ms)  torch ref    kernel   vs torch"]
    for r in result["rotated_stats"]:
        extra = f"{r['speedup_vs_torch']:>11.2f}" if "kernel_s" in r else ""
        lines.append(f"  {str(tuple(r['shape'])):<27}{_ms(r, 'torch_reference_s'):>10}{_ms(r, 'kernel_s'):>10}{extra}")
    t = result["training_step"]
    lines += ["", f"training step, model {t['model']}:",
              f"  forward+backward {t['forward_backward_s'] * 1e3:.2f} ms, AdamW step {t['adamw_step_s'] * 1e3:.2f} ms, "
              f"BregTop step median {t['bregtop_step_median_s'] * 1e3:.2f} ms / mean {t['bregtop_step_mean_s'] * 1e3:.2f} ms "
              f"({t['bregtop_vs_adamw']:.1f}x AdamW); BregTop adds {100 * t['bregtop_added_to_training_step']:.1f}% "
              "to a training step (target on a GPU: <= 5%)"]
    return "\n".join(lines)
