"""``BregTop.load_state_dict`` checks values, not only keys, and changes nothing when it refuses.

Each poisoned state dict must be refused with the exact message (naming the block or the
parameter, the field, the value and what is allowed), leave the optimizer's state and settings
bit-identical, and leave it stepping exactly as an optimizer that never saw the bad load. Good
state dicts (before any step, after steps, in the forms the checks allow) still load and
continue identically. On 2 gloo processes (``load_scenarios``), a problem on one rank only makes
every rank raise the same error instead of one rank loading and another waiting forever.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from load_scenarios import SCENARIOS
from state_tensors import state_tensors
from torch import nn

from bregtop_dist import ArgumentTypeError, BregTop

from dist_harness import run_scenarios

SETTINGS: dict[str, Any] = dict(lr=0.02, method="bregtop-vn-v2", precondition_frequency=2, max_precond_dim=16,
                                weight_decay=0.01)
TRAINED = 3  # steps before the state dict is taken: two refreshes, every block ready
MORE = 2  # steps after the load attempt

# What the messages name: block 0 of the 12x9 matrix, block 1 of the 30x8 one (cut in two 15x8
# blocks at max_precond_dim=16), the conv kernel read as 6x12, and the 1-D tensor on AdamW.
B0 = r"Kronecker block 0 \(12x9\) of param_groups\[0\]\['params'\]\[0\] \(shape \(12, 9\)\)"
B1 = r"Kronecker block 1 \(15x8\) of param_groups\[0\]\['params'\]\[1\] \(shape \(30, 8\)\)"
B2 = r"Kronecker block 0 \(6x12\) of param_groups\[0\]\['params'\]\[2\] \(shape \(6, 3, 2, 2\)\)"
ADAMW = r"the AdamW-side state of param_groups\[0\]\['params'\]\[3\] \(shape \(9,\)\)"
ADAMW_HOLDS = r"an AdamW-side entry holds exactly \['step', 'exp_avg', 'exp_avg_sq'\], or nothing before the first step"
FINITE = "a block's float fields must be finite"


def _params(gen: torch.Generator) -> list[nn.Parameter]:
    shapes = [(12, 9), (30, 8), (6, 3, 2, 2), (9,)]
    return [nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]


def _grads(gen: torch.Generator, params: list[nn.Parameter], steps: int) -> list[list[torch.Tensor]]:
    return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]


def _run(opt: BregTop, params: list[nn.Parameter], grads: list[list[torch.Tensor]]) -> None:
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


def _twins(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in params]


def _snapshot(opt: BregTop) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    return {k: v.clone() for k, v in state_tensors(sd).items()}, copy.deepcopy(sd["param_groups"])


def _assert_same_state(got: BregTop, want: BregTop) -> None:
    """Bit-identical state tensors (dtype, device and shape too)."""
    got_t, want_t = state_tensors(got.state_dict()), state_tensors(want.state_dict())
    assert got_t.keys() == want_t.keys()
    for k, t in got_t.items():
        w = want_t[k]
        assert (t.dtype, t.device, t.shape) == (w.dtype, w.device, w.shape), k
        assert torch.equal(t, w), k


# -------------------------------------------------------------------------- poisons
def _set(t: torch.Tensor, values: list[float], gen: torch.Generator) -> None:
    """Write ``values`` at distinct random entries of ``t``."""
    where = torch.randperm(t.numel(), generator=gen)[: len(values)]
    flat = t.view(-1)
    for i, v in zip(where.tolist(), values):
        flat[i] = v


def _block(sd: dict[str, Any], param: int, index: str) -> dict[str, torch.Tensor]:
    return sd["state"][param]["kron"][index]


def _amount(gen: torch.Generator) -> int:
    return int(torch.randint(1, 6, (), generator=gen))


NAN, INF = float("nan"), float("inf")
Poison = Callable[[dict[str, Any], torch.Generator], Any]


def _nan_in(param: int, index: str, field: str) -> Poison:
    def poison(sd: dict[str, Any], gen: torch.Generator) -> Any:
        _set(_block(sd, param, index)[field], [NAN], gen)
        return sd
    return poison


def _inf_in(param: int, index: str, field: str, sign: float = 1.0) -> Poison:
    def poison(sd: dict[str, Any], gen: torch.Generator) -> Any:
        _set(_block(sd, param, index)[field], [sign * INF], gen)
        return sd
    return poison


def _replace_block_field(param: int, index: str, field: str, make: Callable[[torch.Tensor], Any]) -> Poison:
    def poison(sd: dict[str, Any], gen: torch.Generator) -> Any:
        block = _block(sd, param, index)
        block[field] = make(block[field])
        return sd
    return poison


def _nan_and_inf_in_momentum(sd: dict[str, Any], gen: torch.Generator) -> Any:
    _set(_block(sd, 0, "0")["momentum"], [NAN, -INF], gen)
    return sd


def _negative_block_step(sd: dict[str, Any], gen: torch.Generator) -> Any:
    _block(sd, 1, "1")["step"] = torch.tensor(-_amount(gen), dtype=torch.int64)
    return sd


def _adamw(key: str, make: Callable[[Any, torch.Generator], Any]) -> Poison:
    def poison(sd: dict[str, Any], gen: torch.Generator) -> Any:
        sd["state"][3][key] = make(sd["state"][3][key], gen)
        return sd
    return poison


def _with_nan(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    _set(t, [NAN], gen)
    return t


def _with_negative(t: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    _set(t, [-0.25 * _amount(gen)], gen)
    return t


def _unknown_adamw_key(sd: dict[str, Any], gen: torch.Generator) -> Any:
    sd["state"][3]["momentum_buffer"] = torch.zeros(9)
    return sd


def _missing_adamw_key(sd: dict[str, Any], gen: torch.Generator) -> Any:
    del sd["state"][3]["exp_avg_sq"]
    return sd


def _without(key: str) -> Poison:
    def poison(sd: dict[str, Any], gen: torch.Generator) -> Any:
        del sd[key]
        return sd
    return poison


def _group(edit: Callable[[dict[str, Any]], None]) -> Poison:
    def poison(sd: dict[str, Any], gen: torch.Generator) -> Any:
        edit(sd["param_groups"][0])
        return sd
    return poison


def _drop_last_param(group: dict[str, Any]) -> None:
    group["params"] = group["params"][:-1]


def _unhashable_param_key(group: dict[str, Any]) -> None:
    group["params"] = [[key] for key in group["params"]]


POISONS: dict[str, tuple[Poison, str]] = {
    # Kronecker block fields
    "nan_in_L": (_nan_in(0, "0", "L"), rf"{B0}: field 'L' holds 1 NaN of its 144 entries; {FINITE}"),
    "inf_in_R": (_inf_in(1, "1", "R"), rf"{B1}: field 'R' holds 1 inf of its 64 entries; {FINITE}"),
    "minus_inf_in_U_L": (_inf_in(2, "0", "U_L", -1.0), rf"{B2}: field 'U_L' holds 1 inf of its 36 entries; {FINITE}"),
    "nan_in_lam_L": (_nan_in(1, "1", "lam_L"), rf"{B1}: field 'lam_L' holds 1 NaN of its 15 entries; {FINITE}"),
    "nan_and_inf_in_momentum": (
        _nan_and_inf_in_momentum, rf"{B0}: field 'momentum' holds 1 NaN and 1 inf of its 108 entries; {FINITE}"),
    "negative_block_step": (
        _negative_block_step, rf"{B1}: field 'step' is -[1-5]; it counts the steps the block has taken and must be >= 0"),
    "float64_factor": (_replace_block_field(0, "0", "L", lambda t: t.double()),
                       rf"{B0}: field 'L' has dtype torch.float64, expected torch.float32"),
    "int_ready": (_replace_block_field(1, "0", "ready", lambda t: t.long()),
                  r"Kronecker block 0 \(15x8\) of param_groups\[0\]\['params'\]\[1\] \(shape \(30, 8\)\): "
                  r"field 'ready' has dtype torch.int64, expected torch.bool"),
    "meta_momentum": (_replace_block_field(2, "0", "momentum", lambda t: t.to("meta")),
                      rf"{B2}: field 'momentum' is on the meta device, which holds no values; expected a tensor on "
                      r"the CPU or an accelerator"),
    "list_lam_R": (_replace_block_field(0, "0", "lam_R", lambda t: t.tolist()),
                   rf"{B0}: field 'lam_R' is a list \(\[.*\.\.\.\), expected a torch.float32 tensor"),
    # AdamW-side entries
    "string_exp_avg": (_adamw("exp_avg", lambda t, g: "not a tensor"),
                       rf"{ADAMW}: 'exp_avg' is a str \('not a tensor'\); expected a floating-point tensor"),
    "number_exp_avg": (_adamw("exp_avg", lambda t, g: 0.5),
                       rf"{ADAMW}: 'exp_avg' is a float \(0.5\); expected a floating-point tensor"),
    "nan_exp_avg": (_adamw("exp_avg", _with_nan),
                    rf"{ADAMW}: 'exp_avg' holds 1 NaN of its 9 entries; the AdamW moments must be finite"),
    "negative_exp_avg_sq": (_adamw("exp_avg_sq", _with_negative),
                            rf"{ADAMW}: 'exp_avg_sq' holds 1 negative entry \(the smallest -[0-9.]+\); it is a "
                            r"running mean of squared gradients and must be >= 0"),
    "int_exp_avg": (_adamw("exp_avg", lambda t, g: t.long()),
                    rf"{ADAMW}: 'exp_avg' has dtype torch.int64; expected a floating-point tensor \(it is kept in "
                    r"float32\)"),
    "meta_exp_avg_sq": (_adamw("exp_avg_sq", lambda t, g: t.to("meta")),
                        rf"{ADAMW}: 'exp_avg_sq' is on the meta device, which holds no values; expected a tensor on "
                        r"the CPU or an accelerator"),
    "wrong_shape_exp_avg": (_adamw("exp_avg", lambda t, g: t[:3].clone()),
                            rf"{ADAMW}: 'exp_avg' has shape \(3,\); expected the parameter's shape \(9,\) or this "
                            r"rank's part of it \(9,\)"),
    "fractional_adamw_step": (_adamw("step", lambda t, g: t + 0.5),
                              rf"{ADAMW}: 'step' is 3.5; it counts the steps taken and must be a whole number >= 0"),
    "negative_adamw_step": (_adamw("step", lambda t, g: -t),
                            rf"{ADAMW}: 'step' is -3.0; it counts the steps taken and must be a whole number >= 0"),
    "inf_adamw_step": (_adamw("step", lambda t, g: t * INF),
                       rf"{ADAMW}: 'step' is inf; it counts the steps taken and must be a whole number >= 0"),
    "unknown_adamw_key": (_unknown_adamw_key, rf"{ADAMW}: unknown key 'momentum_buffer'; {ADAMW_HOLDS}"),
    "missing_adamw_key": (_missing_adamw_key,
                          rf"{ADAMW}: key 'exp_avg_sq' is missing \(found \['step', 'exp_avg'\]\); {ADAMW_HOLDS}"),
    # the dict's layout and the groups' settings
    "not_a_dict": (lambda sd, gen: list(sd.items()),
                   r"a state dict is a dict with 'state' and 'param_groups', got a list \(.*\)"),
    "no_state_key": (_without("state"), r"the state dict has no 'state' key \(its keys: \['param_groups'\]\)"),
    "no_param_groups_key": (_without("param_groups"),
                            r"the state dict has no 'param_groups' key \(its keys: \['state'\]\)"),
    "group_without_params": (_group(lambda g: g.pop("params")),
                             r"param group 0: expected a dict with a list 'params', got a dict \(.*\)"),
    "group_with_fewer_params": (_group(_drop_last_param),
                                r"param group 0 has 3 params in the state dict and 4 in this optimizer"),
    "negative_lr": (_group(lambda g: g.update(lr=-1.0)),
                    r"the settings of param group 0: lr=-1.0 is not allowed: lr must be a finite number >= 0"),
    # a failure no check foresaw is refused the same way
    "unhashable_param_key": (_group(_unhashable_param_key), r"reading it failed: TypeError: unhashable type: 'list'"),
}


@pytest.mark.parametrize("case", list(POISONS))
def test_poisoned_state_dict_is_refused_and_changes_nothing(gen, case):
    poison, detail = POISONS[case]
    params = _params(gen)
    twins = _twins(params)
    grads = _grads(gen, params, TRAINED + MORE)
    opt, ref = BregTop(params, **SETTINGS), BregTop(twins, **SETTINGS)
    _run(opt, params, grads[:TRAINED])
    _run(ref, twins, grads[:TRAINED])
    before, groups = _snapshot(opt)
    bad = poison(copy.deepcopy(opt.state_dict()), gen)

    with pytest.raises(ValueError) as caught:
        opt.load_state_dict(bad)
    want = rf"cannot load the optimizer state: {detail}; nothing was loaded"
    assert re.fullmatch(want, str(caught.value)), f"{caught.value}\n  does not match\n{want}"

    after, groups_after = _snapshot(opt)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) and after[k].dtype == v.dtype for k, v in before.items())
    assert groups_after == groups
    _run(opt, params, grads[TRAINED:])  # steps on as if the load had never been tried
    _run(ref, twins, grads[TRAINED:])
    assert all(torch.equal(p, t) for p, t in zip(params, twins))
    _assert_same_state(opt, ref)


def test_a_setting_of_the_wrong_type_is_refused_as_an_argument_type_error(gen):
    """The type a bad setting raises at construction, also when it comes from a state dict."""
    opt = BregTop(_params(gen), **SETTINGS)
    bad = copy.deepcopy(opt.state_dict())
    bad["param_groups"][0]["method"] = 3
    with pytest.raises(ArgumentTypeError, match=r"^cannot load the optimizer state: the settings of param group 0: "
                       r"method=3 is not allowed"):
        opt.load_state_dict(bad)


# ------------------------------------------------------------------------- good loads
def _before_any_step(sd: dict[str, Any]) -> dict[str, Any]:
    return sd


def _empty_adamw_entry(sd: dict[str, Any]) -> dict[str, Any]:
    sd["state"][3] = {}  # torch's form of a parameter that has not stepped
    return sd


def _without_ready(sd: dict[str, Any]) -> dict[str, Any]:
    for entry in sd["state"].values():  # saved before the field existed
        for block in entry.get("kron", {}).values():
            del block["ready"]
    return sd


def _float64_moments(sd: dict[str, Any]) -> dict[str, Any]:
    entry = sd["state"][3]
    entry.update({k: v.double() for k, v in entry.items()})  # exact in float32, where they are kept
    return sd


GOOD: dict[str, tuple[int, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "before_any_step": (0, _before_any_step),
    "empty_adamw_entry": (0, _empty_adamw_entry),
    "after_steps": (TRAINED, _before_any_step),
    "without_ready_field": (TRAINED, _without_ready),
    "float64_adamw_state": (TRAINED, _float64_moments),
}


@pytest.mark.parametrize("case", list(GOOD))
def test_good_state_dict_loads_and_continues_identically(gen, case):
    trained, edit = GOOD[case]
    params = _params(gen)
    grads = _grads(gen, params, trained + MORE + 1)
    opt = BregTop(params, **SETTINGS)
    _run(opt, params, grads[:trained])
    saved = edit(copy.deepcopy(opt.state_dict()))
    twins = _twins(params)
    resumed = BregTop(twins, **{**SETTINGS, "lr": 0.5})  # the saved settings replace these
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["lr"] == SETTINGS["lr"]
    _run(opt, params, grads[trained:])
    _run(resumed, twins, grads[trained:])
    assert all(torch.equal(p, t) for p, t in zip(params, twins))
    _assert_same_state(resumed, opt)


# ------------------------------------------------------------------- on 2 processes
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, list[str]]:
    """Every scenario of ``load_scenarios`` on 2 gloo ranks, in one spawn; a hang fails (timeout)."""
    return run_scenarios(2, list(SCENARIOS), tmp_path_factory.mktemp("load"), "load_scenarios", timeout_s=120)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_on_two_ranks(two_ranks, scenario):
    failures = [f"{scenario}, rank {r}:\n{v}" for r, v in enumerate(two_ranks[scenario]) if v != "ok"]
    assert not failures, "\n".join(failures)
