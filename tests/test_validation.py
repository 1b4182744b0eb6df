"""Bad settings and inputs (issue 12, item 5): refused at construction, or before any group
steps, with an error naming the argument, its value and what is allowed."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from state_tensors import state_tensors
from torch import nn

from bregtop_dist import ArgumentTypeError, BregTop, BregTopConfig, kron_precondition, kron_stats
from bregtop_dist.core.stats import STATS_METHODS

SHAMPOO_OR_NONE = "exponent must be 0.25 or 0.5 (method='shampoo' only), or None for the method's own p"
PRESET = ", or None for the method's preset"


def _params():
    return [nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(5))]


# A value of the wrong type: ArgumentTypeError (a TypeError and a ValueError), named with what is allowed.
WRONG_TYPES = [
    (dict(lr="1e-3"), "lr='1e-3' is not allowed: lr must be a finite number >= 0 (got a str)"),
    (dict(lr=None), "lr=None is not allowed: lr must be a finite number >= 0 (got None)"),
    (dict(lr=True), "lr=True is not allowed: lr must be a finite number >= 0 (got a bool)"),
    (dict(eps="0"), "eps='0' is not allowed: it must be a finite number >= 0 (got a str)"),
    (dict(eps=None), "eps=None is not allowed: it must be a finite number >= 0 (got None)"),
    (dict(weight_decay="0"), "weight_decay='0' is not allowed: it must be a finite number >= 0 (got a str)"),
    (dict(weight_decay=None), "weight_decay=None is not allowed: it must be a finite number >= 0 (got None)"),
    (dict(init_factor="0.1"), "init_factor='0.1' is not allowed: it must be a finite number > 0 (got a str)"),
    (dict(init_factor=None), "init_factor=None is not allowed: it must be a finite number > 0 (got None)"),
    (dict(eig_floor=None), "eig_floor=None is not allowed: it must be in [0, 1) (got None)"),
    (dict(eig_floor=False), "eig_floor=False is not allowed: it must be in [0, 1) (got a bool)"),
    (dict(adam_eps="1e-8"), "adam_eps='1e-8' is not allowed: it must be a finite number > 0 (got a str)"),
    (dict(adam_eps=None), "adam_eps=None is not allowed: it must be a finite number > 0 (got None)"),
    (dict(rho="0.5"), f"rho='0.5' is not allowed: rho must be a number in (0, 1]{PRESET} (got a str)"),
    (dict(rho=True), f"rho=True is not allowed: rho must be a number in (0, 1]{PRESET} (got a bool)"),
    (dict(q="0.01"), f"q='0.01' is not allowed: q must be a number in [0, 1]{PRESET} (got a str)"),
    (dict(c="3"), f"c='3' is not allowed: c must be > 0 and finite{PRESET} (got a str)"),
    (dict(method="shampoo", exponent="0.25"), f"exponent='0.25' is not allowed: {SHAMPOO_OR_NONE} (got a str)"),
    (dict(betas=("0.9", "0.98")), "betas[0]='0.9' is not allowed: betas must be a pair of numbers in [0, 1) (got a str)"),
    (dict(betas=(0.9, True)), "betas[1]=True is not allowed: betas must be a pair of numbers in [0, 1) (got a bool)"),
    (dict(betas="09"), "betas='09' must be a pair of floats in [0, 1) (got a str)"),
    (dict(adam_betas=(0.9, "0.999")),
     "adam_betas[1]='0.999' is not allowed: adam_betas must be a pair of numbers in [0, 1) (got a str)"),
    (dict(adam_betas=(False, 0.9)),
     "adam_betas[0]=False is not allowed: adam_betas must be a pair of numbers in [0, 1) (got a bool)"),
    (dict(precondition_frequency=True),
     "precondition_frequency=True is not allowed: it must be an integer >= 1 (got a bool)"),
    (dict(precondition_frequency="10"),
     "precondition_frequency='10' is not allowed: it must be an integer >= 1 (got a str)"),
    (dict(max_precond_dim=True), "max_precond_dim=True is not allowed: it must be an integer >= 1 (got a bool)"),
    (dict(max_precond_dim=512.0), "max_precond_dim=512.0 is not allowed: it must be an integer >= 1 (got a float)"),
    (dict(method=3), "method=3 is not allowed: method must be one of shampoo, kl, vn-v1, vn-v2, f-v1, f-v2, "
                     "bregtop-vn-v1, bregtop-vn-v2, bregtop-f-v1, bregtop-f-v2 (got an int)"),
    (dict(method=["kl"]), "method=['kl'] is not allowed: method must be one of shampoo, kl"),
    (dict(init=3), "init=3 is not allowed: init must be one of first-gradient, first-gradient-averaged, first-gradient-unit, kl-methods (got an int)"),
    (dict(backend=3), "backend=3 is not allowed: backend must be one of auto, torch, triton (got an int)"),
    (dict(stagger_refresh="False"),
     "stagger_refresh='False' is not allowed: stagger_refresh must be True or False (got a str)"),
    (dict(stagger_refresh=1), "stagger_refresh=1 is not allowed: stagger_refresh must be True or False (got an int)"),
]

# The right type, a value outside the range.
OUT_OF_RANGE = [
    (dict(c=float("inf")), "c=inf is not allowed: c must be > 0 and finite"),
    (dict(c=float("nan")), "c=nan is not allowed: c must be > 0 and finite"),
    (dict(adam_eps=0), "adam_eps=0 is not allowed: it must be a finite number > 0"),
    (dict(adam_eps=-1e-8), "adam_eps=-1e-08 is not allowed: it must be a finite number > 0"),
    (dict(adam_eps=float("inf")), "adam_eps=inf is not allowed: it must be a finite number > 0"),
    (dict(lr=float("inf")), "lr=inf is not allowed: lr must be a finite number >= 0"),
    (dict(lr=float("nan")), "lr=nan is not allowed: lr must be a finite number >= 0"),
    (dict(eps=float("inf")), "eps=inf is not allowed: it must be a finite number >= 0"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1 is not allowed: it must be a finite number >= 0"),
    (dict(init_factor=0.0), "init_factor=0.0 is not allowed: it must be a finite number > 0"),
    (dict(init_factor=float("inf")), "init_factor=inf is not allowed: it must be a finite number > 0"),
    (dict(eig_floor=float("nan")), "eig_floor=nan is not allowed: it must be in [0, 1)"),
    (dict(betas=(0.9, 0.9, 0.9)), "betas=(0.9, 0.9, 0.9) must be a pair of floats in [0, 1) (got 3 values)"),
    (dict(adam_betas=(0.9, float("nan"))), "adam_betas[1]=nan is outside the allowed range [0, 1)"),
    (dict(max_precond_dim=-4), "max_precond_dim=-4 is not allowed: it must be an integer >= 1"),
]


def test_argument_type_error_is_a_type_error_and_a_value_error():
    assert issubclass(ArgumentTypeError, TypeError) and issubclass(ArgumentTypeError, ValueError)


@pytest.mark.parametrize("settings,message", WRONG_TYPES)
def test_wrong_types_are_refused_at_construction(settings, message):
    with pytest.raises(ArgumentTypeError, match=re.escape(message)):
        BregTop(_params(), **settings)
    with pytest.raises(TypeError, match=re.escape(message)):  # in a group, and as a TypeError
        BregTop([{"params": _params(), **settings}])


@pytest.mark.parametrize("settings,message", OUT_OF_RANGE)
def test_values_out_of_range_are_refused_at_construction(settings, message):
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        BregTop(_params(), **settings)
    assert not isinstance(err.value, TypeError)
    with pytest.raises(ValueError, match=re.escape(message)):
        BregTopConfig(**settings)


def test_an_unknown_keyword_is_refused_naming_the_allowed_settings():
    w = nn.Parameter(torch.randn(4, 3))
    with pytest.raises(ArgumentTypeError, match=re.escape("BregTop: unknown setting 'betass'; allowed: lr, method")):
        BregTop([w], betass=(0.9, 0.99))
    with pytest.raises(ArgumentTypeError, match="process_group, comm_dtype"):
        BregTop([w], lrate=1e-3)


def test_the_config_is_the_one_record_of_defaults():
    """BregTop's defaults are BregTopConfig's, and from_config builds the same optimizer as
    the keywords do."""
    w = nn.Parameter(torch.randn(4, 3))
    plain = BregTop([w]).defaults
    assert plain == BregTopConfig().as_defaults()
    cfg = BregTopConfig(lr=float(np.random.uniform(1e-4, 1e-2)), method="kl", precondition_frequency=3)
    assert BregTop.from_config([w], cfg).defaults == BregTop([w], **cfg.as_defaults()).defaults == cfg.as_defaults()
    assert BregTopConfig.from_group(BregTop.from_config([w], cfg).param_groups[0]) == cfg


def test_bregtop_switch_must_be_a_bool():
    message = "bregtop='False' is not allowed: bregtop must be True or False (got a str)"
    with pytest.raises(ArgumentTypeError, match=re.escape(message)):
        BregTop([{"params": _params(), "bregtop": "False"}])
    opt = BregTop(_params()[:1])
    with pytest.raises(ArgumentTypeError, match=re.escape("bregtop=0 is not allowed: bregtop must be True or False")):
        opt.add_param_group({"params": _params(), "bregtop": 0})


def test_good_values_of_every_number_type_are_accepted():
    cfg = BregTopConfig(lr=1, eps=0, betas=[0.9, 0.99], adam_betas=(np.float64(0.8), 0), weight_decay=np.float32(0.1),
                        c=2, rho=None, q=None, adam_eps=1e-6)
    assert cfg.betas == (0.9, 0.99) and cfg.adam_betas == (0.8, 0.0)
    assert BregTopConfig(method="shampoo", exponent=0.5).resolved_exponent == 0.5
    BregTop(_params(), lr=np.float64(1e-3), precondition_frequency=1, stagger_refresh=False)
    BregTop([{"params": _params(), "bregtop": False, "adam_eps": 1e-6}])


def test_eps_none_is_refused_before_anything_steps():
    """It used to pass construction and fail at the first step, after one stack had stepped."""
    message = "eps=None is not allowed: it must be a finite number >= 0 (got None)"
    opt = BregTop(_params()[:1])
    with pytest.raises(ArgumentTypeError, match=re.escape(message)):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(6, 2))], "eps": None})
    assert len(opt.param_groups) == 1


# ---------------------------------------------------------------- triton on the CPU


def test_triton_backend_with_cpu_parameters_is_refused_at_construction(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    message = "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU); got device cpu"
    with pytest.raises(ValueError, match=re.escape(message)):
        BregTop(_params(), backend="triton")
    opt = BregTop(_params())
    with pytest.raises(ValueError, match=re.escape(message)):
        opt.add_param_group({"params": [nn.Parameter(torch.randn(3, 3))], "backend": "triton"})
    assert len(opt.param_groups) == 1
    monkeypatch.setenv("BREGTOP_BACKEND", "triton")  # what "auto" means then
    with pytest.raises(ValueError, match=re.escape(message)):
        BregTop(_params())


def test_triton_check_looks_only_at_matrices_of_bregtop_groups(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    BregTop([{"params": _params(), "bregtop": False}], backend="triton")  # all AdamW
    BregTop([nn.Parameter(torch.randn(7))], backend="triton")  # no matrix
    BregTop([nn.Parameter(torch.empty(4, 3, device="meta"))], backend="triton")  # not a real tensor
    BregTop(_params(), backend="torch")


def test_triton_backend_in_the_interpreter_is_accepted(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    BregTop(_params(), backend="triton")


# ------------------------------------------------------------- nothing half-built


def test_bad_construction_leaves_the_parameters_untouched():
    params = _params()
    before = [p.detach().clone() for p in params]
    for bad in ({"lr": "1e-3"}, {"backend": "cuda"}):
        with pytest.raises(ValueError):
            BregTop([{"params": params[:1]}, {"params": params[1:], **bad}])
    assert all(torch.equal(p, b) and p.grad is None for p, b in zip(params, before))
    opt = BregTop([{"params": params[:1]}, {"params": params[1:]}])  # the same tensors, fresh
    assert len(opt.param_groups) == 2 and not opt.state


def test_bad_group_leaves_the_optimizer_unchanged(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    params = _params()
    extra = [nn.Parameter(torch.randn(6, 2)), nn.Parameter(torch.randn(2))]
    opt = BregTop(params, lr=0.01)
    groups, state_dict = copy.deepcopy(opt.param_groups), copy.deepcopy(opt.state_dict())
    built = opt.built_params
    for bad in ({"lr": "1e-3"}, {"eps": None}, {"c": float("inf")}, {"adam_eps": 0.0}, {"bregtop": "False"},
                {"method": 3}, {"backend": "triton"}):
        with pytest.raises(ValueError):
            opt.add_param_group({"params": (p for p in extra), **bad})  # a generator, read once
        assert len(opt.param_groups) == 1
        assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == \
            [{k: v for k, v in g.items() if k != "params"} for g in groups]
        assert all(a is b for a, b in zip(opt.param_groups[0]["params"], params))
        after = opt.state_dict()
        assert after["param_groups"] == state_dict["param_groups"] and not any(p in opt.state for p in extra)
        want = state_tensors(state_dict)
        assert state_tensors(after).keys() == want.keys()
        assert all(torch.equal(t, want[k]) for k, t in state_tensors(after).items())
        assert [[id(p) for p in g] for g in opt.built_params] == [[id(p) for p in g] for g in built]
    opt.add_param_group({"params": (p for p in extra), "lr": 0.1})  # the extra tensors were never taken
    assert len(opt.param_groups) == 2 and opt.param_groups[1]["params"] == extra


def test_bad_saved_settings_are_refused_by_load_state_dict():
    opt = BregTop(_params())
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["betas"] = ["0.9", "0.98"]
    with pytest.raises(ArgumentTypeError, match=re.escape("betas[0]='0.9' is not allowed")):
        opt.load_state_dict(bad)
    assert opt.param_groups[0]["betas"] == (0.9, 0.98)


# ------------------------------------------------------------------- kron_stats


def _stats_inputs(m, n, dtype=torch.float64, batch=()):
    G = torch.randn(*batch, m, n, dtype=dtype)
    return dict(
        G=G, U_L=torch.eye(m, dtype=dtype).expand(*batch, m, m), U_R=torch.eye(n, dtype=dtype).expand(*batch, n, n),
        lam_L=torch.ones(*batch, m, dtype=dtype), lam_R=torch.ones(*batch, n, dtype=dtype),
        L=torch.eye(m, dtype=dtype).expand(*batch, m, m), R=torch.eye(n, dtype=dtype).expand(*batch, n, n),
    )


FLOATS = "it must be a floating-point tensor (float16, bfloat16, float32 or float64)"


@pytest.mark.parametrize("name", ["G", "U_L", "U_R", "lam_L", "lam_R", "L", "R"])
def test_kron_stats_refuses_integer_tensors(name):
    inputs = _stats_inputs(4, 3)
    inputs[name] = inputs[name].to(torch.int64)
    with pytest.raises(ArgumentTypeError, match=re.escape(f"{name} has dtype torch.int64; {FLOATS}")):
        kron_stats("f-v1", **inputs)


def test_kron_stats_refuses_non_tensors_and_mixed_dtypes():
    inputs = _stats_inputs(4, 3)
    with pytest.raises(ArgumentTypeError, match=re.escape("G must be a floating-point torch.Tensor, got a list")):
        kron_stats("shampoo", **{**inputs, "G": inputs["G"].tolist()})
    with pytest.raises(ArgumentTypeError, match=re.escape("lam_R must be a floating-point torch.Tensor, got None")):
        kron_stats("shampoo", **{**inputs, "lam_R": None})
    message = "U_R has dtype torch.float32 and G has torch.float64; kron_stats takes tensors of one floating dtype"
    with pytest.raises(ArgumentTypeError, match=re.escape(message)):
        kron_stats("kl", **{**inputs, "U_R": inputs["U_R"].float()})


@pytest.mark.parametrize("name,shape,allowed", [
    ("U_L", (3, 3), "(..., m, m) = (..., 4, 4)"),
    ("U_R", (4, 4), "(..., n, n) = (..., 3, 3)"),
    ("lam_L", (3,), "(..., m) = (..., 4)"),
    ("lam_R", (4,), "(..., n) = (..., 3)"),
    ("L", (4,), "(..., m, m) = (..., 4, 4)"),
    ("R", (3, 4), "(..., n, n) = (..., 3, 3)"),
])
def test_kron_stats_names_a_tensor_of_the_wrong_shape(name, shape, allowed):
    inputs = _stats_inputs(4, 3)
    inputs[name] = torch.ones(shape, dtype=torch.float64)
    optional = "" if name.startswith("lam") else ", or None"
    message = f"{name} has shape {shape}; it must be {allowed} for G of shape (4, 3){optional}"
    with pytest.raises(ValueError, match=re.escape(message)):
        kron_stats("f-v1", **inputs)


def test_kron_stats_names_bad_g_shapes_and_batches():
    inputs = _stats_inputs(4, 3)
    with pytest.raises(ValueError, match=re.escape("G has shape (4,); it must be (..., m, n), at least 2-D")):
        kron_stats("shampoo", **{**inputs, "G": inputs["G"][:, 0]})
    message = "the leading (batch) dimensions of kron_stats' tensors must broadcast together; got G (2,), U_L (3,)"
    with pytest.raises(ValueError, match=re.escape(message)):
        kron_stats("kl", **{**inputs, "G": torch.randn(2, 4, 3, dtype=torch.float64),
                             "U_L": torch.eye(4, dtype=torch.float64).expand(3, 4, 4)})


@pytest.mark.parametrize("method", STATS_METHODS)
@pytest.mark.parametrize("m,n", [(0, 3), (4, 0), (0, 0)])
@pytest.mark.parametrize("batch", [(), (2,)])
def test_kron_stats_of_an_empty_block_is_empty(method, m, n, batch):
    d_l, d_r = kron_stats(method, **_stats_inputs(m, n, torch.float32, batch))
    assert d_l.shape == (*batch, m, m) and d_r.shape == (*batch, n, n)
    assert d_l.dtype == d_r.dtype == torch.float32
    assert not d_l.any() and not d_r.any()


# ------------------------------------------------------------- kron_precondition


def _block(m, n, dtype=torch.float32):
    return (torch.randn(m, n, dtype=dtype), torch.eye(m, dtype=dtype), torch.eye(n, dtype=dtype),
            torch.rand(m, dtype=dtype) + 0.5, torch.rand(n, dtype=dtype) + 0.5)


@pytest.mark.parametrize("position,name", list(enumerate(["M", "U_L", "U_R", "lam_L", "lam_R"])))
def test_kron_precondition_refuses_integer_tensors(position, name):
    args = list(_block(4, 3))
    args[position] = args[position].to(torch.int32)
    with pytest.raises(ArgumentTypeError, match=re.escape(f"{name} has dtype torch.int32; {FLOATS}")):
        kron_precondition(*args, rho=0.5, q=0.1, c=1.0)


def test_kron_precondition_refuses_a_non_tensor():
    M, U_L, U_R, lam_l, lam_r = _block(4, 3)
    with pytest.raises(ArgumentTypeError, match=re.escape("M must be a floating-point torch.Tensor, got a list")):
        kron_precondition(M.tolist(), U_L, U_R, lam_l, lam_r, 0.5, 0.1, 1.0)


@pytest.mark.parametrize("override,message", [
    (dict(rho="0.5"), "rho='0.5' is not allowed: rho must be a number in (0, 1] (got a str)"),
    (dict(rho=None), "rho=None is not allowed: rho must be a number in (0, 1] (got None)"),
    (dict(rho=True), "rho=True is not allowed: rho must be a number in (0, 1] (got a bool)"),
    (dict(q="0.1"), "q='0.1' is not allowed: q must be a number in [0, 1] (got a str)"),
    (dict(q=None), "q=None is not allowed: q must be a number in [0, 1] (got None)"),
    (dict(c="1"), "c='1' is not allowed: c must be > 0 and finite (got a str)"),
    (dict(c=None), "c=None is not allowed: c must be > 0 and finite (got None)"),
    (dict(eps="0"), "eps='0' is not allowed: it must be a finite number >= 0 (got a str)"),
    (dict(eps=None), "eps=None is not allowed: it must be a finite number >= 0 (got None)"),
])
def test_kron_precondition_names_settings_of_the_wrong_type(override, message):
    kwargs = dict(rho=0.5, q=0.1, c=1.0, eps=0.0) | override
    with pytest.raises(ArgumentTypeError, match=re.escape(message)):
        kron_precondition(*_block(4, 3), **kwargs)


def test_kron_precondition_refuses_infinite_c():
    with pytest.raises(ValueError, match=re.escape("c=inf is not allowed: c must be > 0 and finite")):
        kron_precondition(*_block(4, 3), rho=0.5, q=0.1, c=float("inf"))


@pytest.mark.parametrize("m,n", [(0, 3), (4, 0), (0, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bases", [True, False])
def test_kron_precondition_of_an_empty_block_is_empty(m, n, dtype, bases):
    M, U_L, U_R, lam_l, lam_r = _block(m, n, dtype)
    if not bases:
        U_L = U_R = None
    out = kron_precondition(M, U_L, U_R, lam_l, lam_r, 0.5, 0.1, 1.0)
    assert out.shape == (m, n) and out.dtype == dtype
