"""bregtop_dist.analysis against float64 references written from the paper's definitions
(section 2.3, Table 1, appendix B.2, Theorem 2) and independent closed forms."""

from __future__ import annotations

import math

import pytest
import torch

from bregtop_dist.analysis import (
    KINDS,
    ProjectionNotConverged,
    band_overlap,
    block_hessian,
    bregman_divergence,
    chance_overlap,
    coupling_term,
    covariance_eigenbasis,
    generator_hessian,
    hvp_operator,
    kronecker_projection,
    lanczos,
    rayleigh_ratios,
    spectral_decomposition,
    spectral_error_report,
    tangent_components,
    top_eigenpairs,
    weighted_residual,
)

F64 = torch.float64


def random_spd(d: int, gen: torch.Generator, samples: int | None = None) -> torch.Tensor:
    X = torch.randn(d, samples or 3 * d, generator=gen, dtype=F64)
    return X @ X.T / X.shape[1] + 0.05 * torch.eye(d, dtype=F64)


def powerlaw_spd(d: int, gen: torch.Generator, alpha: float = 1.5) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    lam = torch.arange(1, d + 1, dtype=F64) ** -alpha
    return (Q * lam) @ Q.T


def logm_spd(A: torch.Tensor) -> torch.Tensor:
    w, V = torch.linalg.eigh(A)
    out = (V * torch.log(w)) @ V.T
    assert torch.allclose(torch.linalg.matrix_exp(out), A, rtol=1e-10, atol=1e-12)
    return out


def closed_form(kind: str, A: torch.Tensor, B: torch.Tensor) -> float:
    """The three divergences as usually written (section 2.3 with F from Table 1)."""
    if kind == "frobenius":
        return 0.5 * float(torch.sum((A - B) ** 2))
    if kind == "von_neumann":
        return float(torch.trace(A @ logm_spd(A) - A @ logm_spd(B) - A + B))
    X = A @ torch.linalg.inv(B)
    return float(torch.trace(X) - torch.logdet(X) - A.shape[0])


@pytest.fixture
def gen() -> torch.Generator:
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


@pytest.mark.parametrize("kind", KINDS)
def test_divergence_matches_closed_form_and_decomposition(kind: str, gen: torch.Generator) -> None:
    A, B = random_spd(9, gen), random_spd(9, gen)
    direct = float(bregman_divergence(kind, A, B))
    assert direct == pytest.approx(closed_form(kind, A, B), rel=1e-10)
    assert direct > 0
    dec = spectral_decomposition(kind, A, B)
    assert float(dec.total) == pytest.approx(direct, rel=1e-10, abs=1e-12)
    assert torch.allclose(dec.alignment.sum(0), torch.ones(9, dtype=F64))  # P is doubly stochastic
    assert torch.allclose(dec.alignment.sum(1), torch.ones(9, dtype=F64))
    assert float(bregman_divergence(kind, A, A)) == pytest.approx(0.0, abs=1e-10)


def test_coupling_terms_are_the_papers(gen: torch.Generator) -> None:
    lam, omega = torch.rand(4, generator=gen, dtype=F64) + 0.1, torch.rand(5, generator=gen, dtype=F64) + 0.1
    li, wj = lam[:, None], omega[None, :]
    assert torch.allclose(coupling_term("frobenius", lam, omega), -li * wj)
    assert torch.allclose(coupling_term("von_neumann", lam, omega), -li * torch.log(wj))
    assert torch.allclose(coupling_term("logdet", lam, omega), li / wj)


@pytest.mark.parametrize("kind", KINDS)
def test_generator_hessian_is_the_derivative_of_grad_f(kind: str, gen: torch.Generator) -> None:
    S, H = random_spd(7, gen), torch.randn(7, 7, generator=gen, dtype=F64)
    H = H + H.T
    grad = {"frobenius": lambda X: X, "von_neumann": logm_spd, "logdet": lambda X: -torch.linalg.inv(X)}[kind]
    def central(t: float) -> torch.Tensor:
        return (grad(S + t * H) - grad(S - t * H)) / (2 * t)

    # Richardson's extrapolation of two central differences: O(t^4) error, so an S with a small
    # eigenvalue (large third derivative of the inverse) does not swamp the tolerance
    numeric = (4 * central(5e-6) - central(1e-5)) / 3
    assert torch.allclose(generator_hessian(kind, S, H), numeric, rtol=1e-6, atol=1e-8)


