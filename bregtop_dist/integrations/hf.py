"""transformers: BregTop in a ``Trainer`` with the paper's grouping, in one argument.

    from bregtop_dist.integrations.hf import bregtop_for_trainer

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      optimizer_cls_and_kwargs=bregtop_for_trainer(model, args, method="bregtop-vn-v2"))

The Trainer builds the optimizer itself (so it works when Accelerate wraps the model for DDP
or FSDP2), saves and restores its state with the checkpoints, and drives the lr scheduler.
Matrices get Kronecker preconditioning; embeddings, norms, biases and the head go to the
AdamW side (:func:`bregtop_dist.param_groups`). ``lr`` and ``weight_decay`` come from
``TrainingArguments`` (``learning_rate``, ``weight_decay``) unless given; the grouping
replaces the Trainer's own weight-decay split, so the decay applies to every group.

Under DeepSpeed, give the Trainer a DeepSpeed config without an ``"optimizer"`` block, whose
``"auto"`` values the Trainer fills (``configs/deepspeed/trainer/zero2.json``), and add
:class:`AttachZeroFragments` to the callbacks; a config with a block is refused here.

Under DDP the Trainer writes the optimizer's ``state_dict()`` from process 0 alone, and
:class:`ConsolidateOnSave` gathers BregTop's blocks there first (on every process, before each
checkpoint). The optimizer :func:`bregtop_for_trainer` supplies adds that callback to the
Trainer that builds it (unless the Trainer has one, or saves through DeepSpeed or FSDP); with
``optimizer_cls_and_kwargs=(BregTop, kwargs)`` add it to the callbacks yourself. Without it a
checkpoint of a multi-process run holds process 0's blocks only: ``state_dict()`` warns
(:class:`bregtop_dist.IncompleteStateDictWarning`) and resuming refuses it, naming a missing
block. Under DeepSpeed ZeRO :class:`AttachZeroFragments` is the one needed: it points BregTop at
the fragments ZeRO hands it once training starts (DeepSpeed saves every rank's state itself).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from bregtop_dist.grouping import param_groups
from bregtop_dist.optimizer import BregTop

_FROM_ARGS = (("lr", "learning_rate"), ("weight_decay", "weight_decay"))
"""BregTop settings taken from ``TrainingArguments`` fields unless given."""


class BregTopFactory:
    """What ``Trainer(optimizer_cls_and_kwargs=(BregTopFactory, kwargs))`` builds: the Trainer
    calls ``BregTopFactory()(model, **kwargs)`` with the model it trains, and this makes BregTop
    on the paper's grouping of that model. The Trainer neither pops nor changes ``kwargs``
    here (it pops ``"params"`` from an optimizer class's kwargs), so one tuple serves any
    number of Trainers.

    Called by a Trainer's ``create_optimizer``, it also adds :class:`ConsolidateOnSave` to that
    Trainer's callbacks when the Trainer writes the optimizer from process 0 alone (neither
    DeepSpeed nor FSDP saves it) and has no such callback yet, so that checkpoints of a
    multi-process run hold every block. Called otherwise, it only builds the optimizer."""

    def __call__(
        self, model: nn.Module, head_names: Sequence[str] | None = None,
        adamw_group: dict[str, Any] | None = None, **settings: Any,
    ) -> BregTop:
        optimizer = BregTop(param_groups(model, head_names=head_names, **(adamw_group or {})), **settings)
        trainer = _calling_trainer()
        if trainer is not None:
            _consolidate_on_checkpoints(trainer)
        return optimizer


def _consolidate_on_checkpoints(trainer: Any) -> bool:
    """Add :class:`ConsolidateOnSave` to ``trainer``'s callbacks where its checkpoints write the
    optimizer's ``state_dict()`` from process 0 alone and it has none yet; True if added."""
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        return False  # DeepSpeed saves every rank's state; FSDP saves through Accelerate's FSDP path
    if any(isinstance(cb, ConsolidateOnSave) for cb in trainer.callback_handler.callbacks):
        return False
    trainer.add_callback(ConsolidateOnSave())
    return True


