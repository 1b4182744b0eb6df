"""kron_precondition (Algorithm 2) against the paper's definition, Theorem 4, and bad input."""

from __future__ import annotations

import pytest
import torch
from reference import boundary_gap, chi_ref, kron_precondition_ref, top_mask_ref, weights_ref

from bregtop_dist import kron_precondition
from bregtop_dist.core.precondition import (
    SELECTION_BAND,
    precondition_weights,
    select_top_set,
    spectrum_root,
    top_mask,
)
from launch.sensitivity import one_ulp

SHAPES = [(1, 1), (1, 12), (12, 1), (7, 3), (16, 16), (33, 65)]
TOL = {torch.float32: 2e-5, torch.float64: 1e-11}


def _orthogonal(gen, d, dtype):
    return torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64)).Q.to(dtype)


def _block(gen, m, n, dtype, ties=False):
    M = torch.randn(m, n, generator=gen, dtype=dtype)
    if ties:
        lam_l = torch.randint(1, 4, (m,), generator=gen).to(dtype)
        lam_r = torch.randint(1, 4, (n,), generator=gen).to(dtype)
    else:
        lam_l = torch.exp(2 * torch.randn(m, generator=gen, dtype=dtype))
        lam_r = torch.exp(2 * torch.randn(n, generator=gen, dtype=dtype))
    return M, _orthogonal(gen, m, dtype), _orthogonal(gen, n, dtype), lam_l, lam_r


