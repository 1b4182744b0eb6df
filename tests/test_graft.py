"""graft='adamw': every Kronecker block's update keeps its method's direction and takes the
Frobenius norm of AdamW's update for that block, against AdamW written out in float64."""

from __future__ import annotations

import pytest
import torch

from bregtop_dist import METHODS, BregTop

INITS = ["first-gradient", "kl-methods"]
SHAPE, MAX_DIM = (20, 12), 8  # blocks of rows 7+7+6 and columns 6+6 (nearly equal pieces)
LR, BETA1, BETA2, EPS = 0.05, 0.9, 0.999, 1e-8
ROWS = [slice(0, 7), slice(7, 14), slice(14, 20)]
COLS = [slice(0, 6), slice(6, 12)]


def _gradients(gen: torch.Generator, steps: int) -> list[torch.Tensor]:
    """Gradients of sizes 1e-6..1e6 that change from step to step, one of them zero (a step
    that leaves a block out: its moments decay, its factors are kept)."""
    out = []
    for k in range(steps):
        scale = 10.0 ** float(torch.empty(1).uniform_(-6.0, 6.0, generator=gen))
        out.append(torch.zeros(SHAPE) if k == 4 else scale * torch.randn(SHAPE, generator=gen))
    return out


def _moved(opt: BregTop, p: torch.nn.Parameter, grad: torch.Tensor) -> torch.Tensor:
    """The step's change of p (started at zero, so that the change is -lr * update exactly)."""
    with torch.no_grad():
        p.zero_()
    p.grad = grad.clone()
    opt.step()
    return p.detach().double().clone()


@pytest.mark.parametrize("init", INITS)
@pytest.mark.parametrize("method", METHODS)
def test_each_block_moves_by_adamws_norm_in_its_methods_direction(gen, method, init):
    """Per block and step: the grafted change equals the ungrafted change rescaled to
    ``lr ||M_hat / (sqrt(v_hat) + eps)||`` (M, v: AdamW's moments of the block's gradients,
    bias-corrected by the steps the block has taken) to 1e-5 of its largest entry."""
    settings = dict(method=method, init=init, lr=LR, betas=(BETA1, 0.98), max_precond_dim=MAX_DIM,
                    precondition_frequency=3)
    grafted, plain = torch.nn.Parameter(torch.zeros(SHAPE)), torch.nn.Parameter(torch.zeros(SHAPE))
    opt_g, opt_p = BregTop([grafted], graft="adamw", **settings), BregTop([plain], **settings)
    m = torch.zeros(SHAPE, dtype=torch.float64)
    v = torch.zeros_like(m)
    taken = 0
    for k, grad in enumerate(_gradients(gen, 9)):
        got, direction = _moved(opt_g, grafted, grad), _moved(opt_p, plain, grad)
        if init == "kl-methods" and k == 0:  # [11]'s first step only initialises the state
            assert float(got.abs().max()) == 0.0 and float(direction.abs().max()) == 0.0
            continue
        taken += 1
        m = BETA1 * m + (1 - BETA1) * grad.double()
        v = BETA2 * v + (1 - BETA2) * grad.double().square()
        adamw = (m / (1 - BETA1**taken)) / ((v / (1 - BETA2**taken)).sqrt() + EPS)
        for rows in ROWS:
            for cols in COLS:
                own = direction[rows, cols]
                assert float(own.norm()) > 0.0, f"setup: {method} left block {rows}, {cols} unmoved at step {k + 1}"
                want = own * (LR * adamw[rows, cols].norm() / own.norm())
                err = float((got[rows, cols] - want).abs().max() / want.abs().max())
                assert err <= 1e-5, f"step {k + 1}, block rows {rows} cols {cols}: off by {err:.3g}"


def test_blocks_that_started_later_correct_by_their_own_step_counts(gen):
    """The first rows' blocks see no gradient for three steps (a layer the loss reaches only
    later), so blocks of one stack have taken different numbers of steps: each grafted change
    is AdamW's norm bias-corrected by that block's own count, to 1e-5."""
    settings = dict(method="kl", lr=LR, betas=(BETA1, 0.98), max_precond_dim=MAX_DIM, precondition_frequency=3)
    grafted, plain = torch.nn.Parameter(torch.zeros(SHAPE)), torch.nn.Parameter(torch.zeros(SHAPE))
    opt_g, opt_p = BregTop([grafted], graft="adamw", **settings), BregTop([plain], **settings)
    m = torch.zeros(SHAPE, dtype=torch.float64)
    v = torch.zeros_like(m)
    taken = torch.zeros(SHAPE, dtype=torch.float64)  # each entry: its block's step count
    started = torch.zeros(SHAPE, dtype=torch.bool)
    for k, grad in enumerate(_gradients(gen, 8)):
        if k < 3:
            grad[ROWS[0]] = 0.0
        started |= grad != 0  # every block of a started row range has non-zero entries
        got, direction = _moved(opt_g, grafted, grad), _moved(opt_p, plain, grad)
        g64 = grad.double()
        m = torch.where(started, BETA1 * m + (1 - BETA1) * g64, m)
        v = torch.where(started, BETA2 * v + (1 - BETA2) * g64.square(), v)
        taken = torch.where(started, taken + 1, taken)
        for rows in ROWS:
            for cols in COLS:
                if not bool(started[rows, cols].all()):
                    assert float(got[rows, cols].abs().max()) == 0.0, f"step {k + 1}: a block without state moved"
                    continue
                t = float(taken[rows, cols][0, 0])
                adamw = (m[rows, cols] / (1 - BETA1**t)) / ((v[rows, cols] / (1 - BETA2**t)).sqrt() + EPS)
                own = direction[rows, cols]
                want = own * (LR * adamw.norm() / own.norm())
                err = float((got[rows, cols] - want).abs().max() / want.abs().max())
                assert err <= 1e-5, f"step {k + 1}, block rows {rows} cols {cols} ({t:g} steps): off by {err:.3g}"
    assert float(taken[ROWS[0]][0, 0]) < float(taken[ROWS[1]][0, 0]), "setup: the stack's counts never differed"