def _calling_trainer() -> Any:
    """The transformers Trainer whose ``create_optimizer`` (or a subclass's override of it) is
    calling :class:`BregTopFactory`, or None: the Trainer hands a factory only the model."""
    from transformers import Trainer

    frame = inspect.currentframe()
    try:
        for _ in range(6):  # this function, __call__, create_optimizer, overrides calling super()
            if frame is None:
                return None
            if frame.f_code.co_name == "create_optimizer" and isinstance(frame.f_locals.get("self"), Trainer):
                return frame.f_locals["self"]
            frame = frame.f_back
        return None
    finally:
        del frame


def bregtop_for_trainer(
    model: nn.Module, args: Any = None, head_names: Sequence[str] | None = None,
    adamw_group: dict[str, Any] | None = None, **settings: Any,
) -> tuple[type[BregTopFactory], dict[str, Any]]:
    """``(BregTopFactory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``. The Trainer
    that builds the optimizer from it gets :class:`ConsolidateOnSave` (see
    :class:`BregTopFactory`), so its checkpoints under DDP hold every Kronecker block.

    ``args`` (the ``TrainingArguments``) supplies ``lr`` (``learning_rate``) and
    ``weight_decay`` unless they are given in ``settings``; a given value that differs from
    ``args`` is used, with a warning. Without ``args`` and without ``lr`` BregTop's own default
    lr (1e-3) is used, with a warning, since the Trainer's ``learning_rate`` does not reach it.
    ``settings`` are BregTop's arguments (validated here, so a typo fails before training);
    ``adamw_group`` holds per-group overrides for the AdamW side (for example ``{"lr": 3e-4}``).
    """
    settings = dict(settings)
    _check_deepspeed_config(args)
    if args is not None:
        for name, field in _FROM_ARGS:
            theirs = getattr(args, field)
            if name not in settings:
                settings[name] = theirs
            elif settings[name] != theirs:
                warnings.warn(
                    f"bregtop_for_trainer: {name}={settings[name]!r} is used, not TrainingArguments.{field}="
                    f"{theirs!r} (leave {name} out to take the Trainer's)", UserWarning, stacklevel=2)
    elif "lr" not in settings:
        warnings.warn(
            "bregtop_for_trainer: no args and no lr, so BregTop's default lr=1e-3 is used and "
            "TrainingArguments.learning_rate is not; pass args=training_args (or lr=...)", UserWarning, stacklevel=2)
    kwargs = {"head_names": head_names, "adamw_group": adamw_group, **settings}
    # validate now (the Trainer builds the real one later)
    BregTop(param_groups(model, head_names=head_names, **(adamw_group or {})), **settings)
    return BregTopFactory, kwargs


def _check_deepspeed_config(args: Any) -> None:
    """ValueError when the Trainer's DeepSpeed config has an ``"optimizer"`` block: DeepSpeed
    would build that optimizer instead of the one ``bregtop_for_trainer`` supplies (and the
    Trainer refuses a block whose lr differs from ``learning_rate``)."""
    ds = getattr(getattr(args, "hf_deepspeed_config", None), "config", None)
    if isinstance(ds, dict) and "optimizer" in ds:
        block = ds["optimizer"]
        kind = block.get("type") if isinstance(block, dict) else block
        raise ValueError(
            f'TrainingArguments.deepspeed has an "optimizer" block (type {kind!r}); with bregtop_for_trainer '
            "the Trainer builds BregTop itself. Use a config without the block (configs/deepspeed/trainer/zero2.json "
            "is one), pass the block's params to bregtop_for_trainer(model, args, **params), and add "
            "callbacks=[AttachZeroFragments()] to the Trainer"
        )


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
