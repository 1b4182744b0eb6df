"""Checks of a param group when it is added (its values themselves are checked by
:class:`~bregtop_dist.config.BregTopConfig`): the wire dtype, the backend on the group's
devices, real parameters, DTensor placements, and a warning for embeddings given the
Kronecker side.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch
from torch import Tensor

from bregtop_dist.block_plan import is_kron_shape
from bregtop_dist.config import BregTopConfig
from bregtop_dist.core.dispatch import resolve_backend
from bregtop_dist.distributed.layout import global_shape, is_dtensor
from bregtop_dist.grouping import embedding_or_head_like

COMM_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


def wire_dtype(comm_dtype: str | torch.dtype) -> torch.dtype:
    """The dtype on the wire that ``comm_dtype`` names; a ValueError naming the value and the choices."""
    if isinstance(comm_dtype, torch.dtype) and comm_dtype in COMM_DTYPES.values():
        return comm_dtype
    if isinstance(comm_dtype, str) and comm_dtype in COMM_DTYPES:
        return COMM_DTYPES[comm_dtype]
    raise ValueError(
        f"comm_dtype={comm_dtype!r} is not allowed; use one of {sorted(COMM_DTYPES)} or torch.float32/bfloat16"
    )



def check_placements(param_group: dict[str, Any], index: int) -> None:
    """The ValueError a DTensor parameter's mesh or placements would raise at the first step
    (:mod:`bregtop_dist.distributed.mesh`: ``Partial``, ``Shard(2)``, ...), raised when the
    group is added; it names the parameter, its mesh and its placements."""
    from bregtop_dist.distributed.mesh import mesh_boxes, mesh_pg

    for name, p in _named(param_group, index):
        if is_dtensor(p):
            name = name if name in (param_group.get("param_names") or []) else f"{name} (shape {tuple(p.shape)})"
            mesh_boxes(p, name, mesh_pg(p, name))


def _named(param_group: dict[str, Any], index: int) -> list[tuple[str, Tensor]]:
    """(name, tensor) of each tensor of a group being added: its ``param_names`` entry, else its
    position."""
    tensors = param_group.get("params")
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors or [])
    names = param_group.get("param_names") or []
    return [(str(names[i]) if i < len(names) else f"param_groups[{index}]['params'][{i}]", p) for i, p in enumerate(tensors)]


def check_parts(cfg: BregTopConfig, param_group: dict[str, Any], index: int) -> None:
    """A ValueError naming a matrix of the group whose ``parts_dim`` side ``parts`` does not divide."""
    if not cfg.bregtop or cfg.parts == 1:
        return
    for name, p in _named(param_group, index):
        shape = global_shape(p)
        if is_kron_shape(shape, True):
            side = shape[0] if cfg.parts_dim == 0 else math.prod(shape[1:])
            if side % cfg.parts:
                raise ValueError(
                    f"{name} (shape {shape}) cannot be cut into parts={cfg.parts} equal parts along parts_dim="
                    f"{cfg.parts_dim} ({'rows' if cfg.parts_dim == 0 else 'columns'}: {side}); give it a group "
                    "with parts=1 or a parts that divides that side"
                )


def check_backend_on_devices(cfg: BregTopConfig, params: Any) -> None:
    """The backend's ValueError that a group's first step would raise (``triton`` on CPU
    tensors without ``TRITON_INTERPRET=1``), raised when the group is added. Only the
    group's matrices that are plain CPU or CUDA tensors are looked at: DTensor, meta and
    ZeRO-partitioned parameters are left to the step."""
    if not cfg.bregtop:
        return
    tensors = [params] if isinstance(params, Tensor) else list(params or ())
    devices = {
        p.device for p in tensors
        if isinstance(p, Tensor) and is_kron_shape(tuple(p.shape), True) and not is_dtensor(p)
        and not hasattr(p, "ds_shape") and p.device.type in ("cpu", "cuda")
    }
    for device in sorted(devices, key=str):
        resolve_backend(cfg.backend, device, torch.float32)  # the Kronecker state is float32


def check_real(group: dict[str, Any], index: int) -> None:
    """TypeError naming a complex parameter (the factors and the AdamW moments are real)."""
    tensors = group.get("params")
    tensors = [tensors] if isinstance(tensors, Tensor) else list(tensors or ())
    names = group.get("param_names") or []
    for i, p in enumerate(tensors):
        if isinstance(p, Tensor) and p.is_complex():
            name = names[i] if i < len(names) else f"param_groups[{index}]['params'][{i}]"
            raise TypeError(
                f"{name} is {p.dtype}: BregTop takes real floating-point parameters (optimise "
                "torch.view_as_real of a complex parameter, or give it to an optimizer that takes complex ones)"
            )


def warn_embeddings_on_kronecker_side(group: dict[str, Any]) -> None:
    """UserWarning when a group given without the paper's grouping holds matrices that look
    like embeddings or an output head (see :func:`~bregtop_dist.grouping.embedding_or_head_like`):
    they get Kronecker preconditioning, which the paper does not give them."""
    names = group.get("param_names") or [None] * len(group["params"])
    found = [
        name if name is not None else f"a {global_shape(p)} matrix"
        for name, p in zip(names, group["params"]) if embedding_or_head_like(name, global_shape(p))
    ]
    if found:
        warnings.warn(
            f"BregTop: {found[0]}{f' (and {len(found) - 1} more)' if len(found) > 1 else ''} looks like an "
            "embedding or output head and gets Kronecker preconditioning, since the parameters came without "
            "the paper's grouping, which trains these with AdamW. Use BregTop(param_groups(model), ...), or "
            "give them a group with bregtop=False; a group with bregtop=True keeps them here without this warning",
            UserWarning, stacklevel=4)
