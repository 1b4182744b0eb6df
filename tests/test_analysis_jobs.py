"""The analysis jobs (launch.alignment, launch.spectra) and their SST-2-1k setup, at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bregtop_dist.analysis import block_hessian
from launch import alignment, spectra
from launch.jobconfig import from_sources
from launch.models import ProbeClassifier
from launch.sst2_subset import (
    ProbeSettings,
    block_name,
    build_model,
    load_subset,
    minibatch_gradients,
    mse,
    sgd_checkpoints,
    subset_loss,
)

TINY = ["--samples", "48", "--dim", "8", "--heads", "2", "--ff", "16", "--vocab-size", "300", "--batch-size", "8"]


@pytest.fixture
def tiny(tmp_path: Path) -> ProbeSettings:
    return ProbeSettings(samples=48, dim=8, heads=2, ff=16, vocab_size=300, batch_size=8, cache_dir=tmp_path / "cache")


def test_padding_does_not_change_the_scores() -> None:
    model = ProbeClassifier(50, dim=8, heads=2, ff=16, max_len=10)
    ids = torch.randint(4, 50, (1, 5))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    short = model(ids, torch.ones_like(ids, dtype=torch.bool))
    assert torch.allclose(model(padded, padded != 0), short, atol=1e-6)


def test_the_default_subset_uses_the_shipped_vocabulary(tmp_path: Path) -> None:
    """The WordPiece trainer is not deterministic, so the measured tables depend on the shipped
    vocabulary being found (and nothing being trained) for the default settings."""
    data, vocab = load_subset(ProbeSettings(cache_dir=tmp_path))
    assert vocab == 4000 and len(data) == 1000
    assert not any(tmp_path.iterdir())


def test_subset_loss_is_the_mean_over_all_samples(tiny: ProbeSettings) -> None:
    data, vocab = load_subset(tiny)
    assert len(data) == 48
    model = build_model(tiny, vocab)
    name = block_name(1, "v")
    W = dict(model.named_parameters())[name].detach()
    everything = data.batch(list(range(48)))
    with torch.no_grad():
        direct = mse(model(everything["ids"], everything["mask"]), everything["labels"])
        bucketed = subset_loss(model, data.length_buckets(size=10), name)(W)
    assert float(bucketed) == pytest.approx(float(direct), rel=1e-5)


def test_block_hessian_of_the_model_matches_autograd(tiny: ProbeSettings) -> None:
    data, vocab = load_subset(tiny)
    model = build_model(tiny, vocab).double()
    name = block_name(1, "q")
    loss = subset_loss(model, data.length_buckets(size=16), name)
    W = dict(model.named_parameters())[name].detach()
    expected = torch.autograd.functional.hessian(loss, W).reshape(64, 64)
    assert float(expected.abs().max()) > 0
    assert torch.allclose(block_hessian(loss, W), (expected + expected.T) / 2, rtol=1e-8, atol=1e-12)


def test_sgd_checkpoints_and_gradients(tiny: ProbeSettings) -> None:
    data, vocab = load_subset(tiny)
    model = build_model(tiny, vocab)
    losses: list[float] = []
    assert list(sgd_checkpoints(model, data, tiny, (7, 3), losses)) == [3, 7]
    assert len(losses) == 7 and all(v > 0 for v in losses)
    name = block_name(0, "k")
    before = model.layers[0].k.weight.detach().clone()
    grads = minibatch_gradients(model, data, [name], count=5, batch_size=8, seed=0)[name]
    assert grads.shape == (5, 64) and torch.equal(model.layers[0].k.weight, before)
    gen = torch.Generator().manual_seed(0)
    first = data.batch(torch.randperm(48, generator=gen)[:8].tolist())
    (g,) = torch.autograd.grad(mse(model(first["ids"], first["mask"]), first["labels"]), [model.layers[0].k.weight])
    assert torch.allclose(grads[0].float(), g.reshape(-1), atol=1e-7)


def test_alignment_job_writes_the_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = [*TINY, "--cache-dir", str(tmp_path / "cache"), "--checkpoints", "2,4", "--gradients", "12",
              "--top", "2", "--band", "5,10"]
    assert alignment.main([*common, "--out", str(tmp_path / "exact")]) == 0
    report = json.loads((tmp_path / "exact" / "alignment.json").read_text())
    assert list(report["results"]) == ["2", "4"]
    for step in ("2", "4"):
        for block in "qkv":
            row = report["results"][step][block]
            assert 0.0 <= row["band_overlap"] <= 1.0 and 0.0 <= row["overlap_top"] <= 1.0
            assert row["overlap_at_k"][1] == pytest.approx(row["overlap_top"])
            assert len(row["hessian_eigenvalues"]) == 10
    table = (tmp_path / "exact" / "alignment.md").read_text()
    assert "| Overlap@2, measured |" in table and "| BandOverlap@5-10, paper | - |" in table
    assert (tmp_path / "exact" / "alignment.png").stat().st_size > 0
    # Lanczos run to the full dimension spans the whole space: the same eigenvectors
    assert alignment.main([*common, "--hessian", "lanczos", "--lanczos-steps", "64", "--out", str(tmp_path / "lz")]) == 0
    lanczos = json.loads((tmp_path / "lz" / "alignment.json").read_text())
    for block in "qkv":
        exact_row, lz_row = report["results"]["4"][block], lanczos["results"]["4"][block]
        assert lz_row["overlap_top"] == pytest.approx(exact_row["overlap_top"], abs=1e-4)
        assert lz_row["hessian_eigenvalues"][:2] == pytest.approx(exact_row["hessian_eigenvalues"][:2], rel=1e-3)
    assert "not converged" not in (tmp_path / "lz" / "alignment.md").read_text()
    # too few steps for the band: the table says so
    assert alignment.main([*common, "--hessian", "lanczos", "--lanczos-steps", "10", "--out", str(tmp_path / "short")]) == 0
    assert "The band's Hessian vectors are not converged" in (tmp_path / "short" / "alignment.md").read_text()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--band", "200,180"], "band='200,180' must be 'lo,hi' with lo <= hi"),
        (["--band", "a,b"], "band='a,b' must be comma-separated int values"),
        (["--blocks", "q,x"], "blocks='q,x' must be a comma-separated subset of q, k, v"),
        (["--hessian", "power"], "hessian='power' is not allowed; use exact or lanczos"),
        (["--gradients", "100"], "gradients=100 must be at least the band's end 200"),
        (["--layer", "3"], "layer=3 must be in 1..2"),
        (["--checkpoints", "0,100"], "checkpoints='0,100' must list integers >= 1"),
    ],
)
def test_alignment_rejects_bad_settings(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert alignment.main(args) == 2
    assert message in capsys.readouterr().err


def test_spectra_job_writes_the_tables(tmp_path: Path) -> None:
    args = [*TINY, "--cache-dir", str(tmp_path / "cache"), "--sizes", "2x3,3x3", "--seeds", "2", "--bands", "0,0.5,1",
            "--checkpoint", "3", "--gradients", "40", "--out", str(tmp_path)]
    assert spectra.main(args) == 0
    report = json.loads((tmp_path / "spectra.json").read_text())
    assert set(report["random"]) == {f"{f} {s}" for f in spectra.FAMILIES for s in ("2x3", "3x3")}
    case = report["random"]["powerlaw 3x3"]
    assert sum(case["best_on_top_count"].values()) == 2
    assert set(case["band_errors"]) == {"frobenius", "von_neumann", "logdet"}
    assert len(report["gradients"]) == 3
    assert all(len(c["band_errors"]["logdet"]) == 2 for c in report["gradients"].values())
    assert "| divergence | 0-50% | 50-100% | spread |" in (tmp_path / "spectra.md").read_text()
    assert (tmp_path / "spectra.png").stat().st_size > 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sizes", "8by16"], "sizes='8by16': '8by16' must be MxN with positive integers"),
        (["--families", "gaussian"], "'gaussian' is not one of wishart, powerlaw, kron-noise"),
        (["--bands", "0,0.6,0.4,1"], "bands must rise strictly from 0.0 to 1.0"),
        (["--head", "8"], "head=8 must be in 0..7"),
        (["--damping", "-1"], "damping=-1.0 must be >= 0"),
    ],
)
def test_spectra_rejects_bad_settings(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert spectra.main(args) == 2
    assert message in capsys.readouterr().err


def test_shipped_analysis_configs_parse() -> None:
    root = Path(__file__).resolve().parent.parent / "configs" / "analysis"
    table3 = from_sources(alignment.AlignmentConfig, root / "table3.yaml", alignment.build_parser().parse_args([]))
    assert (table3.band_range, table3.gradients, table3.samples) == ((180, 200), 200, 1000)
    spec = from_sources(spectra.SpectraConfig, root / "spectra.yaml", spectra.build_parser().parse_args([]))
    assert spec.size_list == ((8, 16), (16, 16))
