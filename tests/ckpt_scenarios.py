"""Checkpoint scenarios for ``dist_harness``: a run saved at one world size through a user's
path, continued at another, must equal the uninterrupted single-process run.

``save_*`` scenarios train SAVE_AT steps and write under ``workdir.parent / "ckpt"``;
``resume_*`` scenarios (run later, at any world size) load from there, train to STEPS and
compare with the single-process reference. Every rank feeds the same batches (see
``dist_scenarios``), so the engines' gradients equal the single-process ones.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from state_tensors import kron_blocks
from torch import nn

from bregtop_dist import BregTop, IncompleteStateDictWarning, param_groups

from dist_scenarios import FP32_TOL, SETTINGS, STEPS, Net, assert_close, fsdp2, full, reference, train

SAVE_AT = 4  # one refresh period (precondition_frequency=3) and a step into the next


def _ckpt(workdir: Path, name: str) -> Path:
    return workdir.parent / "ckpt" / name


def _build(engine: str, world: int, weights: dict[str, torch.Tensor] | None = None) -> tuple[nn.Module, nn.Module, BregTop]:
    """(model, what to call, optimizer) for ``engine``: ``ddp``, ``fsdp2``."""
    model = Net()
    if weights is not None:
        model.load_state_dict(weights)
    if engine == "fsdp2":
        fsdp2(model, world)
        return model, model, BregTop(param_groups(model), **SETTINGS)
    from torch.nn.parallel import DistributedDataParallel

    return model, DistributedDataParallel(model), BregTop(param_groups(model), **SETTINGS)


def _full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: full(v.detach()).clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ torch.distributed.checkpoint
def _save_dcp(engine: str, rank: int, world: int, workdir: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model, call, opt = _build(engine, world)
    train(call, opt, range(SAVE_AT))
    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(_ckpt(workdir, f"dcp-{engine}")))


def _resume_dcp(engine: str, rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, call, opt = _build(engine, world)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(_ckpt(workdir, f"dcp-{engine}")))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    train(call, opt, range(SAVE_AT, STEPS))
    assert_close(model, reference(single), FP32_TOL)


def save_dcp_fsdp2(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _save_dcp("fsdp2", rank, world, workdir)


def save_dcp_ddp(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _save_dcp("ddp", rank, world, workdir)


def resume_dcp_fsdp2(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _resume_dcp("fsdp2", rank, world, single, workdir)


def resume_dcp_ddp(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _resume_dcp("ddp", rank, world, single, workdir)


# --------------------------------------------------- BregTop's own state_dict, written by rank 0
def _save_rank0(engine: str, consolidate: bool, rank: int, world: int, workdir: Path) -> None:
    model, call, opt = _build(engine, world)
    train(call, opt, range(SAVE_AT))
    if consolidate:
        opt.consolidate_state_dict(to=0)
    weights = _full_weights(model)
    state = opt.state_dict()  # rank 0 alone writes it, as Accelerate and the Trainer do
    if rank == 0:
        path = _ckpt(workdir, f"rank0-{engine}-{'consolidated' if consolidate else 'plain'}.pt")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"model": weights, "optim": state}, path)
    dist.barrier()


def _load_rank0(engine: str, consolidate: bool, world: int, workdir: Path) -> tuple[nn.Module, nn.Module, BregTop]:
    path = _ckpt(workdir, f"rank0-{engine}-{'consolidated' if consolidate else 'plain'}.pt")
    saved = torch.load(path, weights_only=True)
    model, call, opt = _build(engine, world, saved["model"])
    opt.load_state_dict(saved["optim"])
    return model, call, opt


def save_rank0_consolidated_ddp(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _save_rank0("ddp", True, rank, world, workdir)


def save_rank0_consolidated_fsdp2(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _save_rank0("fsdp2", True, rank, world, workdir)


def save_rank0_plain_ddp(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _save_rank0("ddp", False, rank, world, workdir)


def resume_rank0_consolidated_ddp(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    model, call, opt = _load_rank0("ddp", True, world, workdir)
    train(call, opt, range(SAVE_AT, STEPS))
    assert_close(model, reference(single), FP32_TOL)


def resume_rank0_consolidated_fsdp2(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    model, call, opt = _load_rank0("fsdp2", True, world, workdir)
    train(call, opt, range(SAVE_AT, STEPS))
    assert_close(model, reference(single), FP32_TOL)


def resume_rank0_plain_is_refused_on_every_rank(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    """Rank 0's dict without consolidation lacks rank 1's blocks: every rank refuses it, naming
    a parameter, and the optimizer is left as it was."""
    path = _ckpt(workdir, "rank0-ddp-plain.pt")
    saved = torch.load(path, weights_only=True)
    model, call, opt = _build("ddp", world, saved["model"])
    try:
        opt.load_state_dict(saved["optim"])
    except ValueError as err:
        text = str(err)
        assert "Kronecker block" in text and "of " in text and "nothing was loaded" in text, text
        assert "consolidate_state_dict()" in text, text
    else:
        raise AssertionError(f"rank {rank}: a state dict without rank 1's blocks was accepted")
    dist.barrier()


# ---------------------------------------------------------------------------- DeepSpeed ZeRO
def _ds_run(engine, steps: range) -> None:  # noqa: ANN001
    from dist_scenarios import batch

    for step in steps:
        loss = engine(batch(step))
        engine.backward(loss)
        engine.step()


def _save_zero(stage: int, rank: int, world: int, workdir: Path) -> None:
    from bregtop_dist.integrations.deepspeed import initialize

    from dist_scenarios import _ds_config

    engine, _, _, _ = initialize(model=Net(), config=_ds_config(stage))
    _ds_run(engine, range(SAVE_AT))
    engine.save_checkpoint(str(_ckpt(workdir, f"zero{stage}")), tag="saved")


def _resume_zero(stage: int, rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    """At the saved world size: the single-process run. At another: refused on every rank with
    a message that says what to do (ZeRO's partitions are per rank)."""
    import deepspeed

    from bregtop_dist.integrations.deepspeed import initialize, load_checkpoint

    from dist_scenarios import _ds_config

    model = Net(seed=5)
    engine, _, _, _ = initialize(model=model, config=_ds_config(stage))
    try:
        load_checkpoint(engine, _ckpt(workdir, f"zero{stage}"), tag="saved")
    except ValueError as err:
        assert world != SAVED_WORLD, f"ZeRO-{stage} at the saved world size: {err!r}"
        assert f"saved by {SAVED_WORLD} data-parallel ranks and this run has {world}" in str(err), str(err)
        return
    assert world == SAVED_WORLD, f"ZeRO-{stage}: a {SAVED_WORLD}-rank checkpoint loaded at {world} ranks"
    _ds_run(engine, range(SAVE_AT, STEPS))
    with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
        got = {k: v.detach().clone() for k, v in model.named_parameters()}
    want = reference(single)
    for name, value in got.items():
        rel = float((value - want[name]).abs().max() / want[name].abs().max())
        assert rel <= FP32_TOL, f"ZeRO-{stage} {name}: max relative difference {rel:.3g}"


SAVED_WORLD = 2


def save_zero2(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _save_zero(2, rank, world, workdir)


def save_zero3(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _save_zero(3, rank, world, workdir)


def resume_zero2(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _resume_zero(2, rank, world, single, workdir)


def resume_zero3(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _resume_zero(3, rank, world, single, workdir)


# ------------------------------------------------- the warning of a state dict one rank cannot resume
FIXES = (
    "opt.consolidate_state_dict(to=0) on every rank",
    "bregtop_dist.integrations.accelerate.consolidate_on_save(accelerator, optimizer)",
    "callbacks=[bregtop_dist.integrations.hf.ConsolidateOnSave()]",
    "torch.distributed.checkpoint (get_state_dict or get_optimizer_state_dict, then dcp.save: every rank saves "
    "its own part) needs none of this",
)
"""What the warning must name: the fix for each saver, and that DCP needs none."""


def incomplete_warnings(call: Callable[[], object]) -> list[str]:
    """The messages of the IncompleteStateDictWarnings that ``call()`` gives (every one shown)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if issubclass(w.category, IncompleteStateDictWarning)]


def state_dict_warns_until_consolidated(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    """DDP and FSDP2 after 2 steps: ``state_dict()`` warns once on each rank, naming every fix;
    torch.distributed.checkpoint's save does not warn; after consolidate_state_dict(to=0) no rank
    warns (Accelerate takes every rank's dict) and rank 0's dict holds every block; the next step
    drops the gathered blocks and the warning is back. Blocks shared among one rank: no warning.
    Every collective runs before any check (a failed check must not leave the other rank waiting)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, get_state_dict

    alone = BregTop(param_groups(Net()), process_group=single, **SETTINGS)  # every block, at any step
    problems = []
    for engine in ("ddp", "fsdp2"):
        model, call, opt = _build(engine, world)
        train(call, opt, range(2))
        plain = incomplete_warnings(opt.state_dict)

        def dcp_save(model: nn.Module = model, opt: BregTop = opt, engine: str = engine) -> None:
            msd, osd = get_state_dict(model, opt)
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(workdir / f"warning-dcp-{engine}"))

        sharded = incomplete_warnings(dcp_save) + incomplete_warnings(partial(get_optimizer_state_dict, model, opt))
        opt.consolidate_state_dict(to=0)
        consolidated = incomplete_warnings(opt.state_dict)
        blocks = len(kron_blocks(opt.state_dict()))
        train(call, opt, range(2, 3))
        after_step = incomplete_warnings(opt.state_dict)

        if len(plain) != 1 or f"on rank {rank} of {world} " not in plain[0]:
            problems.append(f"{engine}: without consolidation {len(plain)} warnings: {plain}")
        missing = [fix for fix in FIXES if plain and fix not in plain[0]]
        if missing:
            problems.append(f"{engine}: the warning does not name {missing}: {plain[0]}")
        if sharded:
            problems.append(f"{engine}: torch.distributed.checkpoint's save warned: {sharded}")
        if consolidated:
            problems.append(f"{engine}: warned after consolidate_state_dict(to=0): {consolidated}")
        if rank == 0 and blocks != len(kron_blocks(alone.state_dict())):
            problems.append(f"{engine}: rank 0 holds {blocks} blocks after consolidation")
        if len(after_step) != 1:
            problems.append(f"{engine}: after the next step {len(after_step)} warnings")
    alone_warned = incomplete_warnings(alone.state_dict)
    if alone_warned:
        problems.append(f"blocks shared among one rank: warned {alone_warned}")
    assert not problems, "\n".join(problems)


def accelerate_save_state_warns_without_consolidate_on_save(
    rank: int, world: int, single: dist.ProcessGroup, workdir: Path,
) -> None:
    """Accelerate (DDP on gloo): ``prepare`` (which round-trips every rank's own dict) does not
    warn; ``save_state`` (every rank takes a dict, the main process writes its own) warns on
    every rank without consolidate_on_save, and on none with it."""
    from accelerate import Accelerator

    from bregtop_dist.integrations.accelerate import consolidate_on_save

    accelerator = Accelerator(cpu=True)
    model = Net()
    prepared: list[nn.Module | BregTop] = []
    at_prepare = incomplete_warnings(lambda: prepared.extend(accelerator.prepare(model, BregTop(param_groups(model), **SETTINGS))))
    wrapped, opt = prepared
    train(wrapped, opt, range(2))
    without = incomplete_warnings(lambda: accelerator.save_state(str(workdir / "accelerate-plain")))
    consolidate_on_save(accelerator, opt)
    with_hook = incomplete_warnings(lambda: accelerator.save_state(str(workdir / "accelerate-consolidated")))
    accelerator.wait_for_everyone()
    assert not at_prepare, f"prepare warned: {at_prepare}"
    assert len(without) == 1 and "consolidate_on_save(accelerator, optimizer)" in without[0], without
    assert not with_hook, f"save_state with consolidate_on_save warned: {with_hook}"


WARNING_SCENARIOS: dict[str, Callable[[int, int, dist.ProcessGroup, Path], None]] = {
    f.__name__: f for f in (state_dict_warns_until_consolidated, accelerate_save_state_warns_without_consolidate_on_save)
}


CKPT_SAVE: dict[str, Callable[[int, int, dist.ProcessGroup, Path], None]] = {
    f.__name__: f
    for f in (save_dcp_fsdp2, save_dcp_ddp, save_rank0_consolidated_ddp, save_rank0_consolidated_fsdp2,
              save_rank0_plain_ddp, save_zero2, save_zero3)
}
CKPT_RESUME: dict[str, Callable[[int, int, dist.ProcessGroup, Path], None]] = {
    f.__name__: f
    for f in (resume_dcp_fsdp2, resume_dcp_ddp, resume_rank0_consolidated_ddp, resume_rank0_consolidated_fsdp2,
              resume_rank0_plain_is_refused_on_every_rank, resume_zero2, resume_zero3)
}
SCENARIOS = {**CKPT_SAVE, **CKPT_RESUME, **WARNING_SCENARIOS}
