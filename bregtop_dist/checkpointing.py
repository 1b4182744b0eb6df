"""Checkpointing of BregTop: ``state_dict`` (torch's layout, world-size independent, see
:mod:`bregtop_dist.state_format`), ``consolidate_state_dict`` for savers that write one rank's
dict, and ``load_state_dict``, which reads, checks and builds everything, lets the ranks
agree, and only then changes the optimizer.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bregtop_dist.adamw import init_adamw_state
from bregtop_dist.block_plan import BlockStack, KronPlan, is_kron_shape
from bregtop_dist.config import BregTopConfig
from bregtop_dist.core.block_state import KronBlockState, describe_value
from bregtop_dist.core.validate import ArgumentTypeError
from bregtop_dist.distributed.layout import GroupPieces, Piece, is_dtensor
from bregtop_dist.distributed.source import Source
from bregtop_dist.kron_side import KronSide, register_blocks
from bregtop_dist.load_checks import LoadProblem, first_on_every_rank, unforeseen
from bregtop_dist.state_format import (
    KRON,
    IncompleteStateDictWarning,
    KronBlocks,
    adamw_entry_for_loading,
    adamw_for_saving,
    describe_block,
    incomplete_message,
    saved_block,
    taken_per_rank,
    to_cpu_block,
)


class Checkpointing:
    """The checkpoint methods of :class:`~bregtop_dist.optimizer.BregTop` (a mixin: it reads
    the optimizer's state, param groups, source and Kronecker side)."""

    state: Any
    param_groups: list[dict[str, Any]]
    _kron: KronSide
    _source: Source
    _gathered: bool  # consolidate_state_dict ran since the last step (rank `to` holds every block)
    _gathered_adamw: dict[Tensor, dict[str, Any]]  # and the full AdamW state of DTensor params

    def _agree_once(self) -> None:  # BregTop's: every rank has the same settings
        raise NotImplementedError

    def _plan_every_group(self) -> list[GroupPieces]:
        """Plans for every group (they are otherwise made by the first step that needs them),
        and the AdamW side's not-yet-stepped state; returns every group's pieces."""
        rank, world = self._source.world()
        views = self._source.pieces(True)
        for view in views:
            cfg = BregTopConfig.from_group(view.settings)
            kron = [s for s in view.pieces if is_kron_shape(s.shape, cfg.bregtop)]
            if kron:
                self._kron.plan(view, kron, cfg, rank, world, self.state)
            for s in view.pieces:
                if not is_kron_shape(s.shape, cfg.bregtop) and not self.state.get(s.param):
                    init_adamw_state(self.state[s.param], s.value)
        return views

    def _kron_entries(self) -> list[KronBlocks]:
        return [v[KRON] for v in self.state.values() if isinstance(v.get(KRON), KronBlocks)]

    def _drop_gathered(self) -> None:
        if self._gathered:
            for blocks in self._kron_entries():
                blocks.gathered.clear()
            self._gathered_adamw = {}
            self._gathered = False

    def state_dict(self) -> dict[str, Any]:
        """torch's layout, world-size independent (see :mod:`bregtop_dist.state_format`).

        ``state`` holds, per parameter, the AdamW-side state (DTensors for DTensor parameters)
        or ``{"kron": {block index: block fields}}`` with the Kronecker blocks this rank owns, plus the
        other ranks' blocks on the rank that last ran :meth:`consolidate_state_dict` (until
        the next step). Collective-free: it may be called on one rank only. Every rank's dict
        together (torch.distributed.checkpoint), or one consolidated dict, loads at any world
        size.

        Warns (:class:`~bregtop_dist.state_format.IncompleteStateDictWarning`, once per call,
        naming the fix for each saver) when taken on a rank of a multi-process run whose dict
        lacks other ranks' blocks and no :meth:`consolidate_state_dict` ran since the last
        step: what a rank-0 saver would write and resuming would refuse. Not inside
        torch.distributed.checkpoint's ``get_state_dict`` / ``get_optimizer_state_dict`` or
        Accelerate's ``prepare`` (every rank takes its own part there), and not under an engine
        that saves every rank's state itself (DeepSpeed ZeRO)."""
        self._plan_every_group()
        self._warn_if_incomplete()
        index: dict[int, int] = {}
        groups = []
        for group, params in zip(self.param_groups, self._source.parameters()):
            ids = []
            for p in params:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state: dict[int, dict[str, Any]] = {i: {} for i in index.values()}  # every parameter, as DCP expects
        for p, entry in self.state.items():
            if id(p) not in index:
                continue
            full = self._gathered_adamw.get(p)
            state[index[id(p)]] = {
                k: {t: dict(b) for t, b in v.items()} if k == KRON else full[k] if full else adamw_for_saving(p, v)
                for k, v in entry.items()
            }
        return {"state": state, "param_groups": groups}

    def _warn_if_incomplete(self) -> None:
        """The warning :meth:`state_dict` gives on a rank whose dict alone cannot be resumed.
        After a consolidation every rank is quiet: the whole state is on rank ``to``, and
        Accelerate's ``save_state`` takes every rank's dict but writes the main process's."""
        rank, world = self._source.world()
        if world == 1 or self._gathered or self._source.engine_saves_state:
            return
        owners = [blk.owner for plan in self._kron.plans.values() for blk in plan.blocks]
        held = owners.count(rank)
        if held < len(owners) and not taken_per_rank():
            warnings.warn(incomplete_message(rank, world, held, len(owners)), IncompleteStateDictWarning, stacklevel=3)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather every rank's Kronecker blocks to rank ``to`` (a rank of the optimizer's
        process group), so that its next :meth:`state_dict` holds the whole state, for savers
        that write rank ``to``'s dict alone (Accelerate's ``save_state`` and the Trainer under
        DDP). A collective: call it on every rank. The gathered copies are dropped at the next
        step; until then no rank's :meth:`state_dict` warns that it is incomplete. The AdamW-side
        state of DTensor parameters is gathered too (that of plain parameters is replicated)."""
        self._agree_once()
        rank, world = self._source.world()
        if not 0 <= to < world:
            raise ValueError(f"to={to!r} is not a rank of the optimizer's {world}-rank process group")
        views = self._plan_every_group()
        self._drop_gathered()
        if world == 1:
            return
        mine = {
            (plan.key, bid): to_cpu_block(stack.state.block(row))
            for plan in self._kron.plans.values() for stack in plan.stacks.values() if stack.state is not None
            for row, bid in enumerate(stack.block_ids)
        }
        group = self._source.pg()
        received: list[Any] | None = [None] * world if rank == to else None
        dst = to if group is None else dist.get_global_rank(group, to)
        dist.gather_object(mine, received, dst=dst, group=group)
        adamw = _gather_sharded_adamw(self.state, views)
        self._gathered = True
        if received is None:
            return
        for r, blocks in enumerate(received):
            if r == rank:
                continue
            for (key, bid), block in blocks.items():
                plan = self._kron.plans[key]
                blk = plan.blocks[bid]
                self.state[plan.params[blk.param]][KRON].gathered[str(blk.index)] = block
        self._gathered_adamw = adamw

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` saved at any world size (or torch.distributed.checkpoint's
        form of it, keyed by parameter name); this rank takes the Kronecker blocks it owns.

        Everything is read, checked and built (on its devices) before anything changes, and the
        ranks agree on it: when any rank finds a problem (the dict's layout, a group's settings,
        a missing block, a field of the wrong dtype or device, a NaN or inf in a factor or a
        moment, a negative count or second moment) or fails while reading, every rank raises the
        same ValueError naming the first one (an ArgumentTypeError for a setting of the wrong
        type) and no rank changes. Under a process group every rank must call it (one
        all_gather_object)."""
        self._agree_once()
        rank, world = self._source.world()
        cause: Exception | None = None
        try:
            loaded, problem = self._read_for_loading(state_dict, rank, world)
        except Exception as err:  # noqa: BLE001 - raised on every rank below, once every rank knows
            loaded, problem, cause = None, unforeseen(err, rank, world), err
        first = first_on_every_rank(problem, self._source.pg(), world)
        if first is not None:
            raise first.error() from (cause if first == problem else None)
        assert loaded is not None
        self._commit_load(loaded)

    def _read_for_loading(
        self, state_dict: Any, rank: int, world: int
    ) -> tuple[_Loaded | None, LoadProblem | None]:
        """What loading ``state_dict`` puts in place, read, checked and built without changing
        the optimizer's state or settings, or the first problem this rank finds. Plans are
        made for every group on the way (as :meth:`state_dict` makes them)."""
        parts = _saved_parts(state_dict)
        if isinstance(parts, LoadProblem):
            return None, parts
        saved_groups, saved_by_key = parts
        settings = self._saved_settings(saved_groups)
        if isinstance(settings, LoadProblem):
            return None, settings
        key_to_param: dict[Any, Tensor] = {}
        for saved, params in zip(saved_groups, self._source.parameters()):
            key_to_param.update(zip(saved["params"], params))
        views = self._plan_every_group()
        saved_state = {id(key_to_param[k]): v for k, v in saved_by_key.items() if k in key_to_param}
        if "kron_blocks" in state_dict:  # the format before block indices: per-rank stacks, same world size only
            try:
                saved_state = self._from_stacked(state_dict, saved_state, world)
            except ValueError as err:
                return None, LoadProblem((0, 1 + len(saved_groups)), "", str(err))
        pieces = {id(s.param): s for view in views for s in view.pieces}
        stacks, problem = self._take_blocks(saved_state, settings)
        if problem is not None:
            return None, problem
        adamw, problem = self._take_adamw(saved_state, list(key_to_param.values()), pieces, rank)
        if problem is not None:
            return None, problem
        return _Loaded(settings, adamw, stacks), None

    def _saved_settings(self, saved_groups: list[Any]) -> list[dict[str, Any]] | LoadProblem:
        """Each saved group's settings (everything but ``params``), checked against this
        optimizer's groups as the constructor checks settings, or the first problem: the
        number of groups, a group that is not a dict with a list of params, a different number
        of params, a refused setting."""
        if len(saved_groups) != len(self.param_groups):
            return LoadProblem(
                (0, 0), "", f"the state dict has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}")
        out = []
        for gi, (saved, group, params) in enumerate(zip(saved_groups, self.param_groups, self._source.parameters())):
            position = (0, 1 + gi)
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
                return LoadProblem(position, f"param group {gi}",
                                   f"expected a dict with a list 'params', got {describe_value(saved)}")
            if len(saved["params"]) != len(params):
                return LoadProblem(position, "", f"param group {gi} has {len(saved['params'])} params in the "
                                   f"state dict and {len(params)} in this optimizer")
            settings = {k: v for k, v in saved.items() if k != "params"}
            try:
                BregTopConfig.from_group({**group, **settings})
            except (TypeError, ValueError) as err:
                return LoadProblem(position, f"the settings of param group {gi}", str(err),
                                   wrong_type=isinstance(err, ArgumentTypeError))
            out.append(settings)
        return out

    def _take_blocks(
        self, saved_state: dict[int, Any], settings: list[dict[str, Any]]
    ) -> tuple[list[tuple[BlockStack, KronBlockState]], LoadProblem | None]:
        """A new state for every stack of this rank, built on its plan's device from the saved
        blocks (keyed by id of parameter, then block index), or the first block that is missing or
        cannot be a block's state (see :meth:`KronBlockState.check_block`; a group that grafts
        under the loaded ``settings`` needs its blocks' grafting moment)."""
        problems: list[LoadProblem] = []
        rows: list[tuple[BlockStack, KronPlan, list[Mapping[str, Tensor]], bool]] = []
        for pi, plan in enumerate(self._kron.plans.values()):
            gi = int(plan.key.split(".")[0])
            graft = BregTopConfig.from_group({**self.param_groups[gi], **settings[gi]}).graft != "none"
            for stack in plan.stacks.values():
                taken: list[Mapping[str, Tensor]] = []
                for bid in stack.block_ids:
                    blk = plan.blocks[bid]
                    block = saved_block(saved_state.get(id(plan.params[blk.param])), blk.index)
                    why = "it is missing" if block is None else KronBlockState.check_block(block, *blk.shape, graft)
                    if why is None:
                        taken.append(block)  # type: ignore[arg-type]
                    else:
                        where = describe_block(plan.names[blk.param], blk.index, blk.shape)
                        problems.append(LoadProblem((1 + pi, bid), where, why, missing_block=block is None))
                rows.append((stack, plan, taken, graft))
        if problems:
            return [], min(problems, key=lambda p: p.position)
        return [(stack, KronBlockState.from_blocks(taken, plan.device, graft)) for stack, plan, taken, graft in rows], None

    def _take_adamw(
        self, saved_state: dict[int, Any], params: list[Tensor], pieces: dict[int, Piece], rank: int,
    ) -> tuple[dict[Tensor, dict[str, Tensor]], LoadProblem | None]:
        """This rank's AdamW-side entries, checked (see :func:`adamw_entry_for_loading`) and
        copied to their devices in float32 (the step counter on the CPU, where the host reads
        it), or the first problem. ``params`` are the parameters in the state dict's order."""
        kron_params = {id(p) for plan in self._kron.plans.values() for p in plan.params}
        adamw: dict[Tensor, dict[str, Tensor]] = {}
        for i, p in enumerate(params):
            entry = saved_state.get(id(p))
            if id(p) in kron_params or entry is None or id(p) not in pieces:
                continue
            piece = pieces[id(p)]
            try:
                taken = adamw_entry_for_loading(piece, rank, entry)
            except ValueError as err:
                return {}, LoadProblem((1 + len(self._kron.plans), i), f"the AdamW-side state of {piece.name}", str(err))
            if taken:
                adamw[p] = {
                    k: v.detach().to("cpu" if k == "step" else piece.value.device, torch.float32, copy=True)
                    for k, v in taken.items()
                }
        return adamw, None

    def _commit_load(self, loaded: _Loaded) -> None:
        """Put a load every rank agreed on in place: plain assignments of what
        :meth:`_read_for_loading` built, nothing that can fail half-way."""
        for group, settings in zip(self.param_groups, loaded.settings):
            group.update(settings)
        self.state.clear()
        self._gathered, self._gathered_adamw = False, {}
        for p, entry in loaded.adamw.items():
            self.state[p] = entry
        for stack, state in loaded.stacks:
            stack.state = state
        for plan in self._kron.plans.values():
            register_blocks(plan, self.state)

    def _from_stacked(self, state_dict: dict[str, Any], saved_state: dict[int, Any], world: int) -> dict[int, Any]:
        """A state dict of the earlier format (``kron_blocks`` per stack of this rank) by block index,
        which is possible at the world size it was saved with."""
        saved_world = state_dict.get("world_size", 1)
        if saved_world != world:
            raise ValueError(
                f"the state dict was saved with world_size={saved_world} in BregTop's earlier per-rank format "
                f"(kron_blocks), and this run has {world}; that format loads only at the world size it was saved "
                "with. Load it there and save again: the current format loads at any world size"
            )
        out = {k: dict(v) for k, v in saved_state.items()}
        stacks = self._kron.stacks
        for key, tensors in state_dict["kron_blocks"].items():
            stack = stacks.get(key)
            if stack is None:
                raise ValueError(f"the state dict has block stack {key!r}, unknown to this optimizer on this rank")
            plan = self._kron.plans[stack.plan]
            for row, bid in enumerate(stack.block_ids):
                blk = plan.blocks[bid]
                entry = out.setdefault(id(plan.params[blk.param]), {})
                entry.setdefault(KRON, {})[str(blk.index)] = {k: v[row] for k, v in tensors.items()}
        return out



