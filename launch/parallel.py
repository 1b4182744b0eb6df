"""The language-model job's meshes: HSDP (``--replicate R``) and FSDP2 over tensor parallelism
(``--tp N``), built with torch's own ``fully_shard`` and ``parallelize_module`` before the
optimizer, as torchtitan builds them; the optimizer then reads the placements (see
``bregtop_dist/distributed/mesh.py``).

Tensor parallelism splits each block's MLP (its first Linear column-wise, its second
row-wise). The attention's fused q/k/v projection stays whole on every tensor-parallel rank:
cutting a fused ``qkv`` by columns would hand a rank parts of q and k from different heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class MeshLayout:
    """How the job's ranks are arranged: ``replicate`` x ``shard`` data-parallel ranks (HSDP when
    ``replicate`` > 1), each group of ``tp`` ranks one tensor-parallel group."""

    replicate: int = 1
    tp: int = 1

    @property
    def used(self) -> bool:
        return self.replicate > 1 or self.tp > 1

    def check(self, world: int) -> None:
        """A ValueError naming the options when they do not fit ``world`` processes."""
        if self.replicate > 1 and self.tp > 1:
            raise ValueError(f"--replicate {self.replicate} with --tp {self.tp} needs a 3-D mesh; use one of them")
        size = self.replicate * self.tp
        if world % size or world == size and self.replicate > 1:
            raise ValueError(
                f"--replicate {self.replicate} --tp {self.tp} does not fit {world} process(es): the process count must "
                f"be a multiple of {size}" + (" and larger (HSDP shards within each replica)" if self.replicate > 1 else "")
            )

    def data_rank(self) -> tuple[int, int]:
        """(this rank's index, count) among the ranks that take different batches: every rank
        under HSDP, one per tensor-parallel group under TP."""
        rank, world = dist.get_rank(), dist.get_world_size()
        return rank // self.tp, world // self.tp


def parallelize(model: nn.Module, layout: MeshLayout) -> nn.Module:
    """Shard ``model`` (launch.models.GPT) in place on ``layout``'s mesh of every process."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    device = "cuda" if next(model.parameters()).is_cuda else "cpu"
    if layout.tp > 1:
        from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

        mesh = init_device_mesh(device, (world // layout.tp, layout.tp), mesh_dim_names=("dp", "tp"))
        for block in model.blocks:  # type: ignore[union-attr]
            parallelize_module(block.mlp, mesh["tp"], {"0": ColwiseParallel(), "2": RowwiseParallel()})
        shard_mesh = mesh["dp"]
    else:
        shard_mesh = init_device_mesh(device, (layout.replicate, world // layout.replicate),
                                      mesh_dim_names=("replicate", "shard"))
    for block in model.blocks:  # type: ignore[union-attr]
        fully_shard(block, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    return model