def test_divergence_rejects_bad_input() -> None:
    A = torch.eye(3, dtype=F64)
    with pytest.raises(ValueError, match="'kl' is not one of frobenius, von_neumann, logdet"):
        bregman_divergence("kl", A, A)
    with pytest.raises(ValueError, match=r"B must be positive definite; its smallest eigenvalue is -1"):
        bregman_divergence("logdet", A, torch.diag(torch.tensor([1.0, 1.0, -1.0], dtype=F64)))
    with pytest.raises(ValueError, match="A must be symmetric"):
        bregman_divergence("frobenius", torch.eye(3, dtype=F64) + torch.triu(torch.ones(3, 3, dtype=F64), 1), A)
    with pytest.raises(ValueError, match=r"same shape, got \(3, 3\) and \(2, 2\)"):
        bregman_divergence("frobenius", A, torch.eye(2, dtype=F64))


@pytest.mark.parametrize("kind", KINDS)
def test_projection_recovers_an_exact_kronecker_product(kind: str, gen: torch.Generator) -> None:
    L0, R0 = random_spd(3, gen), random_spd(4, gen)
    proj = kronecker_projection(kind, torch.kron(L0, R0), 3, 4)
    assert torch.allclose(proj.S, torch.kron(L0, R0), rtol=1e-8, atol=1e-10)
    scale = torch.trace(proj.L) / torch.trace(L0)  # L is determined up to scale only
    assert torch.allclose(proj.L, L0 * scale, rtol=1e-8)
    assert proj.divergence == pytest.approx(0.0, abs=1e-8)
    assert float(torch.trace(proj.L)) == pytest.approx(3.0)


@pytest.mark.parametrize("kind", KINDS)
def test_projection_is_stationary_theorem_2(kind: str, gen: torch.Generator) -> None:
    """At the solution grad^2 F(S*)[S* - C] is orthogonal to the tangent space
    {dL (x) R* + L* (x) dR}: both pairings vanish, while the residual itself does not."""
    m, n = 3, 5
    C = random_spd(m * n, gen)
    proj = kronecker_projection(kind, C, m, n, tol=1e-12)
    assert proj.iterations >= 1 and proj.residual <= 1e-12
    W = weighted_residual(kind, C, proj.L, proj.R)
    A, B = tangent_components(W, proj.L, proj.R)
    size = float(W.abs().max())
    assert size > 1e-3
    assert float(A.abs().max()) < 1e-8 * size and float(B.abs().max()) < 1e-8 * size
    dL = torch.randn(m, m, generator=gen, dtype=F64)
    dR = torch.randn(n, n, generator=gen, dtype=F64)
    H = torch.kron(dL + dL.T, proj.R) + torch.kron(proj.L, dR + dR.T)
    assert abs(float(torch.sum(W * H))) < 1e-8 * size * float(H.abs().sum())


@pytest.mark.parametrize("kind", KINDS)
def test_projection_beats_perturbed_factors(kind: str, gen: torch.Generator) -> None:
    m, n = 3, 4
    C = random_spd(m * n, gen)
    proj = kronecker_projection(kind, C, m, n)
    for _ in range(10):
        dL = torch.randn(m, m, generator=gen, dtype=F64) * 1e-2
        dR = torch.randn(n, n, generator=gen, dtype=F64) * 1e-2
        S = torch.kron(proj.L + dL @ dL.T + (dL + dL.T), proj.R + (dR + dR.T))
        assert float(bregman_divergence(kind, C, S)) >= proj.divergence - 1e-12


