"""BregTop's state dict: one logical format that does not depend on the world size.

torch's layout, ``{"state": {param: {...}}, "param_groups": [...]}``, with the Kronecker state
inside the parameter's entry, one block per tile::

    state[p] = {"kron": {"0": {"momentum": ..., "L": ..., ..., "step": ..., "ready": ...},
                         "1": {...}}}

A tile is the block's index among its parameter's blocks (row-major over the tile grid), so
a block keeps its key whichever rank owns it. Each rank writes the blocks it owns; a rank
reading a state dict takes the blocks it owns at its own world size. AdamW-side entries are
torch's (``step``, ``exp_avg``, ``exp_avg_sq``), as DTensors for DTensor parameters.

That is the layout torch.distributed.checkpoint expects (it keys ``state`` by parameter name
and saves each rank's tensors), and the layout a rank-0 saver writes once the blocks have
been gathered to rank 0 (``BregTop.consolidate_state_dict``).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor

from bregtop_dist.block_plan import BlockStack
from bregtop_dist.distributed.layout import ParamShard, is_dtensor

KRON = "kron"
"""The key of a Kronecker parameter's blocks in its state entry."""


class KronTiles(Mapping[str, dict[str, Tensor]]):
    """``optimizer.state[p]["kron"]``: the blocks of one Kronecker parameter this rank holds,
    by tile, each a dict of the block's fields. Owned blocks are views of the live stacked
    state (always current); blocks gathered from other ranks by ``consolidate_state_dict``
    are copies, dropped at the next step."""

    def __init__(self) -> None:
        self._owned: dict[str, tuple[BlockStack, int]] = {}
        self.gathered: dict[str, dict[str, Tensor]] = {}

    def own(self, tile: int, stack: BlockStack, row: int) -> None:
        self._owned[str(tile)] = (stack, row)

    def __getitem__(self, tile: str) -> dict[str, Tensor]:
        if tile in self._owned:
            stack, row = self._owned[tile]
            assert stack.state is not None
            return stack.state.block(row)
        return self.gathered[tile]

    def __iter__(self) -> Iterator[str]:
        yield from self._owned
        yield from (t for t in self.gathered if t not in self._owned)

    def __len__(self) -> int:
        return len(self._owned) + sum(t not in self._owned for t in self.gathered)

    def __repr__(self) -> str:
        return f"KronTiles(owned={sorted(self._owned, key=int)}, gathered={sorted(self.gathered, key=int)})"


def saved_block(entry: Any, tile: int) -> Mapping[str, Tensor] | None:
    """Block ``tile`` of a saved parameter entry (tile keys may be str or int), or None."""
    if not isinstance(entry, Mapping):
        return None
    tiles = entry.get(KRON)
    if not isinstance(tiles, Mapping):
        return None
    block = tiles.get(str(tile), tiles.get(tile))
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


def adamw_for_loading(shard: ParamShard, rank: int, key: str, value: Any) -> Tensor | Any:
    """Rank ``rank``'s part of a saved AdamW-side value: a DTensor's local tensor, the shard's
    range of a full tensor, or a tensor already of the local shape. Raises ValueError otherwise."""
    if not isinstance(value, Tensor) or value.ndim == 0:
        return value
    if is_dtensor(value):
        value = value.to_local()  # type: ignore[attr-defined]
    local = tuple(shard.value.shape)
    if tuple(value.shape) == local:
        return value
    if tuple(value.shape) == shard.shape:  # the full tensor: take this rank's elements
        start, stop = shard.ranges[rank]
        return value.reshape(-1)[start:stop].reshape(local)
    raise ValueError(
        f"{shard.name}: saved {key!r} has shape {tuple(value.shape)}; expected the parameter's shape "
        f"{shard.shape} or this rank's part of it {local}"
    )


def describe_tile(name: str, tile: int, shape: tuple[int, int]) -> str:
    m, n = shape
    return f"Kronecker block {tile} (a {m}x{n} tile) of {name}"


def to_cpu_block(block: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A copy of one block's fields on the CPU (for gathering to another rank)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in block.items()}

