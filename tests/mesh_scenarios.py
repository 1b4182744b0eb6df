"""Scenarios on device meshes of two dimensions (4 gloo processes: HSDP 2 x 2, FSDP2 over
tensor parallelism 2 x 2; and a 3-D one, HSDP over tensor parallelism) and tensor
parallelism alone (2 processes), each against the
one-process run of the same optimizer (run on every rank in a one-rank group).

The model is issue 27's: a residual MLP of two blocks (Linear 32-48-32, and 32-46-32 so that
data-parallel shards of tensor-parallel ones come out uneven), tanh, then a LayerNorm (on the AdamW side, replicated across the
tensor-parallel ranks). Every rank feeds the same batch, so data-parallel averages are the
one-process gradient exactly; tensor parallelism's partial sums round differently, so the
one-process run is fed the meshed run's gradients (gathered) in lockstep: what is compared is
the optimizer's distributed step, not how far a method carries the forward pass's rounding.
torch's AdamW, run the same way, shows what the layouts' own arithmetic allows.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bregtop_dist import BregTop, param_groups

SETTINGS: dict[str, Any] = dict(lr=0.02, precondition_frequency=3, max_precond_dim=16, weight_decay=0.01)
METHODS = ("kl", "vn-v2", "bregtop-vn-v2")  # one row of each family
STEPS = 7  # more than two refresh periods, staggered
TOL = 1e-5


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(32, hidden)
        self.down = nn.Linear(hidden, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.tanh(self.up(x)))


class Residual(nn.Module):
    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block(48), Block(46)])
        self.norm = nn.LayerNorm(32)
        self.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


def batch(step: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2000 + step)
    return torch.randn(8, 32, generator=g).to(dtype), torch.randn(8, 32, generator=g).to(dtype)


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # type: ignore[no-any-return]


def hsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    for block in model.blocks:  # type: ignore[union-attr]
        fully_shard(block.up, mesh=mesh)
        fully_shard(block.down, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _tensor_parallel(model: nn.Module, tp_mesh: Any) -> None:
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    for block in model.blocks:  # type: ignore[union-attr]
        parallelize_module(block, tp_mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})


def fsdp_tp(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    _tensor_parallel(model, mesh["tp"])
    for block in model.blocks:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model


def hsdp_tp(model: nn.Module) -> nn.Module:
    """A 3-D mesh: HSDP ("replicate", "shard") over tensor parallelism; on 4 ranks the shard
    dimension has one rank, which still makes the parameters' meshes 2-D slices of a 3-D root."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 1, 2), mesh_dim_names=("replicate", "shard", "tp"))
    _tensor_parallel(model, mesh["tp"])
    for block in model.blocks:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh["replicate", "shard"])
    fully_shard(model, mesh=mesh["replicate", "shard"])
    return model


