"""Spectral preferences of the Bregman Kronecker projections (the paper's section 3.2 and
Table 2, measured): project dense SPD matrices onto the Kronecker manifold with each
divergence and report how large the error |log(u_i^T S u_i / lambda_i)| is in each band of
the spectrum, for (a) random SPD matrices of three families and (b) gradient covariances
of per-head Q/K/V blocks of the SST-2-1k model (the appendix-C setup).

    python -m launch.spectra --out docs/results/spectra

Writes OUT/spectra.json, OUT/spectra.md and OUT/spectra.png.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from bregtop_dist.analysis import KINDS, SpectralReport, spectral_error_report
from bregtop_dist.analysis.spectral import band_label, check_bands
from launch.jobconfig import ConfigError, check_positive, from_sources, job_parser, parse_list
from launch.sst2_data import DataError
from launch.sst2_subset import (
    BLOCKS,
    ProbeSettings,
    block_name,
    build_model,
    load_subset,
    minibatch_gradients,
    sgd_checkpoints,
)

FAMILIES = ("wishart", "powerlaw", "kron-noise")
PAPER_TABLE2 = {
    "frobenius": "strongest emphasis on top spectrum",
    "von_neumann": "soft preference for top spectrum",
    "logdet": "broad spectrum, including small-eigenvalue directions",
}


@dataclass(frozen=True)
class SpectraConfig(ProbeSettings):
    """Every setting of the job; ``--config FILE`` (YAML) may set any of them."""

    sizes: str = "8x16,16x16"  # m x n of the random cases
    families: str = "wishart,powerlaw,kron-noise"
    seeds: int = 5  # random matrices per family and size
    bands: str = "0,0.05,0.2,0.5,0.8,1"  # band edges as fractions of the spectrum, top first
    checkpoint: int = 1000  # SGD step of the SST-2-1k model whose covariances are measured
    layer: int = 2
    blocks: str = "q,k,v"
    head: int = 0  # the rows of this attention head: a (dim/heads) x dim block
    gradients: int = 2048  # mini-batch gradients per covariance
    damping: float = 1e-6  # C + damping * Tr(C)/d * I, so that C is positive definite
    out: Path = Path("runs/spectra")

    def __post_init__(self) -> None:
        super().__post_init__()
        self.size_list  # noqa: B018 - validates
        check_bands(self.band_list)
        unknown = [f for f in parse_list(self.families, "families", str) if f not in FAMILIES]
        if unknown:
            raise ValueError(f"families={self.families!r}: {unknown[0]!r} is not one of {', '.join(FAMILIES)}")
        bad_blocks = [b for b in parse_list(self.blocks, "blocks", str) if b not in BLOCKS]
        if bad_blocks:
            raise ValueError(f"blocks={self.blocks!r} must be a comma-separated subset of {', '.join(BLOCKS)}")
        if not 1 <= self.layer <= self.layers:
            raise ValueError(f"layer={self.layer} must be in 1..{self.layers} (layers={self.layers})")
        if not 0 <= self.head < self.heads:
            raise ValueError(f"head={self.head} must be in 0..{self.heads - 1}")
        check_positive(self, ("seeds", "checkpoint", "gradients"))
        if not self.damping >= 0:
            raise ValueError(f"damping={self.damping!r} must be >= 0")

    @property
    def size_list(self) -> tuple[tuple[int, int], ...]:
        sizes = []
        for item in parse_list(self.sizes, "sizes", str):
            parts = item.lower().split("x")
            if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"sizes={self.sizes!r}: {item!r} must be MxN with positive integers, e.g. 8x16")
            sizes.append((int(parts[0]), int(parts[1])))
        return tuple(sizes)

    @property
    def band_list(self) -> tuple[float, ...]:
        return parse_list(self.bands, "bands", float)


def random_spd(family: str, m: int, n: int, gen: torch.Generator) -> Tensor:
    """A dense SPD matrix of size mn: ``wishart`` X X^T / 2d; ``powerlaw`` random
    eigenvectors with eigenvalues i^-1.5; ``kron-noise`` a Kronecker product of two
    power-law factors plus 10% Wishart noise (near the manifold, like gradient covariances)."""
    d = m * n

    def haar(k: int) -> Tensor:
        return torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))[0]

    def powerlaw(k: int) -> Tensor:
        Q = haar(k)
        return (Q * torch.arange(1, k + 1, dtype=torch.float64) ** -1.5) @ Q.T

    X = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64)
    wishart = X @ X.T / (2 * d)
    if family == "wishart":
        return wishart
    if family == "powerlaw":
        return powerlaw(d)
    K = torch.kron(powerlaw(m), powerlaw(n))
    return K + 0.1 * torch.trace(K) / d * wishart


def summarise(report: SpectralReport) -> dict[str, Any]:
    return {
        "bands": report.labels,
        "band_errors": {k: list(e.band_errors) for k, e in report.errors.items()},
        "spread": {k: e.spread for k, e in report.errors.items()},
        "divergence": {k: e.projection.divergence for k, e in report.errors.items()},
        "iterations": {k: e.projection.iterations for k, e in report.errors.items()},
        "best_on_top": report.best_on_top(),
        "most_even": report.most_even(),
        "condition": float(report.evals[0] / report.evals[-1]),
    }


def random_cases(cfg: SpectraConfig) -> dict[str, Any]:
    cases: dict[str, Any] = {}
    for family in parse_list(cfg.families, "families", str):
        for m, n in cfg.size_list:
            runs = []
            for seed in range(cfg.seeds):
                gen = torch.Generator().manual_seed(cfg.seed * 1000 + seed)
                runs.append(summarise(spectral_error_report(random_spd(family, m, n, gen), m, n, bands=cfg.band_list)))
            cases[f"{family} {m}x{n}"] = aggregate(runs)
            print(f"random {family} {m}x{n}: done", flush=True)
    return cases


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians over seeds, and how often each divergence was best on top / most even."""
    out = {"bands": runs[0]["bands"], "seeds": len(runs)}
    out["band_errors"] = {k: [statistics.median(r["band_errors"][k][b] for r in runs) for b in range(len(out["bands"]))]
                          for k in KINDS}
    out["spread"] = {k: statistics.median(r["spread"][k] for r in runs) for k in KINDS}
    out["best_on_top_count"] = {k: sum(r["best_on_top"] == k for r in runs) for k in KINDS}
    out["most_even_count"] = {k: sum(r["most_even"] == k for r in runs) for k in KINDS}
    out["condition"] = statistics.median(r["condition"] for r in runs)
    return out


