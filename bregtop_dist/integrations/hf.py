"""transformers: BregTop in a ``Trainer`` with the paper's grouping, in one argument.

    from bregtop_dist.integrations.hf import bregtop_for_trainer

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=bregtop_for_trainer(model, lr=1e-3, method="bregtop-vn-v2"))

The Trainer builds the optimizer itself (so it works when Accelerate wraps the model for DDP
or FSDP2), saves and restores its state with the checkpoints, and drives the lr scheduler.
Matrices get Kronecker preconditioning; embeddings, norms, biases and the head go to the
AdamW side (:func:`bregtop_dist.param_groups`). The Trainer's own weight-decay split is
replaced by that grouping, so weight decay is a BregTop setting here (``weight_decay=...``),
not ``TrainingArguments.weight_decay``.

Under DDP add :class:`ConsolidateOnSave` to the callbacks: the Trainer writes the optimizer's
``state_dict()`` from process 0 alone, and the callback gathers BregTop's blocks there first
(on every process, before each checkpoint). Without it a checkpoint of a multi-process run
holds process 0's blocks only and resuming refuses it, naming a missing block. Under DeepSpeed
ZeRO add :class:`AttachZeroFragments` instead: it points BregTop at the fragments ZeRO hands
it once training starts (DeepSpeed saves every rank's state itself).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from bregtop_dist.grouping import param_groups
from bregtop_dist.optimizer import BregTop


def bregtop_for_trainer(
    model: nn.Module, head_names: Sequence[str] | None = None, adamw_group: dict[str, Any] | None = None,
    **settings: Any,
) -> tuple[type[BregTop], dict[str, Any]]:
    """``(BregTop, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    ``settings`` are BregTop's arguments (validated here, so a typo fails before training);
    ``adamw_group`` holds per-group overrides for the AdamW side (for example ``{"lr": 3e-4}``).
    """
    groups = param_groups(model, head_names=head_names, **(adamw_group or {}))
    BregTop(groups, **settings)  # validate now: the Trainer builds the real one later
    return BregTop, {"params": groups, **settings}


def _callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class AttachZeroFragments(_callback_base()):  # type: ignore[misc]
    """Trainer callback: under DeepSpeed ZeRO, tell BregTop which elements each rank's
    fragments hold (see :func:`bregtop_dist.integrations.deepspeed.attach_prepared`)."""

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if optimizer is not None:
            from bregtop_dist.integrations.deepspeed import attach_prepared

            attach_prepared(optimizer)


class ConsolidateOnSave(_callback_base()):  # type: ignore[misc]
    """Trainer callback: before each checkpoint, gather BregTop's Kronecker blocks to process
    0, which writes the optimizer state (see :meth:`BregTop.consolidate_state_dict`). Runs on
    every process; for ``save_strategy="best"``, whose decision comes after evaluation, it
    gathers after every evaluation."""

    def _gather(self, optimizer: Any) -> None:
        from bregtop_dist.integrations.accelerate import find_bregtop

        if optimizer is not None:
            find_bregtop(optimizer).consolidate_state_dict(to=0)

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if control.should_save:
            self._gather(optimizer)

    def on_epoch_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if control.should_save:
            self._gather(optimizer)

    def on_evaluate(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        if str(getattr(args, "save_strategy", "")).endswith("best"):
            self._gather(optimizer)
