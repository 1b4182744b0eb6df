"""BregTop's state dict: one logical format that does not depend on the world size.

torch's layout, ``{"state": {param: {...}}, "param_groups": [...]}``, with the Kronecker state
inside the parameter's entry, keyed by block index::

    state[p] = {"kron": {"0": {"momentum": ..., "L": ..., ..., "step": ..., "ready": ...},
                         "1": {...}}}

A block index is the block's position among its parameter's blocks (row-major over the block
grid), so a block keeps its key whichever rank owns it. Each rank writes the blocks it owns; a rank
reading a state dict takes the blocks it owns at its own world size. AdamW-side entries are
torch's (``step``, ``exp_avg``, ``exp_avg_sq``), as DTensors for DTensor parameters.

That is the layout torch.distributed.checkpoint expects (it keys ``state`` by parameter name
and saves each rank's tensors), and the layout a rank-0 saver writes once the blocks have
been gathered to rank 0 (``BregTop.consolidate_state_dict``).

A dict taken on one rank of a multi-process run without that gathering holds only that
rank's blocks; ``state_dict()`` then warns with :class:`IncompleteStateDictWarning`
(:func:`incomplete_message` says what to do), except when the caller has every rank take its
own part (:func:`taken_per_rank`: torch.distributed.checkpoint, Accelerate's device placement).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from bregtop_dist.block_plan import BlockStack
from bregtop_dist.core.block_state import describe_value, non_finite
from bregtop_dist.distributed.layout import Piece, is_dtensor

KRON = "kron"
"""The key of a Kronecker parameter's blocks in its state entry."""

_TORCH_CHECKPOINT = "torch.distributed.checkpoint"
_ACCELERATE_PLACEMENT = ("accelerate.optimizer", "__init__")  # AcceleratedOptimizer: state_dict, then load it


class IncompleteStateDictWarning(UserWarning):
    """``BregTop.state_dict()`` on one rank of a multi-process run holds only the Kronecker
    blocks of that rank: written alone, it cannot be resumed from. Savers that have every rank
    save its own dict may filter it: ``warnings.filterwarnings("ignore", category=...)``."""


def incomplete_message(rank: int, world: int, held: int, total: int) -> str:
    """What :class:`IncompleteStateDictWarning` says: what is missing and each path's fix."""
    return (
        f"BregTop.state_dict() on rank {rank} of {world} holds {held} of the {total} Kronecker blocks (the other "
        "ranks keep the rest) and no consolidate_state_dict() ran since the last step: a checkpoint written from "
        "this rank's dict alone cannot be resumed. Gather the blocks to the saving rank first, on every rank: "
        "with BregTop's own state_dict, opt.consolidate_state_dict(to=0) on every rank; with Accelerate's "
        "save_state, bregtop_dist.integrations.accelerate.consolidate_on_save(accelerator, optimizer) once after "
        "prepare; with the transformers Trainer, callbacks=[bregtop_dist.integrations.hf.ConsolidateOnSave()] "
        "(bregtop_for_trainer's optimizer adds it). torch.distributed.checkpoint (get_state_dict or "
        "get_optimizer_state_dict, then dcp.save: every rank saves its own part) needs none of this and does "
        "not warn; if every rank saves its own dict another way, filter bregtop_dist.IncompleteStateDictWarning"
    )


def taken_per_rank() -> bool:
    """Whether the running call comes from a caller that has every rank take its own dict for
    that rank's own use, where one rank's dict is meant to hold that rank's blocks only:
    torch.distributed.checkpoint (``get_state_dict``, ``get_optimizer_state_dict``, also through
    an optimizer ``state_dict`` it patched), where every rank saves its part, and Accelerate's
    optimizer wrapper, which on ``prepare`` loads each rank's dict back on the device. Read from
    the call stack, since torch passes ``state_dict()`` no argument that says who asks."""
    frame = inspect.currentframe()
    try:
        while frame is not None:
            module = str(frame.f_globals.get("__name__", ""))
            if module.startswith(_TORCH_CHECKPOINT) or (module, frame.f_code.co_name) == _ACCELERATE_PLACEMENT:
                return True
            frame = frame.f_back
        return False
    finally:
        del frame


class KronBlocks(Mapping[str, dict[str, Tensor]]):
    """``optimizer.state[p]["kron"]``: the blocks of one Kronecker parameter this rank holds,
    by block index, each a dict of the block's fields. Owned blocks are views of the live stacked
    state (always current); blocks gathered from other ranks by ``consolidate_state_dict``
    are copies, dropped at the next step."""

    def __init__(self) -> None:
        self._owned: dict[str, tuple[BlockStack, int]] = {}
        self.gathered: dict[str, dict[str, Tensor]] = {}

    def own(self, index: int, stack: BlockStack, row: int) -> None:
        self._owned[str(index)] = (stack, row)

    def __getitem__(self, index: str) -> dict[str, Tensor]:
        if index in self._owned:
            stack, row = self._owned[index]
            assert stack.state is not None
            return stack.state.block(row)
        return self.gathered[index]

    def __iter__(self) -> Iterator[str]:
        yield from self._owned
        yield from (t for t in self.gathered if t not in self._owned)

    def __len__(self) -> int:
        return len(self._owned) + sum(t not in self._owned for t in self.gathered)

    def __repr__(self) -> str:
        return f"KronBlocks(owned={sorted(self._owned, key=int)}, gathered={sorted(self.gathered, key=int)})"