def gradient_cases(cfg: SpectraConfig) -> dict[str, Any]:
    """Covariances of per-head Q/K/V gradient blocks of the trained SST-2-1k model."""
    data, vocab = load_subset(cfg)
    model = build_model(cfg, vocab)
    for _ in sgd_checkpoints(model, data, cfg, (cfg.checkpoint,), []):
        pass
    blocks = parse_list(cfg.blocks, "blocks", str)
    names = [block_name(cfg.layer - 1, b) for b in blocks]
    grads = minibatch_gradients(model, data, names, cfg.gradients, cfg.batch_size, cfg.seed + 1)
    m, n = cfg.dim // cfg.heads, cfg.dim
    cases = {}
    for block, name in zip(blocks, names, strict=True):
        G = grads[name].view(cfg.gradients, cfg.dim, cfg.dim)[:, cfg.head * m : (cfg.head + 1) * m].reshape(cfg.gradients, -1)
        C = G.T @ G / cfg.gradients
        C = C + cfg.damping * torch.trace(C) / C.shape[0] * torch.eye(C.shape[0], dtype=C.dtype)
        cases[f"SST-2 layer {cfg.layer} {block.upper()} head {cfg.head} ({m}x{n})"] = summarise(
            spectral_error_report(C, m, n, bands=cfg.band_list)
        )
        print(f"gradient covariance {block}: done", flush=True)
    return cases


def format_tables(report: dict[str, Any]) -> str:
    lines = []
    for title, cases in (("Random SPD matrices (medians over seeds)", report["random"]),
                         ("SST-2-1k gradient covariances", report["gradients"])):
        lines += [f"### {title}", ""]
        for name, case in cases.items():
            lines.append(f"**{name}** (condition number {case['condition']:.3g})")
            lines.append("")
            lines.append("| divergence | " + " | ".join(case["bands"]) + " | spread |" +
                         (" best on top | most even |" if "seeds" in case else ""))
            lines.append("|---|" + "---|" * (len(case["bands"]) + 1 + (2 if "seeds" in case else 0)))
            for k in KINDS:
                row = f"| {k} | " + " | ".join(f"{e:.3f}" for e in case["band_errors"][k]) + f" | {case['spread'][k]:.3f} |"
                if "seeds" in case:
                    row += f" {case['best_on_top_count'][k]}/{case['seeds']} | {case['most_even_count'][k]}/{case['seeds']} |"
                lines.append(row)
            if "seeds" not in case:
                lines.append("")
                lines.append(f"best on top: {case['best_on_top']}; most even: {case['most_even']}")
            lines.append("")
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = {**report["random"], **report["gradients"]}
    cols = 3
    rows = -(-len(cases) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (name, case) in zip(axes.flat, cases.items(), strict=False):
        x = range(len(case["bands"]))
        for k in KINDS:
            ax.plot(x, case["band_errors"][k], marker="o", label=k)
        ax.set_xticks(list(x), case["bands"], fontsize=7)
        ax.set_title(name, fontsize=9)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    axes[0][0].set_ylabel("mean |log(u^T S u / lambda)|")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build_parser():  # type: ignore[no-untyped-def]
    return job_parser(SpectraConfig, "python -m launch.spectra", __doc__.split("\n\n")[0], "configs/analysis/")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = from_sources(SpectraConfig, args.config, args)
        started = time.perf_counter()
        report = {"settings": {k: str(v) for k, v in asdict(cfg).items()},
                  "bands": [band_label(lo, hi) for lo, hi in zip(cfg.band_list[:-1], cfg.band_list[1:], strict=True)],
                  "random": random_cases(cfg), "gradients": gradient_cases(cfg)}
    except (ConfigError, DataError) as err:
        print(f"python -m launch.spectra: error: {err}", file=sys.stderr)
        return 2
    report["wall_time_s"] = time.perf_counter() - started
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spectra.json").write_text(json.dumps(report, indent=1) + "\n")
    tables = format_tables(report)
    (out / "spectra.md").write_text(tables)
    plot(report, out / "spectra.png")
    print(tables)
    print(f"{report['wall_time_s']:.0f} s; wrote {out}/spectra.json, spectra.md, spectra.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