def test_frobenius_projection_is_the_nearest_kronecker_product(gen: torch.Generator) -> None:
    """Van Loan and Pitsianis: min ||C - L (x) R||_F is the top singular pair of the
    rearrangement C[(i,k),(j,l)] = C[(i,j),(k,l)]."""
    m, n = 4, 3
    C = powerlaw_spd(m * n, gen)
    Rc = C.reshape(m, n, m, n).permute(0, 2, 1, 3).reshape(m * m, n * n)
    U, s, Vh = torch.linalg.svd(Rc)
    best = s[0] * torch.kron(U[:, 0].reshape(m, m), Vh[0].reshape(n, n))
    assert torch.allclose(kronecker_projection("frobenius", C, m, n).S, best, rtol=1e-8, atol=1e-10)


def test_von_neumann_projection_is_the_scaled_marginals(gen: torch.Generator) -> None:
    """Table 1's VN conditions solve in closed form: S = E[GG^T] (x) E[G^T G] / Tr C."""
    m, n = 3, 4
    C = random_spd(m * n, gen)
    C4 = C.reshape(m, n, m, n)
    expected = torch.kron(torch.einsum("ijkj->ik", C4), torch.einsum("ijil->jl", C4)) / torch.trace(C)
    proj = kronecker_projection("von_neumann", C, m, n)
    assert torch.allclose(proj.S, expected, rtol=1e-10)


def test_projection_reports_non_convergence(gen: torch.Generator) -> None:
    C = powerlaw_spd(12, gen)
    with pytest.raises(ProjectionNotConverged, match=r"logdet Kronecker projection did not converge: .* after 1 iterations"):
        kronecker_projection("logdet", C, 3, 4, tol=1e-14, max_iter=1)


def test_projection_rejects_bad_input() -> None:
    C = torch.eye(12, dtype=F64)
    with pytest.raises(ValueError, match=r"C must be \(m\*n, m\*n\) = \(10, 10\) for m=2, n=5; got \(12, 12\)"):
        kronecker_projection("frobenius", C, 2, 5)
    with pytest.raises(ValueError, match="tol must be a positive number, got 0"):
        kronecker_projection("frobenius", C, 3, 4, tol=0)
    with pytest.raises(ValueError, match="max_iter must be at least 1, got 0"):
        kronecker_projection("frobenius", C, 3, 4, max_iter=0)
    with pytest.raises(ValueError, match="C must be positive definite"):
        kronecker_projection("logdet", torch.zeros(12, 12, dtype=F64), 3, 4)


def test_rayleigh_ratios_against_the_explicit_product(gen: torch.Generator) -> None:
    m, n = 3, 4
    C, L, R = random_spd(m * n, gen), random_spd(m, gen), random_spd(n, gen)
    evals, evecs = torch.linalg.eigh(C)
    explicit = torch.einsum("di,ij,dj->d", evecs.T, torch.kron(L, R), evecs.T) / evals
    assert torch.allclose(rayleigh_ratios(evals, evecs, L, R), explicit, rtol=1e-12)


def test_spectral_report_bands_and_judgements(gen: torch.Generator) -> None:
    m, n = 4, 5
    report = spectral_error_report(powerlaw_spd(m * n, gen), m, n, bands=(0.0, 0.25, 1.0))
    assert report.labels == ["0-25%", "25-100%"]
    for kind, errors in report.errors.items():
        logr = errors.log_ratios
        assert errors.band_errors[0] == pytest.approx(float(logr[:5].abs().mean()))
        assert errors.band_errors[1] == pytest.approx(float(logr[5:].abs().mean()))
        assert errors.projection.kind == kind
    assert report.best_on_top() == min(report.errors, key=lambda k: report.errors[k].band_errors[0])
    exact = spectral_error_report(torch.kron(random_spd(m, gen), random_spd(n, gen)), m, n)
    assert all(max(e.band_errors) < 1e-8 for e in exact.errors.values())
    with pytest.raises(ValueError, match="bands must rise strictly from 0.0 to 1.0"):
        spectral_error_report(torch.eye(20, dtype=F64), m, n, bands=(0.0, 0.5, 0.5, 1.0))
    with pytest.raises(ValueError, match="leave an empty band for a spectrum of 20"):
        spectral_error_report(torch.eye(20, dtype=F64), m, n, bands=(0.0, 0.01, 1.0))


