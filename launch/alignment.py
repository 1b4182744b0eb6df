"""Hessian-covariance eigenspace alignment on SST-2-1k (the paper's section 4, Table 3,
appendix C): train the two-layer Transformer with SGD, and at each checkpoint compare, for
the Q/K/V blocks of one layer, the top eigenspace of the mini-batch gradient covariance with
the Hessian's (Overlap@k and a band overlap).

    python -m launch.alignment                      # the paper's setup, exact block Hessians
    python -m launch.alignment --hessian lanczos    # faster, Ritz vectors instead

Writes OUT/alignment.json, OUT/alignment.md (the table beside the paper's) and
OUT/alignment.png (overlap of the top-k spaces against k).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bregtop_dist.analysis import (
    band_overlap,
    block_hessian,
    chance_overlap,
    covariance_eigenbasis,
    hvp_operator,
    lanczos,
    top_eigenpairs,
)
from launch.jobconfig import ConfigError, from_sources, job_parser, parse_list
from launch.sst2_data import DataError
from launch.sst2_subset import (
    BLOCKS,
    ProbeSettings,
    block_name,
    build_model,
    load_subset,
    minibatch_gradients,
    sgd_checkpoints,
    subset_loss,
)

PAPER_TABLE3 = {  # step -> block -> (Overlap@5, BandOverlap@180-200)
    100: {"q": (0.825, 0.091), "k": (0.763, 0.102), "v": (0.896, 0.098)},
    1000: {"q": (0.804, 0.097), "k": (0.748, 0.105), "v": (0.855, 0.103)},
}


@dataclass(frozen=True)
class AlignmentConfig(ProbeSettings):
    """Every setting of the job; ``--config FILE`` (YAML) may set any of them."""

    checkpoints: str = "100,1000"  # SGD steps at which to measure
    layer: int = 2  # 1-based: the paper measures the second layer
    blocks: str = "q,k,v"
    gradients: int = 200  # N mini-batch gradients for the covariance
    top: int = 5  # Overlap@top
    band: str = "180,200"  # the band overlap's index range, 1-based inclusive
    hessian: str = "exact"  # "exact" (one Hessian-vector product per coordinate) or "lanczos"
    lanczos_steps: int = 600
    out: Path = Path("runs/alignment")

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_list(self.checkpoints, "checkpoints", minimum=1)
        lo, hi = self.band_range
        if lo > hi:
            raise ValueError(f"band={self.band!r} must be 'lo,hi' with lo <= hi")
        if not 1 <= self.layer <= self.layers:
            raise ValueError(f"layer={self.layer} must be in 1..{self.layers} (layers={self.layers})")
        unknown = [b for b in self.block_list if b not in BLOCKS]
        if unknown or not self.block_list:
            raise ValueError(f"blocks={self.blocks!r} must be a comma-separated subset of {', '.join(BLOCKS)}")
        if self.hessian not in ("exact", "lanczos"):
            raise ValueError(f"hessian={self.hessian!r} is not allowed; use exact or lanczos")
        if self.gradients < hi:
            raise ValueError(f"gradients={self.gradients} must be at least the band's end {hi} (the covariance has rank <= N)")
        if hi > self.dim * self.dim or self.top > hi:
            raise ValueError(f"top={self.top} and band={self.band!r} must fit in a block of {self.dim * self.dim}")
        if self.hessian == "lanczos" and not hi <= self.lanczos_steps <= self.dim * self.dim:
            raise ValueError(f"lanczos_steps={self.lanczos_steps} must be in {hi}..{self.dim * self.dim}")

    @property
    def block_list(self) -> tuple[str, ...]:
        return tuple(b.strip() for b in self.blocks.split(",") if b.strip())

    @property
    def band_range(self) -> tuple[int, int]:
        values = parse_list(self.band, "band", minimum=1)
        if len(values) != 2:
            raise ValueError(f"band={self.band!r} must be two integers 'lo,hi'")
        return values[0], values[1]


def hessian_eigenpairs(cfg: AlignmentConfig, loss: Any, W: torch.Tensor, k: int) -> tuple[Any, float]:
    """The top-k Hessian eigenpairs of one block and the seconds they took."""
    start = time.perf_counter()
    if cfg.hessian == "exact":
        pairs = top_eigenpairs(block_hessian(loss, W), k)
    else:
        pairs = lanczos(hvp_operator(loss, W), W.numel(), k, cfg.lanczos_steps, seed=cfg.seed)
    return pairs, time.perf_counter() - start


def measure(cfg: AlignmentConfig) -> dict[str, Any]:
    data, vocab = load_subset(cfg)
    model = build_model(cfg, vocab)
    buckets = data.length_buckets()
    lo, hi = cfg.band_range
    names = {b: block_name(cfg.layer - 1, b) for b in cfg.block_list}
    params = dict(model.named_parameters())
    losses: list[float] = []
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for step in sgd_checkpoints(model, data, cfg, parse_list(cfg.checkpoints, "checkpoints", minimum=1), losses):
        grads = minibatch_gradients(model, data, list(names.values()), cfg.gradients, cfg.batch_size, cfg.seed + step)
        row: dict[str, Any] = {"train_loss_last50": sum(losses[-50:]) / len(losses[-50:])}
        for block, name in names.items():
            W = params[name].detach()
            loss = subset_loss(model, buckets, name)
            cov_values, U_C = covariance_eigenbasis(grads[name])
            pairs, seconds = hessian_eigenpairs(cfg, loss, W, hi)
            with torch.no_grad():
                row["subset_loss"] = float(loss(W))
            row[block] = {
                "overlap_top": band_overlap(pairs.vectors, U_C, 1, cfg.top),
                "band_overlap": band_overlap(pairs.vectors, U_C, lo, hi),
                "overlap_at_k": [band_overlap(pairs.vectors, U_C, 1, k) for k in range(1, hi + 1)],
                "hessian_eigenvalues": pairs.values.tolist(),
                "ritz_residuals": pairs.residuals.tolist(),
                # how far the band's Hessian vectors are from eigenvectors (0 when exact)
                "band_relative_residual": float((pairs.residuals[lo - 1 :] / pairs.values[lo - 1 :].abs()).max()),
                "covariance_eigenvalues": cov_values[:hi].tolist(),
                "hessian_seconds": seconds,
            }
            print(f"step {step} {block}: Overlap@{cfg.top} {row[block]['overlap_top']:.3f}, "
                  f"BandOverlap@{lo}-{hi} {row[block]['band_overlap']:.3f} ({seconds:.0f} s)", flush=True)
        results[str(step)] = row
    d = cfg.dim * cfg.dim
    return {
        "settings": {k: str(v) for k, v in asdict(cfg).items()},
        "block_dim": d,
        "chance": {"overlap_top": chance_overlap(d, cfg.top), "band_overlap": chance_overlap(d, hi - lo + 1)},
        "results": results,
        "wall_time_s": time.perf_counter() - started,
        "machine": machine(),
    }


def machine() -> str:
    import platform

    return f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads, torch {torch.__version__}".replace("  ", " ")


def format_table(report: dict[str, Any], top: int, band: tuple[int, int]) -> str:
    """A markdown table of the measured overlaps beside the paper's Table 3."""
    steps = list(report["results"])
    blocks = [b for b in BLOCKS if b in report["results"][steps[0]]]
    head = "| Metric | " + " | ".join(f"step {s} {b.upper()}" for s in steps for b in blocks) + " |"
    lines = [head, "|" + "---|" * (1 + len(steps) * len(blocks))]
    lo, hi = band
    for key, label, index in (("overlap_top", f"Overlap@{top}", 0), ("band_overlap", f"BandOverlap@{lo}-{hi}", 1)):
        measured = [f"{report['results'][s][b][key]:.3f}" for s in steps for b in blocks]
        paper = [
            f"{PAPER_TABLE3[int(s)][b][index]:.3f}" if int(s) in PAPER_TABLE3 and (top, band) == (5, (180, 200)) else "-"
            for s in steps for b in blocks
        ]
        lines.append(f"| {label}, measured | " + " | ".join(measured) + " |")
        lines.append(f"| {label}, paper | " + " | ".join(paper) + " |")
        lines.append(f"| {label}, random subspaces | " + " | ".join([f"{report['chance'][key]:.3f}"] * len(measured)) + " |")
    worst = max(report["results"][s][b]["band_relative_residual"] for s in steps for b in blocks)
    if worst > 1e-2:
        lines.append(f"\nThe band's Hessian vectors are not converged (Ritz residual up to {worst:.2g} of the "
                     "eigenvalue): its overlap is not meaningful; use --hessian exact or more --lanczos-steps.")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = list(report["results"])
    fig, axes = plt.subplots(1, len(steps), figsize=(5 * len(steps), 3.8), squeeze=False, sharey=True)
    for ax, step in zip(axes[0], steps, strict=True):
        row = report["results"][step]
        for block in (b for b in BLOCKS if b in row):
            curve = row[block]["overlap_at_k"]
            ax.plot(range(1, len(curve) + 1), curve, label=block.upper())
        k = range(1, len(curve) + 1)
        ax.plot(k, [(i / report["block_dim"]) ** 0.5 for i in k], "k:", label="random")
        ax.set(title=f"step {step}", xlabel="k (top-k eigenspaces)", xscale="log")
    axes[0][0].set_ylabel("overlap of top-k Hessian and covariance spaces")
    axes[0][0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser():  # type: ignore[no-untyped-def]
    return job_parser(AlignmentConfig, "python -m launch.alignment", __doc__.split("\n\n")[0], "configs/analysis/")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = from_sources(AlignmentConfig, args.config, args)
        report = measure(cfg)
    except (ConfigError, DataError) as err:
        print(f"python -m launch.alignment: error: {err}", file=sys.stderr)
        return 2
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "alignment.json").write_text(json.dumps(report, indent=1) + "\n")
    table = format_table(report, cfg.top, cfg.band_range)
    (out / "alignment.md").write_text(table + "\n")
    plot(report, out / "alignment.png")
    print(table)
    print(f"{report['wall_time_s']:.0f} s on {report['machine']}; wrote {out}/alignment.json, alignment.md, alignment.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
