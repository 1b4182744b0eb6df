"""The fused masked-scale kernel against its torch reference and the float64 definition.

On a GPU machine the kernel runs compiled on the GPU; elsewhere in Triton's interpreter on the
CPU (TRITON_INTERPRET=1, set in conftest.py). Inputs are drawn on the CPU and moved to
``kernel_device``. Outputs are poisoned with NaN before each call, so an element the kernel
fails to write fails.
"""

from __future__ import annotations

import math

import pytest
import torch
from reference import boundary_gap, chi_ref, top_mask_ref

from bregtop_dist import BregTop, kron_precondition
from bregtop_dist.core.dispatch import resolve_backend
from bregtop_dist.core.precondition import SELECTION_BAND, apply_top_set, select_top_set

pytest.importorskip("triton")
from triton_kernels.masked_scale import masked_scale  # noqa: E402

SHAPES = [(2, 1, 37), (2, 29, 1), (3, 7, 3), (1, 129, 65), (2, 33, 70)]


def _run_kernel(mt, lam_l, lam_r, top, eps, device):
    """The kernel on ``device``, its result back on the CPU."""
    out = torch.full_like(mt, float("nan"), device=device)
    args = (mt, lam_l, lam_r, top.threshold, top.chi)
    masked_scale(*(t.to(device) for t in args), eps, SELECTION_BAND, out=out)
    return out.cpu()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rho", [1e-3, 0.06, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_kernel_equals_reference(gen, kernel_device, shape, rho, dtype, eps):
    bsz, m, n = shape
    mt = torch.randn(bsz, m, n, generator=gen).to(dtype)
    lam_l = torch.exp(2 * torch.randn(bsz, m, generator=gen))
    lam_r = torch.exp(2 * torch.randn(bsz, n, generator=gen))
    top = select_top_set(lam_l, lam_r, rho, 0.01, 3.0, eps)
    got = _run_kernel(mt, lam_l, lam_r, top, eps, kernel_device)
    assert not torch.isnan(got).any() and got.dtype == dtype
    want = apply_top_set(mt.float(), lam_l, lam_r, top, eps).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * float(want.float().abs().max()))

    for k in range(bsz):  # the paper's definition in float64, where no entry is in the blending band
        if boundary_gap(lam_l[k].double(), lam_r[k].double(), rho) < 2 * SELECTION_BAND:
            continue
        S = torch.outer(lam_l[k].double(), lam_r[k].double())
        mask = top_mask_ref(S, rho)
        inv = 1.0 / (S.sqrt() + eps)
        W = inv if bool(mask.all()) else torch.where(mask, inv, chi_ref(S, mask, 0.01, 3.0, eps))
        ref = mt[k].double() * W
        assert torch.allclose(got[k].double(), ref, rtol=10 * tol, atol=10 * tol * float(ref.abs().max()))


@pytest.mark.parametrize("rho", [0.1, 0.5, 0.77])
def test_entries_tied_at_the_cut_all_take_the_top_scale(gen, kernel_device, rho):
    m, n = 9, 70  # more than one column tile
    lam_l = torch.randint(1, 3, (2, m), generator=gen).float()
    lam_r = torch.randint(1, 3, (2, n), generator=gen).float()
    mt = torch.randn(2, m, n, generator=gen)
    top = select_top_set(lam_l, lam_r, rho, 0.25, 2.0, 0.0)
    got = _run_kernel(mt, lam_l, lam_r, top, 0.0, kernel_device)
    for k in range(2):
        S = torch.outer(lam_l[k], lam_r[k])
        mask = top_mask_ref(S, rho)
        assert int(mask.sum()) == max(1, math.ceil(rho * m * n))
        W = torch.where(S >= S[mask].min(), S**-0.5, chi_ref(S, mask, 0.25, 2.0))
        assert torch.allclose(got[k], mt[k] * W, rtol=1e-6)


def test_kernel_blends_the_band_like_the_reference(gen, kernel_device):
    """Entries placed inside the band below the threshold: the kernel's blend equals the torch
    reference's (``selection_weights``)."""
    n = 70
    lam_l = torch.ones(2, 1)
    frac = torch.rand(2, n - 2, generator=gen)
    lam_r = torch.cat([torch.full((2, 2), 4.0), 4.0 * (1.0 - frac * SELECTION_BAND)], dim=1)  # K = 2 at rho 0.02
    mt = torch.randn(2, 1, n, generator=gen)
    top = select_top_set(lam_l, lam_r, 0.02, 0.5, 2.0, 0.0, power=1.0)
    out = torch.full_like(mt, float("nan"), device=kernel_device)
    args = (mt, lam_l, lam_r, top.threshold, top.chi)
    masked_scale(*(t.to(kernel_device) for t in args), 0.0, SELECTION_BAND, out=out, power=1.0)
    want = apply_top_set(mt, lam_l, lam_r, top, 0.0, 1.0)
    assert torch.allclose(out.cpu(), want, rtol=1e-6)
    assert not torch.allclose(want, mt * top.chi[:, None, None]) and not torch.allclose(want, mt / 4.0)