def _close(a, b, dtype):
    tol = TOL[dtype]
    scale = b.abs().max().clamp_min(1e-30)
    assert float((a - b).abs().max() / scale) <= tol, float((a - b).abs().max() / scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("rho", [1e-4, 0.05, 0.3, 0.999, 1.0])
@pytest.mark.parametrize("q", [0.0, 0.01, 0.37, 1.0])
def test_equals_paper_definition(gen, dtype, shape, rho, q):
    m, n = shape
    M, U_L, U_R, lam_l, lam_r = _block(gen, m, n, dtype)
    c = float(torch.empty(()).uniform_(0.5, 4.0, generator=gen))
    got = kron_precondition(M, U_L, U_R, lam_l, lam_r, rho, q, c)
    _close(got, kron_precondition_ref(M, U_L, U_R, lam_l, lam_r, rho, q, c), dtype)
    assert got.dtype == dtype and got.shape == (m, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rho", [0.1, 0.5, 0.77])
def test_entries_tied_with_the_threshold_all_take_the_top_scale(gen, dtype, rho):
    """Few distinct eigenvalues, so the K-th largest entry of S is tied with others: all of them
    get S^-1/2 (a sort would admit some by position); chi is still the quantile over the
    paper's bottom set, and the next smaller value lies far below the band."""
    m, n = 9, 7
    lam_l = torch.randint(1, 3, (m,), generator=gen).to(dtype)
    lam_r = torch.randint(1, 3, (n,), generator=gen).to(dtype)
    W = precondition_weights(lam_l[None], lam_r[None], rho, 0.25, 2.0)[0]
    S = torch.outer(lam_l, lam_r)
    top = top_mask_ref(S, rho)
    threshold = S[top].min()
    expected = torch.where(S >= threshold, S**-0.5, chi_ref(S, top, 0.25, 2.0))
    _close(W, expected, dtype)
    _close(W, weights_ref(S, rho, 0.25, 2.0), dtype)


def test_eps_replaces_inverse_square_root(gen):
    M, U_L, U_R, lam_l, lam_r = _block(gen, 6, 5, torch.float64)
    got = kron_precondition(M, U_L, U_R, lam_l, lam_r, 0.2, 0.1, 1.5, eps=0.3)
    _close(got, kron_precondition_ref(M, U_L, U_R, lam_l, lam_r, 0.2, 0.1, 1.5, eps=0.3), torch.float64)


def test_identity_bases_mean_already_rotated(gen):
    M, _, _, lam_l, lam_r = _block(gen, 8, 4, torch.float64)
    I_l, I_r = torch.eye(8, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    got = kron_precondition(M, None, None, lam_l, lam_r, 0.2, 0.1, 1.5)
    _close(got, kron_precondition(M, I_l, I_r, lam_l, lam_r, 0.2, 0.1, 1.5), torch.float64)


def test_rho_one_is_full_eigenvalue_preconditioning(gen):
    """rho = 1: U_L ((U_L^T M U_R) / sqrt(lam_L lam_R^T)) U_R^T = L^-1/2 M R^-1/2."""
    M, U_L, U_R, lam_l, lam_r = _block(gen, 7, 5, torch.float64)
    L_inv_sqrt = U_L @ torch.diag(lam_l**-0.5) @ U_L.T
    R_inv_sqrt = U_R @ torch.diag(lam_r**-0.5) @ U_R.T
    got = kron_precondition(M, U_L, U_R, lam_l, lam_r, 1.0, 0.5, 9.0)
    _close(got, L_inv_sqrt @ M @ R_inv_sqrt, torch.float64)


@pytest.mark.parametrize("rho", [0.02, 0.3, 0.9])
def test_theorem4_decomposition(gen, rho):
    """M_hat = U_L(Mt * E * S^-1/2)U_R^T + chi (M - P_top(M)), with P_top an orthogonal projector."""
    M, U_L, U_R, lam_l, lam_r = _block(gen, 10, 6, torch.float64)
    while boundary_gap(lam_l, lam_r, rho) < 2 * SELECTION_BAND:  # no entry in the blending band
        M, U_L, U_R, lam_l, lam_r = _block(gen, 10, 6, torch.float64)
    q, c = 0.05, 2.5
    S = torch.outer(lam_l, lam_r)
    E = top_mask_ref(S, rho).to(torch.float64)
    chi = chi_ref(S, E.bool(), q, c)
    Mt = U_L.T @ M @ U_R

    def p_top(x):
        return U_L @ ((U_L.T @ x @ U_R) * E) @ U_R.T

    expected = U_L @ (Mt * E * S**-0.5) @ U_R.T + chi * (M - p_top(M))
    _close(kron_precondition(M, U_L, U_R, lam_l, lam_r, rho, q, c), expected, torch.float64)
    X = torch.randn(10, 6, generator=gen, dtype=torch.float64)
    _close(p_top(p_top(X)), p_top(X), torch.float64)  # idempotent
    assert abs(float((p_top(X) * (X - p_top(X))).sum())) < 1e-10 * float((X * X).sum())  # orthogonal


def test_bfloat16_momentum_keeps_its_dtype(gen):
    M, U_L, U_R, lam_l, lam_r = _block(gen, 6, 4, torch.float32)
    got = kron_precondition(M.bfloat16(), U_L, U_R, lam_l, lam_r, 0.3, 0.1, 2.0)
    assert got.dtype == torch.bfloat16
    ref = kron_precondition_ref(M.bfloat16().float(), U_L, U_R, lam_l, lam_r, 0.3, 0.1, 2.0)
    assert float((got.float() - ref).abs().max() / ref.abs().max()) < 1e-2


BAD = [
    (dict(rho=0.0), "rho=0.0 is outside the allowed range (0, 1]"),
    (dict(rho=1.5), "rho=1.5 is outside the allowed range (0, 1]"),
    (dict(q=-0.1), "q=-0.1 is outside the allowed range [0, 1]"),
    (dict(q=1.01), "q=1.01 is outside the allowed range [0, 1]"),
    (dict(c=0.0), "c=0.0 is not allowed: c must be > 0"),
    (dict(eps=-1.0), "eps=-1.0 is not allowed: it must be a finite number >= 0"),
    (dict(backend="cuda"), "backend='cuda' is unknown; allowed: auto, torch, triton"),
]


@pytest.mark.parametrize("override,message", BAD)
def test_bad_arguments_are_named(gen, override, message):
    M, U_L, U_R, lam_l, lam_r = _block(gen, 4, 3, torch.float32)
    kwargs = dict(rho=0.5, q=0.1, c=1.0, eps=0.0, backend="auto") | override
    with pytest.raises(ValueError) as err:
        kron_precondition(M, U_L, U_R, lam_l, lam_r, **kwargs)
    assert message in str(err.value)


def test_bad_shapes_and_eigenvalues_are_named(gen):
    M, U_L, U_R, lam_l, lam_r = _block(gen, 4, 3, torch.float32)
    with pytest.raises(ValueError, match=r"lam_L and lam_R must have shapes \(4,\) and \(3,\)"):
        kron_precondition(M, U_L, U_R, lam_r, lam_l, 0.5, 0.1, 1.0)
    with pytest.raises(ValueError, match=r"U_R must have shape \(3, 3\) or be None, got \(4, 4\)"):
        kron_precondition(M, U_L, U_L, lam_l, lam_r, 0.5, 0.1, 1.0)
    with pytest.raises(ValueError, match=r"M must be a matrix"):
        kron_precondition(M[0], None, None, lam_l, lam_r, 0.5, 0.1, 1.0)
    lam_l[1] = -2.0
    with pytest.raises(ValueError, match=r"lam_L has the entry -2.0; eigenvalues must be finite and > 0"):
        kron_precondition(M, U_L, U_R, lam_l, lam_r, 0.5, 0.1, 1.0)
    lam_l[1] = 0.0
    with pytest.raises(ValueError, match=r"lam_L has the entry 0.0"):
        kron_precondition(M, U_L, U_R, lam_l, lam_r, 0.5, 0.1, 1.0)
    # eps > 0 allows zero eigenvalues
    kron_precondition(M, U_L, U_R, lam_l, lam_r, 0.5, 0.1, 1.0, eps=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_at_the_threshold_on_many_tie_patterns(gen, dtype):
    """Few distinct eigenvalues, random shapes and rho: exactly the entries below the K-th
    largest get chi (the next value down is at most 2/3 of it, far outside the band)."""
    for _ in range(60):
        m, n = (int(x) for x in torch.randint(1, 12, (2,), generator=gen))
        lam_l = torch.randint(1, 4, (m,), generator=gen).to(dtype)
        lam_r = torch.randint(1, 4, (n,), generator=gen).to(dtype)
        rho = float(torch.rand((), generator=gen)) * 0.98 + 0.01
        W = precondition_weights(lam_l[None], lam_r[None], rho, 0.3, 7.0)[0]
        S = torch.outer(lam_l, lam_r)
        top = top_mask_ref(S, rho)
        if bool(top.all()):
            continue
        chi = chi_ref(S, top, 0.3, 7.0)
        below = S < S[top].min()
        # chi = 7 * quantile(S^-1/2) exceeds every S^-1/2 <= 1 here: the chi entries are W > 1.
        assert torch.equal(W > 1.0, below), (m, n, rho)
        assert torch.allclose(W[below], chi.expand(int(below.sum())))


@pytest.mark.parametrize("ties", [False, True])
def test_top_mask_is_the_papers_top_set_with_the_thresholds_ties(gen, ties):
    """``top_mask`` on the root spectrum is E of Algorithm 2 (the K largest entries of S) plus
    the entries equal to the K-th largest; batched, random shapes and rho, with and without
    tied eigenvalues (without ties it is exactly the paper's E)."""
    for _ in range(40):
        bsz, m, n = (int(x) for x in torch.randint(1, 10, (3,), generator=gen))
        _, _, _, lam_l, lam_r = _block(gen, m, n, torch.float64, ties=ties)
        lam_l = torch.stack([lam_l[torch.randperm(m, generator=gen)] for _ in range(bsz)])
        lam_r = torch.stack([lam_r[torch.randperm(n, generator=gen)] for _ in range(bsz)])
        rho = float(torch.rand((), generator=gen)) * 0.98 + 0.01
        root_l, root_r = spectrum_root(lam_l), spectrum_root(lam_r)
        top = select_top_set(root_l, root_r, rho, 0.01, 3.0)
        got = top_mask(root_l[:, :, None] * root_r[:, None, :], top)
        for b in range(bsz):
            S = torch.outer(lam_l[b], lam_r[b])
            paper = top_mask_ref(S, rho)
            assert torch.equal(got[b], S >= S[paper].min()), (m, n, rho, b)
            if not ties:
                assert torch.equal(got[b], paper), (m, n, rho, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_weights_move_by_a_bounded_multiple_of_a_one_ulp_change(gen, dtype):
    """W is a continuous function of the estimates: moving every estimate by one ulp moves
    every weight by at most about c / SELECTION_BAND ulps, also where entries of S are tied at
    the top set's boundary (with a hard cut, a tie broken by one ulp moves a weight from
    S^-1/2 to chi, a relative change of order 1)."""
    ulp = torch.finfo(dtype).eps
    c = 3.0
    bound = 4.0 * (c / SELECTION_BAND + 2.0) * ulp
    for _ in range(30):
        m, n = (int(x) for x in torch.randint(1, 14, (2,), generator=gen))
        # ties: few distinct values, every product repeated
        lam_l = torch.randint(1, 4, (m,), generator=gen).to(dtype)
        lam_r = torch.randint(1, 4, (n,), generator=gen).to(dtype)
        rho = float(torch.rand((), generator=gen)) * 0.9 + 0.05
        W = precondition_weights(lam_l[None], lam_r[None], rho, 0.01, c)[0]
        W2 = precondition_weights(one_ulp(lam_l, gen)[None], one_ulp(lam_r, gen)[None], rho, 0.01, c)[0]
        rel = float(((W2 - W).abs() / W).max())
        assert rel <= bound, (m, n, rho, rel)


def test_weights_blend_linearly_in_the_band(gen):
    """An entry a fraction f of the band below the threshold (on sqrt(S)) gets f of chi and
    1 - f of its own scale; entries outside the band get what Algorithm 2 gives them."""
    n, rho, q, c = 10, 0.2, 0.01, 3.0  # one row: K = 2, the threshold is the second entry
    for _ in range(20):
        frac = float(torch.rand((), generator=gen))
        lam_r = torch.tensor([16.0, 9.0, 9.0 * (1.0 - frac * SELECTION_BAND) ** 2, 1.0, 1.0, 0.8, 0.5, 0.5, 0.3, 0.2],
                             dtype=torch.float64)
        lam_l = torch.ones(1, dtype=torch.float64)
        W = precondition_weights(lam_l[None], lam_r[None], rho, q, c)[0, 0]
        S = lam_r[None]
        chi = chi_ref(S, top_mask_ref(S, rho), q, c)
        inv = lam_r**-0.5
        assert torch.allclose(W[:2], inv[:2], rtol=1e-12)
        assert torch.allclose(W[2], frac * chi + (1.0 - frac) * inv[2], rtol=1e-9)
        assert torch.allclose(W[3:], chi.expand(n - 3), rtol=1e-12)
        _close(W, weights_ref(S, rho, q, c)[0], torch.float64)