def fsdp(model: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:  # type: ignore[union-attr]
        fully_shard(block)
    fully_shard(model)
    return model


def tp(model: nn.Module) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh

    _tensor_parallel(model, init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",)))
    return model


def full_gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient (a collective under a mesh: every rank calls it)."""
    return {k: full(v.grad).detach().clone() for k, v in model.named_parameters()}  # type: ignore[arg-type]


def step_fed(reference: nn.Module, opt: torch.optim.Optimizer, gradients: dict[str, torch.Tensor]) -> None:
    """One step of the one-process ``reference`` on gradients computed elsewhere."""
    for k, v in reference.named_parameters():
        v.grad = gradients[k].to(v.dtype).clone()
    opt.step()


def lockstep(model: nn.Module, opt: torch.optim.Optimizer, reference: nn.Module | None,
             ref_opt: torch.optim.Optimizer | None, steps: range, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Train ``model`` over ``steps`` and step ``reference`` (if any) on its gradients; the
    whole gradients, keyed "step/name"."""
    fed = {}
    for step in steps:
        x, y = batch(step, dtype)
        opt.zero_grad(set_to_none=True)
        (model(x).float() - y.float()).square().mean().backward()
        gradients = full_gradients(model)
        opt.step()
        if reference is not None and ref_opt is not None:
            step_fed(reference, ref_opt, gradients)
        fed.update({f"{step}/{k}": g for k, g in gradients.items()})
    return fed


def largest_difference(model: nn.Module, reference: nn.Module) -> float:
    """max |a - b| / max |b| over parameters, ``model`` gathered whole."""
    got = {k: full(v.detach()).float() for k, v in model.named_parameters()}
    return max(float((got[k] - v.detach().float()).abs().max() / v.detach().float().abs().max())
               for k, v in reference.named_parameters())


def relative_difference(make: Callable[[nn.Module], nn.Module], optimizer: Callable[[nn.Module, dist.ProcessGroup | None], torch.optim.Optimizer],
                        dtype: torch.dtype, single: dist.ProcessGroup) -> float:
    """Largest relative difference between ``make``'s run and the one-process run of the
    same optimizer fed the same gradients."""
    model = make(Residual(dtype))
    reference = Residual(dtype)
    lockstep(model, optimizer(model, None), reference, optimizer(reference, single), range(STEPS), dtype)
    return largest_difference(model, reference)


def _bregtop(method: str) -> Callable[[nn.Module, dist.ProcessGroup | None], torch.optim.Optimizer]:
    return lambda model, pg: BregTop(param_groups(model), process_group=pg, method=method, **SETTINGS)


def _adamw(model: nn.Module, pg: dist.ProcessGroup | None) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=SETTINGS["lr"], weight_decay=SETTINGS["weight_decay"])


def _equals_single(make: Callable[[nn.Module], nn.Module], dtype: torch.dtype) -> Callable[..., None]:
    def scenario(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
        engine = relative_difference(make, _adamw, dtype, single)  # what the layout's own arithmetic shows
        found = {m: relative_difference(make, _bregtop(m), dtype, single) for m in METHODS}
        if rank == 0:  # the figures, for the test's report
            (workdir / f"{make.__name__}_{dtype}.json").write_text(json.dumps({"adamw": engine, **found}))
        bad = {m: f"{d:.3g}" for m, d in found.items() if not d <= TOL}
        assert not bad, f"{make.__name__} {dtype}: relative difference {bad} > {TOL:.3g} (torch AdamW: {engine:.3g})"

    return scenario


FOUR_RANKS: dict[str, Callable[[int, int, dist.ProcessGroup, Path], None]] = {
    f"{make.__name__}_{name}_equals_single": _equals_single(make, dtype)
    for make in (hsdp, fsdp_tp)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
}
FOUR_RANKS["hsdp_tp_fp32_equals_single"] = _equals_single(hsdp_tp, torch.float32)
TWO_RANKS: dict[str, Callable[[int, int, dist.ProcessGroup, Path], None]] = {
    f"{make.__name__}_{name}_equals_single": _equals_single(make, dtype)
    for make in (tp,)
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))
}
SCENARIOS = {**FOUR_RANKS, **TWO_RANKS}