def _mlp_loss(gen: torch.Generator):  # type: ignore[no-untyped-def]
    X = torch.randn(30, 4, generator=gen, dtype=F64)
    y = torch.randn(30, 2, generator=gen, dtype=F64)
    V = torch.randn(2, 3, generator=gen, dtype=F64)
    return lambda W: ((torch.tanh(X @ W.T) @ V.T - y) ** 2).mean()


def test_block_hessian_matches_autograd_hessian(gen: torch.Generator) -> None:
    loss = _mlp_loss(gen)
    W = torch.randn(3, 4, generator=gen, dtype=F64)
    expected = torch.autograd.functional.hessian(loss, W).reshape(12, 12)
    assert torch.allclose(block_hessian(loss, W), expected, rtol=1e-10, atol=1e-12)
    hvp = hvp_operator(loss, W)
    v = torch.randn(12, generator=gen, dtype=F64)
    assert torch.allclose(hvp(v), expected @ v, rtol=1e-10, atol=1e-12)


def test_lanczos_finds_the_top_eigenpairs(gen: torch.Generator) -> None:
    d = 200
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    lam = torch.cat([torch.tensor([50.0, 30.0, 20.0, 12.0, 8.0], dtype=F64), torch.randn(d - 5, generator=gen, dtype=F64)])
    H = (Q * lam) @ Q.T
    approx = lanczos(lambda v: H @ v, d, k=5, steps=60, seed=1)
    exact = top_eigenpairs(H, 5)
    assert torch.allclose(approx.values, exact.values, rtol=1e-8)
    assert float(approx.residuals.max()) < 1e-6
    assert band_overlap(approx.vectors, exact.vectors, 1, 5) == pytest.approx(1.0, abs=1e-8)
    with pytest.raises(ValueError, match="need 1 <= k <= steps <= dim, got k=5, steps=4, dim=200"):
        lanczos(lambda v: H @ v, d, k=5, steps=4)


def test_covariance_eigenbasis_from_the_stacked_gradients(gen: torch.Generator) -> None:
    grads = torch.randn(40, 15, generator=gen, dtype=F64) * torch.linspace(3, 0.1, 15, dtype=F64)
    evals, U = covariance_eigenbasis(grads)
    C = grads.T @ grads / 40
    w, V = torch.linalg.eigh(C)
    assert torch.allclose(evals, w.flip(0), rtol=1e-10)
    assert band_overlap(U, V.flip(1), 1, 15) == pytest.approx(1.0)
    for i in range(15):  # each vector agrees up to sign
        assert abs(float(U[:, i] @ V.flip(1)[:, i])) == pytest.approx(1.0, abs=1e-8)


def test_band_overlap_definition(gen: torch.Generator) -> None:
    d = 400
    Q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    assert band_overlap(Q, Q, 1, 5) == pytest.approx(1.0)
    assert band_overlap(Q, Q[:, torch.arange(d).roll(-5)], 1, 5) == pytest.approx(0.0, abs=1e-12)
    # the paper's formula, literally: (||A^T B||_F^2 / 21)^(1/2) for the range 180..200
    P, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=F64))
    A, B = Q[:, 179:200], P[:, 179:200]
    assert band_overlap(Q, P, 180, 200) == pytest.approx(math.sqrt(float(torch.linalg.norm(A.T @ B) ** 2) / 21))
    assert 0.5 * chance_overlap(d, 21) < band_overlap(Q, P, 180, 200) < 2 * chance_overlap(d, 21)
    with pytest.raises(ValueError, match=r"U_b has 100 vectors; the range 180..200 needs at least 200"):
        band_overlap(Q, P[:, :100], 180, 200)
    with pytest.raises(ValueError, match="need 1 <= lo <= hi, got lo=5, hi=1"):
        band_overlap(Q, P, 5, 1)
