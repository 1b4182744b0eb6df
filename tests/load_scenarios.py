"""Load scenarios for ``dist_harness``: a state dict that is bad on one rank only.

Each rank trains a model and a twin in lockstep, takes its own state dict (its own Kronecker
blocks: loading it back at the same world size needs nothing from the other ranks), spoils it
on one rank only and loads it. Every rank must raise the same ValueError, keep its state
bit-identical, and then step on exactly as the twin, which never saw the bad load. Every
scenario runs its collectives (the load, gathering the error texts, the further steps) before
it asserts anything, so that the scenarios after a failing one still line up.

Imported by the spawned processes (and by the test, for the names): no work at import time.
"""

from __future__ import annotations

import copy
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from state_tensors import kron_blocks, state_tensors
from torch import nn

from bregtop_dist import BregTop, IncompleteStateDictWarning, param_groups

from dist_scenarios import SETTINGS, Net, fsdp2, train

SAVE_AT = 3
MORE = range(SAVE_AT, SAVE_AT + 2)
REFUSED = r"cannot load the optimizer state: {}; nothing was loaded"
BLOCK = r"Kronecker block \d+ \(\d+x\d+\) of [a-z]+\.weight"

Poison = Callable[[dict[str, Any], int, int], dict[str, Any]]


def _build(engine: str, world: int) -> tuple[nn.Module, nn.Module, BregTop]:
    """(model, what to call, optimizer) for ``engine``: ``ddp`` or ``fsdp2``."""
    model = Net()
    if engine == "fsdp2":
        fsdp2(model, world)
        return model, model, BregTop(param_groups(model), **SETTINGS)
    from torch.nn.parallel import DistributedDataParallel

    return model, DistributedDataParallel(model), BregTop(param_groups(model), **SETTINGS)


def _own_state_dict(opt: BregTop) -> dict[str, Any]:
    """This rank's state dict (its own blocks; the warning that it lacks the others' is expected)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", IncompleteStateDictWarning)
        return opt.state_dict()


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t  # type: ignore[no-any-return]


def _snapshot(opt: BregTop) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """Copies of this rank's state tensors (DTensors as their local parts) and group settings."""
    sd = _own_state_dict(opt)
    groups = [{k: v for k, v in g.items() if k != "params"} for g in sd["param_groups"]]
    return {k: _local(v).clone() for k, v in state_tensors(sd).items()}, copy.deepcopy(groups)


def _check_refused(engine: str, rank: int, world: int, poison: Poison, expected: str) -> None:
    """Load ``poison``'s state dict on every rank: every rank refuses it with the same text,
    matching ``expected``, changes nothing and steps on as the twin that never loaded it."""
    model, call, opt = _build(engine, world)
    twin, twin_call, twin_opt = _build(engine, world)
    train(call, opt, range(SAVE_AT))
    train(twin_call, twin_opt, range(SAVE_AT))
    before = _snapshot(opt)
    bad = poison(_own_state_dict(opt), rank, world)
    text = None
    try:
        opt.load_state_dict(bad)
    except ValueError as err:
        text = str(err)
    after = _snapshot(opt)
    texts: list[str | None] = [None] * world
    dist.all_gather_object(texts, text)
    train(call, opt, MORE)
    train(twin_call, twin_opt, MORE)

    assert text is not None, f"rank {rank} loaded the state dict"
    assert len(set(texts)) == 1, f"the ranks raised different errors: {texts}"
    assert re.fullmatch(expected, text), f"{text!r} does not match {expected!r}"
    assert after[0].keys() == before[0].keys()
    for key, value in before[0].items():
        assert torch.equal(after[0][key], value) and after[0][key].dtype == value.dtype, f"rank {rank}: {key} changed"
    assert after[1] == before[1], f"rank {rank}: the group settings changed"
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(_local(p.detach()), _local(q.detach())), f"rank {rank}: {name} differs from the twin's"


