"""BregTop as a torch optimizer: blocking and stacking, the AdamW side, resume, bad input."""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from state_tensors import kron_blocks, state_tensors
from torch import nn

from bregtop_dist import METHODS, BregTop, NonFiniteGradientError, param_groups
from bregtop_dist.block_plan import build_plan
from bregtop_dist.config import PRESETS
from bregtop_dist.core import bases
from bregtop_dist.core.block_step import BlockHyper, Schedule, init_block_state, kron_block_step
from bregtop_dist.distributed.layout import replicated_piece


def _params(gen, dtype=torch.float32):
    shapes = [(12, 9), (30, 8), (6, 3, 2, 2), (9,)]  # 30 rows cut in two at max_precond_dim=16
    return [nn.Parameter(torch.randn(*s, generator=gen).to(dtype)) for s in shapes]


def _grads(gen, params, steps):
    return [[torch.randn(p.shape, generator=gen).to(p.dtype) for p in params] for _ in range(steps)]


def _run(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("method", ["bregtop-vn-v2", "kl", "f-v1", "bregtop-f-v2"])
def test_optimizer_equals_algorithm1_per_block(gen, method):
    """Blocking, stacking, staggered offsets, lr and weight decay around the core step."""
    params = _params(gen)
    start = [p.detach().clone() for p in params]
    grads = _grads(gen, params, 8)
    settings = dict(lr=0.05, method=method, precondition_frequency=3, weight_decay=0.1, max_precond_dim=16)
    _run(BregTop(params, **settings), params, grads)

    preset = PRESETS[method]
    hyper = BlockHyper(stats=preset.stats, rho=preset.rho, q=preset.q, c=preset.c, beta1=0.9, beta2=0.98,
                       eps=1e-8, frequency=3)
    expected = [p.clone() for p in start]
    matrices = [p for p in expected if p.ndim >= 2]
    position = [next(i for i, q in enumerate(expected) if q is p) for p in matrices]
    plan = build_plan("0", [replicated_piece(p, "p", 1) for p in matrices], 16, 3, True, 0, 1)

    def piece(tensors, blk):
        rows, cols = matrices[blk.param].shape[0], matrices[blk.param][0].numel()
        s = blk.slice
        return tensors[blk.param].view(rows, cols)[s.r0 : s.r1, s.c0 : s.c1]

    for stack in plan.stacks.values():  # same stacks, so the same batched kernels
        blocks = [plan.blocks[i] for i in stack.block_ids]
        state = None
        for step_grads in grads:
            mats = [step_grads[i] for i in position]
            g = torch.stack([piece(mats, b) for b in blocks]).float()
            if state is None:
                state, _ = init_block_state(hyper, g)
            result = kron_block_step(state, g, hyper, Schedule.at(state.step + 1, stack.phases, hyper.frequency, "cpu"))
            state, update = result.state, result.update
            for b, u in zip(blocks, update):
                piece(matrices, b).mul_(1 - 0.05 * 0.1).add_(u, alpha=-0.05)
    for got, want in zip(params, expected):
        if got.ndim >= 2:
            assert torch.allclose(got.detach(), want, rtol=1e-5, atol=1e-6), (got - want).abs().max()


def test_adamw_side_equals_torch_adamw(gen):
    params = _params(gen)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    grads = _grads(gen, params, 5)
    groups = [{"params": params[:2]}, {"params": params[2:], "bregtop": False}]
    opt = BregTop(groups, lr=0.01, weight_decay=0.05, adam_betas=(0.8, 0.99), adam_eps=1e-6)
    ref = torch.optim.AdamW(twins[2:], lr=0.01, weight_decay=0.05, betas=(0.8, 0.99), eps=1e-6)
    _run(opt, params, grads)
    _run(ref, twins[2:], [g[2:] for g in grads])
    for p, t in zip(params[2:], twins[2:]):  # a 4-D tensor in an AdamW group and a 1-D tensor
        assert torch.allclose(p, t, rtol=1e-6, atol=1e-7)
    assert set(opt.state) == {params[0], params[1], params[2], params[3]}
    assert set(opt.state[params[0]]) == {"kron"} and set(opt.state[params[2]]) == {"step", "exp_avg", "exp_avg_sq"}


def test_one_dimensional_tensors_go_to_adamw_by_themselves(gen):
    params = _params(gen)
    opt = BregTop(params)
    _run(opt, params, _grads(gen, params, 2))
    assert [set(opt.state[p]) for p in params] == [{"kron"}] * 3 + [{"step", "exp_avg", "exp_avg_sq"}]
    shapes = {tuple(b["momentum"].shape) for b in kron_blocks(opt.state_dict()).values()}
    assert shapes == {(12, 9), (30, 8), (6, 12)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_continues_the_same_trajectory(gen, dtype):
    params = _params(gen, dtype)
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    grads = _grads(gen, params, 12)
    settings = dict(lr=0.02, method="bregtop-f-v1", precondition_frequency=4, max_precond_dim=16, weight_decay=0.01)

    _run(BregTop(params, **settings), params, grads)  # uninterrupted

    first = BregTop(twins, **settings)
    _run(first, twins, grads[:5])
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = BregTop(twins, **settings)
    resumed.load_state_dict(torch.load(buffer))
    _run(resumed, twins, grads[5:])
    for p, t in zip(params, twins):
        assert p.dtype == dtype
        assert torch.equal(p, t)


def test_bf16_parameters_keep_fp32_state(gen):
    params = _params(gen, torch.bfloat16)
    opt = BregTop(params, lr=1e-2)
    _run(opt, params, _grads(gen, params, 3))
    sd = opt.state_dict()
    for tensors in kron_blocks(sd).values():
        assert all(t.dtype in (torch.float32, torch.int64, torch.bool) for t in tensors.values())
    assert all(p.dtype == torch.bfloat16 and torch.isfinite(p).all() for p in params)


def test_parameters_without_gradient_are_skipped(gen):
    params = _params(gen)
    opt = BregTop(params, max_precond_dim=16)
    _run(opt, params, _grads(gen, params, 2))
    before = [p.detach().clone() for p in params]
    steps_before = {k: int(v["step"]) for k, v in kron_blocks(opt.state_dict()).items()}
    for p in params:
        p.grad = None
    params[0].grad = torch.randn(params[0].shape, generator=gen)
    opt.step()
    assert not torch.equal(params[0], before[0])
    assert all(torch.equal(p, b) for p, b in zip(params[1:], before[1:]))
    steps = {k: int(v["step"]) for k, v in kron_blocks(opt.state_dict()).items()}
    assert steps[(0, "0")] == 3  # params[0] (12 x 9, one block) stepped
    assert all(steps[k] == steps_before[k] == 2 for k in steps if k[0] != 0)


def test_non_finite_gradient_names_the_parameter_and_changes_nothing(gen):
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    opt = BregTop(param_groups(model, head_names=[]), lr=0.1)
    x = torch.randn(4, 5, generator=gen)
    model(x).sum().backward()
    opt.step()
    snapshot = copy.deepcopy((opt.state_dict(), [p.detach().clone() for p in model.parameters()]))
    opt.zero_grad()
    model(x).sum().backward()
    model[2].weight.grad[1, 2] = float("nan")
    with pytest.raises(NonFiniteGradientError, match=r"the gradient of 2\.weight contains NaN or inf"):
        opt.step()
    state, values = opt.state_dict(), list(model.parameters())
    assert all(torch.equal(p, v) for p, v in zip(values, snapshot[1]))
    want = state_tensors(snapshot[0])
    got = state_tensors(state)
    assert set(got) == set(want) and all(torch.equal(t, want[k]) for k, t in got.items())


def test_unnamed_parameters_are_named_by_position(gen):
    p = nn.Parameter(torch.randn(3, 2, generator=gen))
    opt = BregTop([p])
    p.grad = torch.full((3, 2), float("inf"))
    with pytest.raises(NonFiniteGradientError, match=r"param_groups\[0\]\['params'\]\[0\] \(shape \(3, 2\)\)"):
        opt.step()


BAD_SETTINGS = [
    (dict(method="adam"), "method='adam' is unknown; allowed: shampoo, kl, vn-v1, vn-v2, f-v1, f-v2, bregtop-vn-v1"),
    (dict(method="bregtop-vn-v2", rho=0.0), "rho=0.0 is outside the allowed range (0, 1]"),
    (dict(method="bregtop-vn-v2", rho=1.2), "rho=1.2 is outside the allowed range (0, 1]"),
    (dict(method="kl", rho=0.5), "rho=0.5 is not allowed for method='kl', which preconditions every entry"),
    (dict(q=-0.5), "q=-0.5 is outside the allowed range [0, 1]"),
    (dict(q=2.0), "q=2.0 is outside the allowed range [0, 1]"),
    (dict(c=0.0), "c=0.0 is not allowed: c must be > 0"),
    (dict(c=-1.0), "c=-1.0 is not allowed: c must be > 0"),
    (dict(betas=(1.0, 0.9)), "betas[0]=1.0 is outside the allowed range [0, 1)"),
    (dict(betas=(0.9, -0.1)), "betas[1]=-0.1 is outside the allowed range [0, 1)"),
    (dict(betas=0.9), "betas=0.9 must be a pair of floats in [0, 1)"),
    (dict(adam_betas=(0.9, 1.0)), "adam_betas[1]=1.0 is outside the allowed range [0, 1)"),
    (dict(precondition_frequency=0), "precondition_frequency=0 is not allowed: it must be an integer >= 1"),
    (dict(precondition_frequency=2.5), "precondition_frequency=2.5 is not allowed"),
    (dict(lr=-1e-3), "lr=-0.001 is not allowed: lr must be a finite number >= 0"),
    (dict(eps=-1.0), "eps=-1.0 is not allowed: it must be a finite number >= 0"),
    (dict(weight_decay=float("nan")), "weight_decay=nan is not allowed"),
    (dict(max_precond_dim=0), "max_precond_dim=0 is not allowed: it must be an integer >= 1"),
    (dict(backend="cuda"), "backend='cuda' is unknown; allowed: auto, torch, triton"),
]


@pytest.mark.parametrize("settings,message", BAD_SETTINGS)
def test_bad_settings_raise_at_construction(gen, settings, message):
    with pytest.raises(ValueError) as err:
        BregTop(_params(gen), **settings)
    assert message in str(err.value)


def test_bad_group_is_refused_and_the_optimizer_is_unchanged(gen):
    params = _params(gen)
    opt = BregTop(params[:2])
    with pytest.raises(ValueError, match=r"q=3 is outside the allowed range \[0, 1\]"):
        opt.add_param_group({"params": params[2:], "q": 3})
    assert len(opt.param_groups) == 1
    with pytest.raises(ValueError, match=r"rho=0.2 is not allowed for method='shampoo'"):
        BregTop([{"params": params[:2], "method": "shampoo", "rho": 0.2}])


def test_presets_follow_appendix_d():
    assert METHODS == ("shampoo", "kl", "vn-v1", "vn-v2", "f-v1", "f-v2",
                       "bregtop-vn-v1", "bregtop-vn-v2", "bregtop-f-v1", "bregtop-f-v2")
    for name in ("bregtop-vn-v1", "bregtop-vn-v2"):
        assert (PRESETS[name].rho, PRESETS[name].q, PRESETS[name].c) == (0.06, 0.01, 3.0)
    for name in ("bregtop-f-v1", "bregtop-f-v2"):
        assert (PRESETS[name].rho, PRESETS[name].q, PRESETS[name].c) == (0.05, 0.01, 1.6)
    assert all(PRESETS[name].rho == 1.0 for name in METHODS[:6])


def test_group_method_override_takes_its_own_preset(gen):
    params = _params(gen)
    opt = BregTop([{"params": params[:1], "method": "bregtop-f-v2"}, {"params": params[1:2]}])
    _run(opt, params[:2], _grads(gen, params[:2], 1))
    assert opt.param_groups[0]["rho"] is None and opt.param_groups[0]["method"] == "bregtop-f-v2"


def test_load_state_dict_validates_before_changing_anything(gen):
    params = _params(gen)
    opt = BregTop(params, max_precond_dim=16)
    _run(opt, params, _grads(gen, params, 2))
    good = copy.deepcopy(opt.state_dict())
    bad = copy.deepcopy(good)
    bad["state"][0]["kron"]["0"]["L"] = torch.zeros(5, 5)
    with pytest.raises(ValueError, match=r"Kronecker block 0 \(12x9\) of param_groups\[0\]\['params'\]\[0\] "
                       r"\(shape \(12, 9\)\): field 'L' has shape \(5, 5\), expected \(12, 12\)"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    del bad["state"][1]["kron"]["1"]
    with pytest.raises(ValueError, match=r"Kronecker block 1 \(15x8\) of param_groups\[0\]\['params'\]\[1\] "
                       r"\(shape \(30, 8\)\): it is missing; nothing was loaded"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["param_groups"][0]["q"] = -1.0
    with pytest.raises(ValueError, match=r"q=-1.0 is outside"):
        opt.load_state_dict(bad)
    bad = copy.deepcopy(good)
    bad["param_groups"] = bad["param_groups"] * 2
    with pytest.raises(ValueError, match="the state dict has 2 param groups, this optimizer has 1"):
        opt.load_state_dict(bad)
    after = opt.state_dict()
    want = state_tensors(good)
    assert all(torch.equal(t, want[k]) for k, t in state_tensors(after).items())
    assert after["param_groups"][0]["q"] == good["param_groups"][0]["q"]


def test_failed_basis_refresh_warns_once_and_training_goes_on(gen, monkeypatch):
    params = _params(gen)[:2]
    opt = BregTop(params, precondition_frequency=1)

    def broken(a):
        raise RuntimeError("simulated LAPACK failure")

    monkeypatch.setattr(bases, "orthonormal_factor", broken)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(opt, params, _grads(gen, params, 3))
    basis_warnings = [w for w in caught if "eigenbasis computation failed" in str(w.message)]
    assert len(basis_warnings) == 1
    assert basis_warnings[0].filename == __file__  # points at the caller's opt.step()
    assert all(torch.isfinite(p).all() for p in params)


def test_closure_is_evaluated_with_gradients(gen):
    model = nn.Linear(4, 3)
    opt = BregTop(model.parameters(), lr=0.01)
    x = torch.randn(8, 4, generator=gen)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    first = opt.step(closure).item()
    for _ in range(20):
        last = opt.step(closure).item()
    assert last < first


class _TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.attn = nn.Linear(16, 48)
        self.norm = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16, bias=False))
        self.head = nn.Linear(16, 2)


def test_param_groups_splits_the_papers_way():
    model = _TinyTransformer()
    kron, adam = param_groups(model, lr=3e-4)
    assert kron["param_names"] == ["attn.weight", "mlp.0.weight", "mlp.2.weight"] and kron["bregtop"]
    assert adam["param_names"] == ["embed.weight", "attn.bias", "norm.weight", "norm.bias", "mlp.0.bias",
                                   "head.weight", "head.bias"]
    assert adam["bregtop"] is False and adam["lr"] == 3e-4
    kron, adam = param_groups(model, head_names=[])
    assert "head.weight" in kron["param_names"]
    with pytest.raises(ValueError, match=r"head_names \['decoder'\] are not modules of the model"):
        param_groups(model, head_names=["decoder"])


def test_tied_embedding_is_listed_once_on_the_adamw_side(gen):
    """The tied matrix is one AdamW-side parameter: a step moves it once, as torch's AdamW
    moves it with the gradient both uses summed, and it has no Kronecker state."""
    model = _TinyTransformer()
    model.head = nn.Linear(16, 50, bias=False)
    model.head.weight = model.embed.weight
    kron, adam = param_groups(model)
    assert adam["param_names"].count("embed.weight") == 1 and "head.weight" not in adam["param_names"]
    assert "embed.weight" not in kron["param_names"]
    settings = dict(lr=1e-2, adam_betas=(0.8, 0.99), adam_eps=1e-6, weight_decay=0.05)
    opt = BregTop([kron, adam], **settings)
    ids = torch.randint(0, 50, (4, 3), generator=gen)
    h = model.norm(model.mlp(model.attn(model.embed(ids))[..., :16]))
    model.head(h).sum().backward()
    tied = model.embed.weight
    twin = nn.Parameter(tied.detach().clone())
    twin.grad = tied.grad.clone()
    ref = torch.optim.AdamW([twin], lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.05)
    opt.step()
    ref.step()
    assert set(opt.state[tied]) == {"step", "exp_avg", "exp_avg_sq"} and int(opt.state[tied]["step"]) == 1
    assert torch.allclose(tied, twin, rtol=1e-6, atol=1e-7), (tied - twin).abs().max()


def test_state_shapes_describe_the_empty_state(gen):
    params = _params(gen)
    shards = [replicated_piece(p, "p", 1) for p in params if p.ndim >= 2]
    for stack in build_plan("0", shards, 16, 3, True, 0, 1).stacks.values():
        fields = stack.empty_state().tensors()
        assert {k: (tuple(v.shape), v.dtype) for k, v in fields.items()} == stack.state_shapes()


def test_non_contiguous_gradients_are_accepted(gen):
    """Transposed and strided gradient views step exactly as their contiguous copies do."""
    params = _params(gen)  # matrices, a 4-D tensor (a 6 x 12 matrix to BregTop) and a vector
    start = [p.detach().clone() for p in params]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    views = []
    for _ in range(4):
        step = []
        for p in params:
            if p.ndim == 2:
                g = torch.randn(p.shape[::-1], generator=gen).T  # a transposed view
            else:
                g = torch.randn(*p.shape[:-1], 2 * p.shape[-1], generator=gen)[..., ::2]  # a strided view
            assert not g.is_contiguous()
            step.append(g)
        views.append(step)
    settings = dict(lr=0.02, precondition_frequency=2, max_precond_dim=16, weight_decay=0.01)
    opt = BregTop(params, **settings)
    for step in views:
        for p, g in zip(params, step):
            p.grad = g  # as it is: clone() would make the strided views contiguous
        opt.step()
        assert not any(p.grad.is_contiguous() for p in params)
    _run(BregTop(twins, **settings), twins, [[g.contiguous() for g in step] for step in views])
    for p, t in zip(params, twins):
        assert torch.equal(p, t), (p - t).abs().max()
    assert not any(torch.equal(p, s) for p, s in zip(params, start))


def test_matrices_swapped_for_flat_partitions_are_refused(gen):
    """What DeepSpeed ZeRO does to a client optimizer it was not told about."""
    p = nn.Parameter(torch.randn(6, 5, generator=gen))
    opt = BregTop([p])
    flat = nn.Parameter(p.detach().reshape(-1).clone())
    flat.grad = torch.randn(30, generator=gen)
    opt.param_groups[0]["params"] = [flat]
    with pytest.raises(RuntimeError, match=r"param group 0 had matrices .*integrations\.deepspeed\.initialize"):
        opt.step()
    assert torch.equal(flat.detach(), p.detach().reshape(-1))


@pytest.mark.parametrize("bad", [-0.1, 1.0, "x"])
def test_eig_floor_is_checked(bad):
    with pytest.raises(ValueError, match=r"eig_floor=.* is not allowed: it must be in \[0, 1\)"):
        BregTop([nn.Parameter(torch.randn(3, 4))], eig_floor=bad)


@pytest.mark.parametrize("key,value", [("lr", float("nan")), ("eps", None), ("method", "adam")])
def test_a_bad_setting_put_into_a_later_group_fails_before_any_group_steps(gen, key, value):
    """param_groups is public and mutable: every group is validated before the first one steps."""
    params = _params(gen)
    opt = BregTop([{"params": params[:2]}, {"params": params[2:]}], lr=1e-2)
    for p, g in zip(params, _grads(gen, params, 1)[0]):
        p.grad = g
    opt.param_groups[1][key] = value
    before = [p.detach().clone() for p in params]
    with pytest.raises((ValueError, TypeError), match=key):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(params, before))
    assert not opt.state and not opt.kron_stacks


def test_shampoo_defaults_to_the_fourth_root_and_keeps_the_square_root_reachable(gen):
    from bregtop_dist.config import BregTopConfig

    assert BregTopConfig(method="shampoo").resolved_exponent == 0.25
    assert BregTopConfig(method="shampoo", exponent=0.5).resolved_exponent == 0.5
    assert BregTopConfig(method="kl").resolved_exponent == 0.5
    params = _params(gen)
    grads = _grads(gen, params, 3)
    moved = {}
    for p_exp in (0.25, 0.5):
        ps = [nn.Parameter(p.detach().clone()) for p in params]
        _run(BregTop(ps, method="shampoo", exponent=p_exp, lr=1e-2), ps, grads)
        moved[p_exp] = ps[0].detach()
    assert not torch.equal(moved[0.25], moved[0.5])
