"""torch.optim conventions (issue 15, item 3, the parts done so far): what torch's own
optimizers do with named groups and printing, and clear errors, raised before anything
changes, for what BregTop cannot take (complex parameters, sparse gradients)."""

from __future__ import annotations

import copy

import pytest
import torch
from state_tensors import state_tensors
from torch import nn

from bregtop_dist import BregTop, param_groups


def _model():
    return nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def test_add_param_group_after_named_groups(gen):
    opt = BregTop(param_groups(_model()))
    extra = nn.Parameter(torch.randn(4, 3, generator=gen))
    opt.add_param_group({"params": [extra], "lr": 1e-2})
    assert opt.param_groups[-1]["param_names"] == ["param_groups[2]['params'][0]"]
    extra.grad = torch.randn(4, 3, generator=gen)
    before = extra.detach().clone()
    opt.step()
    assert not torch.equal(extra, before)


def test_print_shows_resolved_settings_per_group():
    text = repr(BregTop(param_groups(_model()), method="bregtop-f-v2"))
    kron, adamw = text.split("Parameter Group 1")
    assert "Kronecker" in kron and "rho: 0.05" in kron and "c: 1.6" in kron and "None" not in kron  # appendix D, F rows
    assert "AdamW" in adamw and "method" not in adamw and "rho" not in adamw and "betas: (0.9, 0.999)" in adamw


def test_complex_parameters_are_refused_by_name(gen):
    z = nn.Parameter(torch.randn(3, 3, dtype=torch.complex64, generator=gen))
    with pytest.raises(TypeError, match=r"param_groups\[0\]\['params'\]\[0\] is torch.complex64: BregTop takes real"):
        BregTop([z])
    opt = BregTop([nn.Parameter(torch.randn(3, 3, generator=gen))])
    with pytest.raises(TypeError, match=r"param_groups\[1\]\['params'\]\[0\] is torch.complex64"):
        opt.add_param_group({"params": [z]})
    assert len(opt.param_groups) == 1


def test_sparse_gradients_are_refused_before_anything_changes(gen):
    emb, lin = nn.Embedding(10, 4, sparse=True), nn.Linear(4, 4)
    opt = BregTop(list(emb.parameters()) + list(lin.parameters()))
    (lin(emb(torch.tensor([1, 2]))).sum()).backward()
    before = [p.detach().clone() for p in (*emb.parameters(), *lin.parameters())]
    state_before = state_tensors(copy.deepcopy(opt.state_dict()))
    with pytest.raises(TypeError, match=r"is sparse \(torch.sparse_coo\): BregTop needs dense gradients"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip((*emb.parameters(), *lin.parameters()), before))
    state_after = state_tensors(opt.state_dict())
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(t, state_before[k]) for k, t in state_after.items())


def _same_state(got: dict, want: dict) -> bool:
    got, want = state_tensors({"state": got}), state_tensors({"state": want})
    return bool(got) and set(got) == set(want) and all(torch.equal(t, want[k]) for k, t in got.items())


@pytest.mark.parametrize("shape", [(5, 3), (3, 3)])  # (3, 3): an empty block took its refresh phase before
def test_a_zero_size_matrix_is_skipped(gen, shape):
    """Beside a 0 x 4 matrix, the other parameters take exactly the steps and state they take
    without it, and the empty matrix's block keeps the state it had before any step."""
    w, b = torch.randn(shape, generator=gen), torch.randn(4, generator=gen)
    grads = [(torch.randn(shape, generator=gen), torch.randn(4, generator=gen)) for _ in range(4)]
    settings = dict(lr=1e-2, precondition_frequency=2, weight_decay=0.01)
    params, states = {}, {}
    for with_empty in (True, False):
        ps = [nn.Parameter(w.clone()), nn.Parameter(b.clone())]
        empty = nn.Parameter(torch.randn(0, 4))
        opt = BregTop([empty, *ps] if with_empty else ps, **settings)
        before = copy.deepcopy(opt.state_dict()["state"])
        for gw, gb in grads:
            empty.grad = torch.zeros(0, 4)
            for p, g in zip(ps, (gw, gb)):
                p.grad = g.clone()
            opt.step()
        state = opt.state_dict()["state"]
        params[with_empty], states[with_empty] = ps, {i: state[i + with_empty] for i in range(2)}
        if with_empty:
            assert empty.shape == (0, 4)
            assert _same_state({0: state[0]}, {0: before[0]})
            assert int(state[0]["kron"]["0"]["step"]) == 0 and not bool(state[0]["kron"]["0"]["ready"])
    assert all(torch.equal(p, q) for p, q in zip(params[True], params[False]))
    assert not torch.equal(params[True][0], w) and not torch.equal(params[True][1], b)
    assert _same_state(states[True], states[False])