@dataclass
class _Loaded:
    """What a load puts in place, all of it built before the ranks agree: each group's saved
    settings, the AdamW-side entries (on their devices), a new state for each owned stack."""

    settings: list[dict[str, Any]]
    adamw: dict[Tensor, dict[str, Tensor]]
    stacks: list[tuple[BlockStack, KronBlockState]]


def _saved_parts(state_dict: Any) -> tuple[list[Any], Mapping[Any, Any]] | LoadProblem:
    """A state dict's param groups and per-parameter state, or what is wrong with its layout."""
    if not isinstance(state_dict, Mapping):
        return LoadProblem((0, 0), "", "a state dict is a dict with 'state' and 'param_groups', got "
                           f"{describe_value(state_dict)}")
    for key in ("state", "param_groups"):
        if key not in state_dict:
            return LoadProblem((0, 0), "", f"the state dict has no {key!r} key (its keys: {list(state_dict)[:8]})")
    groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(groups, (list, tuple)):
        return LoadProblem((0, 0), "", f"the state dict's 'param_groups' is {describe_value(groups)}, expected a "
                           "list of dicts, one per param group")
    if not isinstance(state, Mapping):
        return LoadProblem((0, 0), "", f"the state dict's 'state' is {describe_value(state)}, expected a dict "
                           "of per-parameter entries")
    return list(groups), state