def test_a_block_without_gradient_is_not_moved_and_an_adamw_lr_carries_over(gen):
    """A zero-initialised layer's block gets no update (no 0/0); with AdamW's lr a grafted
    block moves as far as AdamW moves it (the size is AdamW's whatever the method)."""
    lr = 1e-3
    dead, live = torch.nn.Parameter(torch.randn(6, 5)), torch.nn.Parameter(torch.randn(6, 5))
    twin = torch.nn.Parameter(live.detach().clone())
    opt = BregTop([dead, live], method="bregtop-vn-v2", graft="adamw", lr=lr)
    adamw = torch.optim.AdamW([twin], lr=lr, betas=(0.9, 0.999), weight_decay=0.0)
    before = dead.detach().clone()
    for _ in range(5):
        grad = torch.randn(6, 5, generator=gen)
        dead.grad, live.grad, twin.grad = torch.zeros(6, 5), grad.clone(), grad.clone()
        start, start_twin = live.detach().clone(), twin.detach().clone()
        opt.step()
        adamw.step()
        ours, theirs = (live.detach() - start).norm(), (twin.detach() - start_twin).norm()
        assert abs(float(ours / theirs) - 1.0) <= 1e-4, (float(ours), float(theirs))
    assert torch.equal(dead.detach(), before)


@pytest.mark.parametrize("method", ["kl", "bregtop-vn-v2"])
def test_bf16_parameters_graft_as_float32_ones_up_to_bf16_rounding(gen, method):
    """A bf16 parameter keeps float32 grafting moments and moves as its float32 twin fed the
    same (bf16-representable) gradients moves, up to rounding the change to bf16."""
    settings = dict(method=method, lr=LR, graft="adamw", max_precond_dim=MAX_DIM, precondition_frequency=3)
    half, full = torch.nn.Parameter(torch.zeros(SHAPE, dtype=torch.bfloat16)), torch.nn.Parameter(torch.zeros(SHAPE))
    opt_h, opt_f = BregTop([half], **settings), BregTop([full], **settings)
    for k, grad in enumerate(_gradients(gen, 7)):
        grad = grad.to(torch.bfloat16)
        got, want = _moved(opt_h, half, grad), _moved(opt_f, full, grad.float())
        assert half.dtype == torch.bfloat16
        if k == 4:  # the all-zero gradient: momentum alone moves the weights
            assert float(want.abs().max()) > 0.0
        err = float((got - want).abs().max() / want.abs().max())
        assert err <= 2.0**-8, f"step {k + 1}: off by {err:.3g}"
    block = opt_h.state_dict()["state"][0]["kron"]["0"]
    assert block["graft_m"].dtype == block["graft_v"].dtype == torch.float32


def test_unknown_graft_is_refused_naming_it_and_the_allowed_values():
    p = torch.nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"graft='sgd' is unknown; allowed: none, adamw"):
        BregTop([p], graft="sgd")
    with pytest.raises(TypeError, match=r"graft must be one of none, adamw"):
        BregTop([p], graft=True)


def test_grafting_switched_on_after_blocks_stepped_is_refused_before_anything_changes(gen):
    """A second moment started late would be bias-corrected by the block's whole step count
    and blow the size up, so the step refuses and leaves parameters and state as they were."""
    p = torch.nn.Parameter(torch.randn(6, 5, generator=gen))
    opt = BregTop([p], method="kl")
    p.grad = torch.randn(6, 5, generator=gen)
    opt.step()
    before_p, before_state = p.detach().clone(), opt.state_dict()
    opt.param_groups[0]["graft"] = "adamw"
    p.grad = torch.randn(6, 5, generator=gen)
    with pytest.raises(ValueError, match=r"graft='adamw' was set on a param group whose blocks have already stepped"):
        opt.step()
    assert torch.equal(p.detach(), before_p)
    after = opt.state_dict()["state"][0]["kron"]["0"]
    assert all(torch.equal(v, before_state["state"][0]["kron"]["0"][k]) for k, v in after.items())
    assert "graft_v" not in after


def test_state_dict_round_trip_continues_exactly_and_a_missing_moment_is_refused(gen):
    grads = [torch.randn(20, 12, generator=gen) for _ in range(6)]
    start = torch.randn(20, 12, generator=gen)
    settings = dict(method="bregtop-vn-v2", graft="adamw", max_precond_dim=8, precondition_frequency=2)

    def run(opt: BregTop, p: torch.nn.Parameter, steps: list[torch.Tensor]) -> None:
        for g in steps:
            p.grad = g.clone()
            opt.step()

    whole = torch.nn.Parameter(start.clone())
    run(BregTop([whole], **settings), whole, grads)
    first = torch.nn.Parameter(start.clone())
    opt = BregTop([first], **settings)
    run(opt, first, grads[:3])
    saved = opt.state_dict()
    resumed = BregTop([first], **settings)
    resumed.load_state_dict(saved)
    run(resumed, first, grads[3:])
    assert torch.equal(first.detach(), whole.detach())

    del saved["state"][0]["kron"]["2"]["graft_m"]
    fresh = BregTop([first], **settings)
    with pytest.raises(ValueError, match=r"graft_m.*missing"):
        fresh.load_state_dict(saved)