# ---------------------------------------------------------------------------- poisons
def _on_rank(which: int, spoil: Callable[[dict[str, Any]], None]) -> Poison:
    """A poison that spoils a copy of the state dict of rank ``which`` (-1: the last) only."""

    def poison(sd: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
        if rank != which % world:
            return sd
        bad = copy.deepcopy(sd)
        spoil(bad)
        return bad

    return poison


def _first_block(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    pid, index = next(iter(kron_blocks(sd)))
    return sd["state"][pid]["kron"][index]  # type: ignore[no-any-return]


def _nan_in_first_block(sd: dict[str, Any]) -> None:
    _first_block(sd)["L"].view(-1)[0] = float("nan")


def _meta_momentum_in_first_block(sd: dict[str, Any]) -> None:
    block = _first_block(sd)
    block["momentum"] = block["momentum"].to("meta")


def _unhashable_param_keys(sd: dict[str, Any]) -> None:
    group = sd["param_groups"][0]
    group["params"] = [[key] for key in group["params"]]


def _nan_in_sharded_moment(sd: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """On rank 1, NaN in the local part of a DTensor ``exp_avg`` (FSDP2's AdamW side)."""
    if rank != 1:
        return sd
    from torch.distributed.tensor import DTensor

    state = {k: dict(v) for k, v in sd["state"].items()}
    for entry in state.values():
        value = entry.get("exp_avg")
        if isinstance(value, DTensor) and value.to_local().numel():
            local = value.to_local().clone()
            local.view(-1)[0] = float("nan")
            entry["exp_avg"] = DTensor.from_local(local, value.device_mesh, value.placements, run_check=False,
                                                  shape=value.shape, stride=value.stride())
            break
    return {**sd, "state": state}


def _dtensor_field_on_rank_1(sd: dict[str, Any], rank: int, world: int) -> dict[str, Any]:
    """On rank 1, a block's ``L`` as a replicated DTensor (the mesh is made on every rank)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate

    mesh = init_device_mesh("cpu", (world,))
    if rank != 1:
        return sd
    bad = copy.deepcopy(sd)
    block = _first_block(bad)
    block["L"] = DTensor.from_local(block["L"], mesh, [Replicate()], run_check=False)
    return bad


# -------------------------------------------------------------------------- scenarios
def bad_setting_on_last_rank(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _check_refused("ddp", rank, world, _on_rank(-1, lambda sd: sd["param_groups"][0].update(lr=-1)),
                   REFUSED.format(r"the settings of param group 0: lr=-1 is not allowed: lr must be a finite "
                                  r"number >= 0"))


def nan_in_a_block_of_rank_1(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _check_refused("ddp", rank, world, _on_rank(1, _nan_in_first_block),
                   REFUSED.format(rf"{BLOCK}: field 'L' holds 1 NaN of its \d+ entries; a block's float fields "
                                  "must be finite"))


def meta_field_on_rank_1(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _check_refused("ddp", rank, world, _on_rank(1, _meta_momentum_in_first_block),
                   REFUSED.format(rf"{BLOCK}: field 'momentum' is on the meta device, which holds no values; "
                                  "expected a tensor on the CPU or an accelerator"))


def dtensor_field_on_rank_1(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _check_refused("ddp", rank, world, _dtensor_field_on_rank_1,
                   REFUSED.format(rf"{BLOCK}: field 'L' is a DTensor; a block's fields are plain tensors, as "
                                  r"state_dict\(\) writes them"))


def no_state_key_on_rank_0(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _check_refused("ddp", rank, world, _on_rank(0, lambda sd: sd.pop("state")),
                   REFUSED.format(r"the state dict has no 'state' key \(its keys: \['param_groups'\]\)"))


def unforeseen_failure_on_rank_1(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _check_refused("ddp", rank, world, _on_rank(1, _unhashable_param_keys),
                   REFUSED.format(rf"rank 1 of {world} failed while reading it: TypeError: unhashable type: 'list'"))


def nan_in_sharded_adamw_moment_on_rank_1(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _check_refused("fsdp2", rank, world, _nan_in_sharded_moment,
                   REFUSED.format(r"the AdamW-side state of [a-z]+\.[a-z]+: 'exp_avg' holds 1 NaN of its \d+ entries; "
                                  "the AdamW moments must be finite"))


def _round_trip(engine: str, world: int) -> None:
    """Every rank loads its own state dict back and steps on exactly as the twin."""
    model, call, opt = _build(engine, world)
    twin, twin_call, twin_opt = _build(engine, world)
    train(call, opt, range(SAVE_AT))
    train(twin_call, twin_opt, range(SAVE_AT))
    opt.load_state_dict(_own_state_dict(opt))
    train(call, opt, MORE)
    train(twin_call, twin_opt, MORE)
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(_local(p.detach()), _local(q.detach())), f"{name} differs from the twin's"


def good_state_dict_round_trip_ddp(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _round_trip("ddp", world)


def good_state_dict_round_trip_fsdp2(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _round_trip("fsdp2", world)


SCENARIOS: dict[str, Callable[[int, int, dist.ProcessGroup, Path], None]] = {
    f.__name__: f
    for f in (bad_setting_on_last_rank, nan_in_a_block_of_rank_1, meta_field_on_rank_1, dtensor_field_on_rank_1,
              no_state_key_on_rank_0, unforeseen_failure_on_rank_1, nan_in_sharded_adamw_moment_on_rank_1, good_state_dict_round_trip_ddp,
              good_state_dict_round_trip_fsdp2)
}
