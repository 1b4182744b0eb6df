"""kron_stats (appendix B.3) and the rotated-gradient eigenvalue statistics (lines 4-5)."""

from __future__ import annotations

import pytest
import torch
from reference import kron_stats_ref

from bregtop_dist import kron_stats
from bregtop_dist.core.stats import STATS_METHODS, rotated_diagonals


def _spd(gen, d):
    a = torch.randn(d, d, generator=gen, dtype=torch.float64)
    return a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64)


def _inputs(gen, m, n, dtype):
    G = torch.randn(m, n, generator=gen, dtype=torch.float64)
    U_L = torch.linalg.qr(torch.randn(m, m, generator=gen, dtype=torch.float64)).Q
    U_R = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64)).Q
    lam_L = torch.rand(m, generator=gen, dtype=torch.float64) + 0.1
    lam_R = torch.rand(n, generator=gen, dtype=torch.float64) + 0.1
    L, R = _spd(gen, m), _spd(gen, n)
    return [x.to(dtype) for x in (G, U_L, U_R, lam_L, lam_R, L, R)]


@pytest.mark.parametrize("method", STATS_METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (6, 4), (17, 23)])
def test_kron_stats_equals_appendix_b3(gen, method, dtype, shape):
    inputs = _inputs(gen, *shape, dtype)
    got = kron_stats(method, *inputs)
    want = kron_stats_ref(method, *[x.double() for x in inputs])
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for g, w in zip(got, want):
        assert g.dtype == dtype
        assert torch.allclose(g.double(), w, rtol=tol, atol=tol * float(w.abs().max()))


@pytest.mark.parametrize("method", STATS_METHODS)
def test_kron_stats_is_batched(gen, method):
    batch = [_inputs(gen, 5, 3, torch.float64) for _ in range(3)]
    stacked = [torch.stack(parts) for parts in zip(*batch)]
    got_l, got_r = kron_stats(method, *stacked)
    for k, inputs in enumerate(batch):
        want_l, want_r = kron_stats_ref(method, *inputs)
        assert torch.allclose(got_l[k], want_l, rtol=1e-12) and torch.allclose(got_r[k], want_r, rtol=1e-12)


@pytest.mark.parametrize("method", STATS_METHODS)
@pytest.mark.parametrize("shape", [(9, 7), (20, 4), (4, 20)])  # square-ish, tall, wide
def test_rotated_diagonals_equal_explicit_products(gen, method, shape):
    G, U_L, U_R, lam_L, lam_R, L, R = _inputs(gen, *shape, torch.float64)
    dL, dR = kron_stats_ref(method, G, U_L, U_R, lam_L, lam_R, L, R)
    Gt = U_L.T @ G @ U_R
    got_l, got_r = rotated_diagonals(method, Gt, lam_L, lam_R, L, R, dL, dR, U_L, U_R, G=G)
    assert torch.allclose(got_l, torch.diag(U_L.T @ dL @ U_L), rtol=1e-11)
    assert torch.allclose(got_r, torch.diag(U_R.T @ dR @ U_R), rtol=1e-11)


def test_identity_bases_may_be_none(gen):
    G, _, _, lam_L, lam_R, L, R = _inputs(gen, 4, 6, torch.float64)
    I_l, I_r = torch.eye(4, dtype=torch.float64), torch.eye(6, dtype=torch.float64)
    for method in STATS_METHODS:
        a = kron_stats(method, G, None, None, lam_L, lam_R, L, R)
        b = kron_stats(method, G, I_l, I_r, lam_L, lam_R, L, R)
        assert all(torch.allclose(x, y, rtol=1e-13) for x, y in zip(a, b))


def test_errors_name_the_method_and_missing_factors(gen):
    G, U_L, U_R, lam_L, lam_R, L, R = _inputs(gen, 4, 3, torch.float64)
    with pytest.raises(ValueError, match=r"method='vn-v3' is unknown; allowed: shampoo, kl, vn-v1"):
        kron_stats("vn-v3", G, U_L, U_R, lam_L, lam_R, L, R)
    for method in ("vn-v1", "f-v1"):
        with pytest.raises(ValueError, match=f"method='{method}' needs the current factors L and R"):
            kron_stats(method, G, U_L, U_R, lam_L, lam_R)


@pytest.mark.parametrize("shape", [(6, 4), (3, 17), (17, 3)])
@pytest.mark.parametrize("g_scale, factor_scale", [(1e10, 1e20), (1e18, 1e25), (1e-20, 1e-30)])
def test_f_v1_in_float32_where_its_products_leave_the_range(gen, shape, g_scale, factor_scale):
    """f-v1's ``G R G^T / Tr(R^2)`` and its rotated diagonals (both branches: (3, 17) and (17, 3)
    take the long-side product) in float32 equal the float64 reference where the result is in
    range but ``G R G^T`` or ``Tr(R^2)`` alone are not (the step after a x1e10 spike, whose
    factors grew ~1e20; huge factors; tiny ones)."""
    G, U_L, U_R, lam_L, lam_R, L, R = _inputs(gen, *shape, torch.float64)
    G, L, R = G * g_scale, L * factor_scale, R * factor_scale
    inputs = [x.float() for x in (G, U_L, U_R, lam_L, lam_R, L, R)]
    want = kron_stats_ref("f-v1", G, U_L, U_R, lam_L, lam_R, L, R)
    assert all(bool(torch.isfinite(w.float()).all()) for w in want), "setup: the result must be float32-finite"
    got = kron_stats("f-v1", *inputs)
    for g, w in zip(got, want):
        assert torch.allclose(g.double(), w, rtol=1e-4, atol=1e-4 * float(w.abs().max()))
    f = inputs
    gt = f[1].mT @ f[0] @ f[2]
    diags = rotated_diagonals("f-v1", gt, f[3], f[4], f[5], f[6], got[0], got[1], f[1], f[2], G=f[0])
    for d, w, u in zip(diags, want, (U_L, U_R)):
        ref = torch.diagonal(u.T @ w @ u)
        assert torch.allclose(d.double(), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