def saved_block(entry: Any, index: int) -> Mapping[str, Tensor] | None:
    """Block ``index`` of a saved parameter entry (its keys may be str or int), or None."""
    if not isinstance(entry, Mapping):
        return None
    blocks = entry.get(KRON)
    if not isinstance(blocks, Mapping):
        return None
    block = blocks.get(str(index), blocks.get(index))
    return block if isinstance(block, Mapping) else None


def adamw_for_saving(param: Tensor, value: Any) -> Any:
    """An AdamW-side state value as a checkpoint holds it: for a DTensor parameter, a DTensor
    with the parameter's placement (the state is kept as this rank's local tensor)."""
    if not (is_dtensor(param) and isinstance(value, Tensor) and value.ndim > 0):
        return value
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(
        value, param.device_mesh, param.placements, run_check=False,  # type: ignore[attr-defined]
        shape=param.shape, stride=param.stride(),
    )


ADAMW_KEYS = ("step", "exp_avg", "exp_avg_sq")
"""The keys of a stepped AdamW-side entry (torch's AdamW's); an entry is these or empty."""


def adamw_entry_for_loading(piece: Piece, rank: int, entry: Any) -> dict[str, Tensor]:
    """Rank ``rank``'s part of a saved AdamW-side entry, checked: empty (the parameter has
    not stepped) or exactly :data:`ADAMW_KEYS`, each value as :func:`adamw_for_loading` takes
    it (a ``kron`` key, which an AdamW-side parameter never uses, is passed over). The values
    are the saved tensors or views of them: the caller copies them. Raises ValueError saying
    what is wrong (the key, the value found, what is allowed)."""
    if not isinstance(entry, Mapping):
        raise ValueError(f"expected a dict of {list(ADAMW_KEYS)} (or an empty one), got {describe_value(entry)}")
    keys = [k for k in entry if k != KRON]
    if not keys:
        return {}
    holds = f"an AdamW-side entry holds exactly {list(ADAMW_KEYS)}, or nothing before the first step"
    unknown = [k for k in keys if k not in ADAMW_KEYS]
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r}; {holds}")
    missing = [k for k in ADAMW_KEYS if k not in entry]
    if missing:
        raise ValueError(f"key {missing[0]!r} is missing (found {keys}); {holds}")
    return {k: adamw_for_loading(piece, rank, k, entry[k]) for k in ADAMW_KEYS}


def adamw_for_loading(piece: Piece, rank: int, key: str, value: Any) -> Tensor:
    """Rank ``rank``'s part of saved AdamW-side value ``key``, checked: a floating-point tensor
    holding values (not on the meta device); for ``step`` a scalar, a whole number >= 0; for
    the moments a DTensor's local tensor, the piece's range of a full tensor, or a tensor
    already of the local shape, finite once read as float32 (the state's dtype), and
    ``exp_avg_sq`` >= 0. Raises ValueError naming the key, the value and what is allowed."""
    if not isinstance(value, Tensor):
        raise ValueError(f"{key!r} is {describe_value(value)}; expected a floating-point tensor")
    if is_dtensor(value):
        value = value.to_local()  # type: ignore[attr-defined]
    if value.device.type == "meta":
        raise ValueError(f"{key!r} is on the meta device, which holds no values; expected a tensor on the CPU "
                         "or an accelerator")
    if not value.is_floating_point():
        raise ValueError(f"{key!r} has dtype {value.dtype}; expected a floating-point tensor (it is kept in float32)")
    if key == "step":
        return _step_for_loading(value)
    part = _local_part(piece, rank, key, value)
    bad = non_finite(part.to(torch.float32))
    if bad is not None:
        read = "" if part.dtype == torch.float32 else " once read as float32, the dtype of the state"
        raise ValueError(f"{key!r} {bad}{read}; the AdamW moments must be finite")
    if key == "exp_avg_sq" and part.numel() and bool((part < 0).any()):
        negative = part[part < 0]
        count = f"{negative.numel()} negative {'entry' if negative.numel() == 1 else 'entries'}"
        raise ValueError(
            f"'exp_avg_sq' holds {count} (the smallest {float(negative.min()):.6g}); it is a running mean of "
            "squared gradients and must be >= 0"
        )
    return part


def _step_for_loading(value: Tensor) -> Tensor:
    """A saved AdamW ``step``, checked: a scalar that counts steps (a whole number >= 0)."""
    if value.ndim != 0:
        raise ValueError(f"'step' has shape {tuple(value.shape)}; expected a scalar (a 0-d tensor)")
    count = float(value)
    if not (math.isfinite(count) and count >= 0 and count == math.floor(count)):
        raise ValueError(f"'step' is {count!r}; it counts the steps taken and must be a whole number >= 0")
    return value


def _local_part(piece: Piece, rank: int, key: str, value: Tensor) -> Tensor:
    """This rank's part of a saved moment: ``value`` itself when it has the local shape, this
    rank's range when it has the parameter's shape; ValueError otherwise."""
    local = tuple(piece.value.shape)
    if tuple(value.shape) == local:
        return value
    if tuple(value.shape) == piece.shape:  # the full tensor: take this rank's elements
        return piece.local_of(value, rank)
    raise ValueError(
        f"{key!r} has shape {tuple(value.shape)}; expected the parameter's shape {piece.shape} or this "
        f"rank's part of it {local}"
    )


def describe_block(name: str, index: int, shape: tuple[int, int]) -> str:
    m, n = shape
    return f"Kronecker block {index} ({m}x{n}) of {name}"


def to_cpu_block(block: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A copy of one block's fields on the CPU (for gathering to another rank)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in block.items()}

