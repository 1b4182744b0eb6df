"""BREGTOP_ACCELERATOR_PATHS=1 takes the code paths written for accelerators on the CPU
(batched eigh/QR over a stack, fixed-pass selection), and they compute what the CPU paths
compute, up to rounding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bregtop_dist import BregTop
from bregtop_dist.core import bases, selection
from bregtop_dist.core.dispatch import PATHS_ENV_VAR, accelerator_paths


def test_the_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(PATHS_ENV_VAR, raising=False)
    assert not accelerator_paths(cpu) and accelerator_paths(torch.device("cuda"))
    monkeypatch.setenv(PATHS_ENV_VAR, "1")
    assert accelerator_paths(cpu)


def test_accelerator_paths_batch_the_linear_algebra_and_fix_the_passes(monkeypatch, gen):
    calls: list[int] = []

    def counting(a):
        calls.append(a.shape[0])
        return torch.linalg.eigh(a)

    a = torch.randn(5, 6, 6, generator=gen, dtype=torch.float64)
    a = a @ a.transpose(-1, -2)
    monkeypatch.delenv(PATHS_ENV_VAR, raising=False)
    bases.per_matrix(counting, a)
    assert calls == [1] * 5  # the CPU path: one matrix at a time
    calls.clear()
    monkeypatch.setenv(PATHS_ENV_VAR, "1")
    bases.per_matrix(counting, a)
    assert calls == [5]  # one batched call

    lam = torch.rand(3, 40, generator=gen, dtype=torch.float64) + 0.01
    a_desc, b_asc = lam.sort(-1, descending=True).values, lam.sort(-1).values
    rank = torch.randint(0, 40 * 40, (3, 2), generator=gen)
    fixed = selection.kth_largest_product(a_desc, b_asc, rank)  # fixed passes, from the switch
    monkeypatch.delenv(PATHS_ENV_VAR)
    early = selection.kth_largest_product(a_desc, b_asc, rank)
    want = (a_desc[:, :, None] * b_asc[:, None, :]).flatten(1).sort(-1, descending=True).values.gather(1, rank)
    assert torch.equal(fixed, early) and torch.equal(fixed, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_step_on_the_accelerator_paths_equals_the_cpu_paths(monkeypatch, gen, dtype):
    """bregtop-vn-v2: the top-set selection on both paths, and a step that is well conditioned
    on these random gradients. The rho = 1 rows are not compared here: on this input their
    S^-1/2 on the smallest eigenvalues turns a 1e-7 relative perturbation of the gradients into
    a 2e-4 relative change of the weights after 7 steps (probed), so either path's rounding
    already exceeds any tolerance that could tell a wrong path from a right one."""
    shapes = [(12, 9), (30, 8), (6, 12), (9,)]
    start = [torch.randn(s, generator=gen, dtype=dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=dtype) for s in shapes] for _ in range(7)]

    def run() -> list[torch.Tensor]:
        params = [nn.Parameter(p.clone()) for p in start]
        opt = BregTop(params, lr=0.02, method="bregtop-vn-v2", precondition_frequency=3, max_precond_dim=16)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        return [p.detach() for p in params]

    monkeypatch.delenv(PATHS_ENV_VAR, raising=False)
    cpu = run()
    monkeypatch.setenv(PATHS_ENV_VAR, "1")
    accel = run()
    for a, b in zip(cpu, accel):
        assert float((a - b).abs().max() / b.abs().max()) <= 1e-5


def test_accelerator_paths_raise_before_writing_anything(monkeypatch, gen):
    """The one-read verdict on the accelerator paths: a NaN or inf gradient, or a finite one
    whose step leaves float32 (x1e30 on Shampoo's G G^T), raises and changes nothing."""
    from bregtop_dist import NonFiniteGradientError, NonFiniteStepError

    monkeypatch.setenv(PATHS_ENV_VAR, "1")
    for method, bad, error in (("bregtop-vn-v2", float("nan"), NonFiniteGradientError),
                               ("kl", -float("inf"), NonFiniteGradientError),
                               ("shampoo", 1e30, NonFiniteStepError)):
        params = [nn.Parameter(torch.randn(9, 7, generator=gen)), nn.Parameter(torch.randn(7, generator=gen))]
        opt = BregTop(params, method=method, lr=1e-2, max_precond_dim=4)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        before = [p.detach().clone() for p in params]
        state = {(key, name): t.clone() for key, stack in opt.kron_stacks.items()
                 for name, t in stack.state.tensors().items()}
        params[0].grad = torch.randn(9, 7, generator=gen) * (bad if bad == 1e30 else 1.0)
        if bad != 1e30:
            params[0].grad[int(torch.randint(0, 9, (1,), generator=gen)), 3] = bad
        params[1].grad = torch.randn(7, generator=gen)
        try:
            opt.step()
        except error:
            pass
        else:
            raise AssertionError(f"{method}: no {error.__name__}")
        assert all(torch.equal(p, b) for p, b in zip(params, before))
        after = {(key, name): t for key, stack in opt.kron_stacks.items() for name, t in stack.state.tensors().items()}
        assert all(torch.equal(state[k], after[k]) for k in state)