def _run(gen_seed, steps, sign, **kw):
    g = torch.Generator().manual_seed(gen_seed)
    params = [nn.Parameter(torch.randn(7, 5, generator=g)), nn.Parameter(torch.randn(5, generator=g))]
    grads = [[torch.randn(p.shape, generator=g) for p in params] for _ in range(steps)]
    opt = BregTop(params, max_precond_dim=4, precondition_frequency=2, **kw)
    for gs in grads:
        for p, gr in zip(params, gs):
            p.grad = sign * gr
        opt.step()
    return params, opt


def test_maximize_is_minimising_the_negated_objective(gen):
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    up, _ = _run(seed, 6, 1.0, maximize=True)
    down, _ = _run(seed, 6, -1.0)
    assert all(torch.equal(a, b) for a, b in zip(up, down))


def test_a_tensor_lr_works_like_a_float(gen):
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    plain, _ = _run(seed, 5, 1.0, lr=3e-3)
    tensor, opt = _run(seed, 5, 1.0, lr=torch.tensor(3e-3))
    assert all(torch.equal(a, b) for a, b in zip(plain, tensor))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step()
    sched.step()
    assert float(opt.param_groups[0]["lr"]) == pytest.approx(1.5e-3)
    with pytest.raises(TypeError, match=r"lr=tensor\(\[0.0010, 0.0020\]\) is not allowed"):
        BregTop([nn.Parameter(torch.randn(3, 3))], lr=torch.tensor([1e-3, 2e-3]))


def test_one_cycle_lr_cycles_the_adamw_side_as_it_cycles_torch_adamw(gen):
    """OneCycleLR writes betas[0]; with adam_betas unset the AdamW side takes it, so a
    BregTop AdamW group follows torch.optim.AdamW under the same schedule step for step."""
    w0 = torch.randn(5, 4, generator=gen)
    ours, theirs = nn.Parameter(w0.clone()), nn.Parameter(w0.clone())
    opts = [BregTop([{"params": [ours], "bregtop": False}], lr=1e-2, betas=(0.9, 0.999)),
            torch.optim.AdamW([theirs], lr=1e-2, betas=(0.9, 0.999), weight_decay=0.0)]
    scheds = [torch.optim.lr_scheduler.OneCycleLR(o, max_lr=5e-2, total_steps=12) for o in opts]
    momenta = set()
    for _ in range(10):
        grad = torch.randn(5, 4, generator=gen)
        for p, o, s in zip((ours, theirs), opts, scheds):
            p.grad = grad.clone()
            o.step()
            s.step()
        momenta.add(opts[0].param_groups[0]["betas"][0])
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    assert len(momenta) > 5  # the momentum did cycle


def test_explicit_adam_betas_stay_put_under_a_momentum_scheduler():
    opt = BregTop(param_groups(_model()), adam_betas=(0.8, 0.99))
    torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10)
    assert "betas: (0.8, 0.99)" in repr(opt).split("Parameter Group 1")[1]


def test_embeddings_without_the_grouping_are_warned_about(gen):
    model = nn.ModuleDict({"token_embedding": nn.Embedding(11, 6), "mlp": nn.Linear(6, 5)})
    with pytest.warns(UserWarning, match=r"BregTop: token_embedding.weight looks like an embedding"):
        BregTop(model.named_parameters())
    named = nn.ModuleDict({"wte": nn.Embedding(11, 6), "lm_head": nn.Linear(6, 11)})
    with pytest.warns(UserWarning, match=r"wte.weight \(and 1 more\) looks like an embedding or output head"):
        BregTop(named.named_parameters())
    vocab = nn.Parameter(torch.zeros(8192, 16))  # unnamed: a vocabulary-sized matrix
    with pytest.warns(UserWarning, match=r"a \(8192, 16\) matrix looks like an embedding"):
        BregTop([vocab])


@pytest.mark.parametrize("build", [
    lambda m: BregTop(param_groups(m)),  # the paper's grouping
    lambda m: BregTop([{"params": list(m.parameters()), "bregtop": True}]),  # a decided group
    lambda m: BregTop(m.parameters(), bregtop=False),  # all AdamW
    lambda m: BregTop(nn.Linear(6, 5).named_parameters()),  # no embedding
])
def test_no_warning_when_the_grouping_is_decided(build, recwarn):
    build(nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 5)))
    assert not [w for w in recwarn if "looks like an embedding" in str(w.message)]