def test_bad_inputs_are_named(gen, kernel_device):
    mt = torch.randn(2, 4, 3, generator=gen).to(kernel_device)
    lam_l = (torch.rand(2, 4, generator=gen) + 0.1).to(kernel_device)
    lam_r = (torch.rand(2, 3, generator=gen) + 0.1).to(kernel_device)
    top = select_top_set(lam_l, lam_r, 0.5, 0.1, 1.0)
    with pytest.raises(ValueError, match=r"lam_l and lam_r must have shapes \(2, 4\) and \(2, 3\)"):
        masked_scale(mt, lam_r, lam_l, top.threshold, top.chi, 0.0, SELECTION_BAND)
    with pytest.raises(ValueError, match="unit stride along its last dimension"):
        masked_scale(mt.mT.contiguous().mT, lam_l, lam_r, top.threshold, top.chi, 0.0, SELECTION_BAND)
    with pytest.raises(ValueError, match="lam_l must be float32, got torch.float64"):
        masked_scale(mt, lam_l.double(), lam_r, top.threshold, top.chi, 0.0, SELECTION_BAND)


def test_kron_precondition_triton_backend_equals_torch(gen, kernel_device):
    m, n = 20, 33
    M = torch.randn(m, n, generator=gen)
    U_L = torch.linalg.qr(torch.randn(m, m, generator=gen)).Q
    U_R = torch.linalg.qr(torch.randn(n, n, generator=gen)).Q
    lam_l, lam_r = torch.rand(m, generator=gen) + 0.05, torch.rand(n, generator=gen) + 0.05
    args = (*(t.to(kernel_device) for t in (M, U_L, U_R, lam_l, lam_r)), 0.06, 0.01, 3.0, 1e-8)
    torch_out = kron_precondition(*args, backend="torch")
    assert torch.allclose(kron_precondition(*args, backend="triton"), torch_out, rtol=1e-5, atol=1e-6)


def test_backend_resolution(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("BREGTOP_BACKEND", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as on a machine without a GPU
    assert resolve_backend("auto", cpu, torch.float32) == "torch"
    assert resolve_backend("triton", cpu, torch.float32) == "triton"  # the interpreter is on
    with pytest.raises(ValueError, match="backend='triton' needs float32 eigenvalues, got torch.float64"):
        resolve_backend("triton", cpu, torch.float64)
    monkeypatch.setenv("BREGTOP_BACKEND", "triton")
    assert resolve_backend("auto", cpu, torch.float32) == "triton"
    assert resolve_backend("torch", cpu, torch.float32) == "torch"  # an explicit choice wins
    monkeypatch.setenv("BREGTOP_BACKEND", "cuda")
    with pytest.raises(ValueError, match="BREGTOP_BACKEND='cuda' is unknown; allowed: auto, torch, triton"):
        resolve_backend("auto", cpu, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="backend='triton' needs CUDA tensors .* got device cpu"):
        resolve_backend("triton", cpu, torch.float32)


def test_optimizer_with_triton_backend_follows_the_torch_one(gen, kernel_device):
    """Both kernels inside the optimizer. A rho = 1 method: the kernels sum in another order,
    and with a top set a near-tie at the cut could flip an entry (selection with the kernel
    is tested exactly above)."""
    shapes = [(12, 9), (40, 8)]
    start = [torch.randn(s, generator=gen).to(kernel_device) for s in shapes]
    grads = [[torch.randn(s, generator=gen).to(kernel_device) for s in shapes] for _ in range(6)]
    finals = []
    for backend in ("torch", "triton"):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = BregTop(params, lr=0.01, method="vn-v2", precondition_frequency=2, max_precond_dim=32, backend=backend)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        finals.append(params)
    for a, b in zip(*finals):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_auto_fallback_is_logged_once(monkeypatch, caplog):
    from bregtop_dist.core import dispatch

    monkeypatch.delenv("BREGTOP_BACKEND", raising=False)
    monkeypatch.setattr(dispatch, "triton_available", lambda: False)
    monkeypatch.setattr(dispatch, "_logged", set())
    cuda = torch.device("cuda")  # resolution only: nothing runs on the device
    with caplog.at_level("WARNING", logger="bregtop_dist"):
        assert dispatch.resolve_backend("auto", cuda, torch.float32) == "torch"
        assert dispatch.resolve_backend("auto", cuda, torch.float32) == "torch"
    messages = [r.getMessage() for r in caplog.records if "torch path" in r.getMessage()]
    assert messages == ["BregTop: using the torch path for the masked scaling: triton is not installed"]


def test_auto_falls_back_where_triton_cannot_build_its_launcher(monkeypatch, caplog):
    from bregtop_dist.core import dispatch

    monkeypatch.delenv("BREGTOP_BACKEND", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # compiled kernels: the launcher is needed
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(dispatch, "triton_available", lambda: True)
    monkeypatch.setattr(dispatch.shutil, "which", lambda name: None)
    monkeypatch.setattr(dispatch, "_logged", set())
    dispatch.launcher_missing.cache_clear()
    cuda = torch.device("cuda")  # resolution only
    with caplog.at_level("WARNING", logger="bregtop_dist"):
        assert dispatch.resolve_backend("auto", cuda, torch.float32) == "torch"
    assert any("cannot build its launcher: no C compiler" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="backend='triton' cannot build Triton's launcher on this machine: no C"):
        dispatch.resolve_backend("triton", cuda, torch.float32)
    monkeypatch.setattr(dispatch.shutil, "which", lambda name: "/usr/bin/gcc")
    monkeypatch.setattr(dispatch.sysconfig, "get_paths", lambda scheme=None: {"include": "/nonexistent"})
    dispatch.launcher_missing.cache_clear()
    with pytest.raises(ValueError, match="no Python.h under /nonexistent"):
        dispatch.resolve_backend("triton", cuda, torch.float32)
    monkeypatch.undo()
    dispatch.launcher_missing.cache_clear()  # this machine's real answer for later tests