def _gather_sharded_adamw(state: Any, views: list[GroupPieces]) -> dict[Tensor, dict[str, Any]]:
    """Full copies of the AdamW-side state of DTensor parameters (a collective per
    parameter, in the same order on every rank; ranks whose piece is empty add nothing)."""
    from torch.distributed.tensor import DTensor

    full: dict[Tensor, dict[str, Any]] = {}
    for view in views:
        cfg = BregTopConfig.from_group(view.settings)
        for s in view.pieces:
            if is_kron_shape(s.shape, cfg.bregtop) or not is_dtensor(s.param):
                continue
            mine = state.get(s.param, {})
            step = mine.get("step", torch.zeros((), dtype=torch.float32)).reshape(1).to(s.value.device, copy=True)
            dist.all_reduce(step, op=dist.ReduceOp.MAX, group=s.param.device_mesh.get_group())  # type: ignore[attr-defined]
            if float(step) == 0.0:
                continue
            entry: dict[str, Any] = {"step": step.reshape(()).cpu()}
            for key in ("exp_avg", "exp_avg_sq"):
                local = mine.get(key, torch.zeros_like(s.value, dtype=torch.float32))
                whole = DTensor.from_local(local, s.param.device_mesh, s.param.placements, run_check=False,  # type: ignore[attr-defined]
                                           shape=s.param.shape, stride=s.param.stride())
                entry[key] = whole.full_tensor().cpu()
            full[s.param] = entry
    return full
