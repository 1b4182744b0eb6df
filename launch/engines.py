"""How a job wraps its model and optimizer: Accelerate (one process, DDP, FSDP2, or DeepSpeed
through ``accelerate launch``), or DeepSpeed directly from a JSON file (``--deepspeed``; works
under ``torchrun`` on a CPU machine too).

Either way the optimizer is BregTop (or AdamW) built from the job's settings record, its
``BregTopConfig`` (into which :mod:`launch.jobconfig` already parsed a ``--deepspeed`` JSON's
optimizer block); the block's ``comm_dtype``, an optimizer-wide setting, is taken from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bregtop_dist import BregTop, BregTopConfig, param_groups


@dataclass
class Engine:
    """What a training loop calls: ``model(...)``, ``backward(loss)``, ``step()`` (which also
    zeroes the gradients), and ``optimizer`` (whose ``state_dict`` is this rank's state)."""

    model: Any
    optimizer: Any
    backward: Callable[[torch.Tensor], None]
    step: Callable[[], None]
    prepare_loader: Callable[[Any], Any]


def make_optimizer(model: nn.Module, settings: BregTopConfig, adamw: bool = False,
                   groups: Callable[[nn.Module], Any] = param_groups, comm_dtype: str = "fp32") -> torch.optim.Optimizer:
    """BregTop with ``settings`` on ``groups(model)`` (the job's grouping: the matrices in blocks,
    the rest on BregTop's AdamW side), or with ``adamw`` torch's AdamW on every parameter with
    BregTop's AdamW-side settings (lr, adam betas and eps, weight decay)."""
    if adamw:
        return torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=settings.resolved_adam_betas,
                                 eps=settings.adam_eps, weight_decay=settings.weight_decay)
    return BregTop.from_config(groups(model), settings, comm_dtype=comm_dtype)


def build(
    accelerator: Any, model: nn.Module, settings: BregTopConfig, deepspeed_config: Path | None, micro_batch: int, *,
    adamw: bool = False, groups: Callable[[nn.Module], Any] = param_groups, grad_clip: float | None = None,
    parallelized: bool = False,
) -> Engine:
    """Wrap ``model`` and its optimizer, :func:`make_optimizer` of ``settings`` (the row's
    BregTop settings, method included), ``adamw`` and ``groups``.

    A DeepSpeed config's optimizer block gives the optimizer-wide ``comm_dtype``; the rest is
    ``settings``. ``micro_batch`` is the per-process batch (for DeepSpeed's "auto" sizes).
    ``grad_clip`` (when given) becomes a DeepSpeed engine's ``gradient_clipping``: the engine
    clips, so the job does not (0 turns the config's clipping off). A ``parallelized`` model
    (sharded in place on a mesh by :mod:`launch.parallel`) is not wrapped again: the optimizer
    is built on its DTensors, as with torch's optimizers.
    """
    from accelerate.utils import DistributedType

    from bregtop_dist.integrations.deepspeed import (
        attach_prepared,
        fill_auto_batch,
        initialize,
        load_config,
        optimizer_block,
    )

    if accelerator.distributed_type == DistributedType.DEEPSPEED:  # accelerate launch with a DeepSpeed plugin
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        comm_dtype = optimizer_block(ds).comm_dtype if "optimizer" in ds else "fp32"
        ds.pop("optimizer", None)
        ds["zero_allow_untested_optimizer"] = True
        ds.update(fill_auto_batch(ds, micro_batch, None, accelerator.num_processes))
        if grad_clip is not None:
            ds["gradient_clipping"] = grad_clip
        opt = make_optimizer(model, settings, adamw, groups, comm_dtype)
        model, opt = accelerator.prepare(model, opt)
        attach_prepared(opt)
        return _accelerate_engine(accelerator, model, opt)

    if deepspeed_config is not None:
        cfg = load_config(deepspeed_config)
        if grad_clip is not None:
            cfg["gradient_clipping"] = grad_clip
        bregtop = make_optimizer(model, settings, groups=groups, comm_dtype=optimizer_block(cfg).comm_dtype)
        assert isinstance(bregtop, BregTop)
        engine, _, _, _ = initialize(model=model, config=cfg, optimizer=bregtop, micro_batch_size=micro_batch)
        return Engine(engine, bregtop, engine.backward, engine.step, accelerator.prepare)

    opt = make_optimizer(model, settings, adamw, groups)
    if parallelized:
        return Engine(model, opt, lambda loss: loss.backward(), _stepper(opt), accelerator.prepare)
    model, opt = accelerator.prepare(model, opt)
    return _accelerate_engine(accelerator, model, opt)


def _stepper(opt: Any) -> Callable[[], None]:
    def step() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _accelerate_engine(accelerator: Any, model: Any, opt: Any) -> Engine:
    return Engine(model, opt, accelerator.backward, _stepper(opt), accelerator.prepare)