def unsupported_placements_are_refused_at_construction(rank: int, world: int, single: dist.ProcessGroup,
                                                      workdir: Path) -> None:
    """``Shard(2)`` of a 3-D parameter and ``Partial()`` are refused when BregTop is built,
    naming the parameter, its mesh and its placements, and what is supported."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    kernel = nn.Parameter(distribute_tensor(torch.randn(4, 6, 8), mesh, [Replicate(), Shard(2)]))
    partial = nn.Parameter(DTensor.from_local(torch.randn(4, 6), mesh, [Partial(), Replicate()], run_check=False))
    for p, placements in ((kernel, r"\(Replicate\(\), Shard\(dim=2\)\)"), (partial, r"\(Partial\(sum\), Replicate\(\)\)")):
        try:
            BregTop([{"params": [p], "param_names": ["layer.weight"]}], method="kl")
        except ValueError as err:
            import re

            want = (rf"layer\.weight: mesh shape \(2, 2\), dims \('dp', 'tp'\), placements {placements}: BregTop "
                    r"supports Replicate\(\), Shard\(0\) and Shard\(1\)")
            assert re.search(want, str(err)), str(err)
        else:
            raise AssertionError(f"BregTop took a parameter placed {p.placements}")


FOUR_RANKS[unsupported_placements_are_refused_at_construction.__name__] = unsupported_placements_are_refused_at_construction
SCENARIOS[unsupported_placements_are_refused_at_construction.__name__] = unsupported_placements_are_refused_at_construction


# ----------------------------------------------------------------- checkpoints on meshes
SAVE_AT = 4  # a refresh period and a step into the next
CKPT_METHOD = "bregtop-vn-v2"


def _ckpt_optimizers() -> dict[str, Callable[[nn.Module, dist.ProcessGroup | None], torch.optim.Optimizer]]:
    """BregTop, and torch's AdamW to measure what the layouts' own rounding allows."""
    return {"bregtop": _bregtop(CKPT_METHOD), "adamw": _adamw}


def _checkpoint(make_name: str, which: str, workdir: Path) -> Path:
    return workdir.parent / "ckpt" / f"{make_name}-{which}"


def _save(make: Callable[[nn.Module], nn.Module], workdir: Path) -> None:
    """Train on ``make``'s layout to SAVE_AT and save through DCP, with the gradients it
    trained on (for the one-process reference to replay)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    for which, optimizer in _ckpt_optimizers().items():
        model = make(Residual(torch.float32))
        opt = optimizer(model, None)
        fed = lockstep(model, opt, None, None, range(SAVE_AT), torch.float32)
        msd, osd = get_state_dict(model, opt)
        where = _checkpoint(make.__name__, which, workdir)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(where))
        if dist.get_rank() == 0:
            torch.save(fed, where.with_name(where.name + "-gradients.pt"))


def _one_process(model: nn.Module) -> nn.Module:
    return model


def _resume(saved_by: str, make: Callable[[nn.Module], nn.Module], single: dist.ProcessGroup, workdir: Path) -> None:
    """Load what ``saved_by`` wrote into the layout ``make`` builds and train on: the result
    equals an uninterrupted one-process run fed the same gradients (the saving run's, then the
    resumed run's) within 1e-5; torch's AdamW, run the same way, is reported beside it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    found = {}
    for which, optimizer in _ckpt_optimizers().items():
        model = make(Residual(torch.float32))
        opt = optimizer(model, None)
        msd, osd = get_state_dict(model, opt)
        where = _checkpoint(saved_by, which, workdir)
        dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(where))
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
        reference = Residual(torch.float32)
        ref_opt = optimizer(reference, single)
        saved = torch.load(where.with_name(where.name + "-gradients.pt"), weights_only=True)
        for step in range(SAVE_AT):
            step_fed(reference, ref_opt, {k: saved[f"{step}/{k}"] for k, _ in reference.named_parameters()})
        lockstep(model, opt, reference, ref_opt, range(SAVE_AT, STEPS), torch.float32)
        found[which] = largest_difference(model, reference)
    assert found["bregtop"] <= TOL, (
        f"saved by {saved_by}, resumed as {make.__name__}: relative difference {found['bregtop']:.3g} > {TOL:.3g} "
        f"(torch AdamW: {found['adamw']:.3g})"
    )
    if dist.get_rank() == 0:
        (workdir / f"resume_{saved_by}_as_{make.__name__}.json").write_text(json.dumps(found))


def _save_scenario(make: Callable[[nn.Module], nn.Module], rank: int, world: int, single: dist.ProcessGroup,
                   workdir: Path) -> None:
    _save(make, workdir)


def _resume_scenario(saved: str, rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _resume(saved, fsdp if world > 1 else _one_process, single, workdir)


MESH_SAVE: dict[str, Callable[[int, int, dist.ProcessGroup, Path], None]] = {
    f"save_{make.__name__}": partial(_save_scenario, make) for make in (hsdp, fsdp_tp)
}
MESH_RESUME: dict[str, Callable[[int, int, dist.ProcessGroup, Path], None]] = {
    f"resume_{saved}": partial(_resume_scenario, saved) for saved in ("hsdp", "fsdp_tp")
}
SCENARIOS.update({**MESH_SAVE, **MESH_RESUME})
