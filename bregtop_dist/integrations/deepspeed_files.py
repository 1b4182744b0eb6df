"""Reading DeepSpeed's checkpoint files without running anything from them.

DeepSpeed's torch checkpoint engine loads every file with ``torch.load(weights_only=False)``:
a crafted ``*_optim_states.pt`` runs code when a run resumes. :func:`safe_load` is what
:func:`bregtop_dist.integrations.deepspeed.load_checkpoint` puts in its place: torch's
``weights_only`` loader, which also admits the few DeepSpeed classes a ZeRO checkpoint holds
(:data:`DEEPSPEED_GLOBALS`, by exact name: plain records, no code of their own on loading).
"""

from __future__ import annotations

import importlib
import os
from typing import Any

import torch

DEEPSPEED_GLOBALS = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""The classes DeepSpeed pickles into ZeRO checkpoints besides tensors and containers: the
stage (an Enum), the loss scaler and ZeRO-1/2's fragment addresses (attributes only)."""


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that would need more than torch's weights-only loading."""


def _classes() -> list[Any]:
    out = []
    for dotted in DEEPSPEED_GLOBALS:
        module, name = dotted.rsplit(".", 1)
        out.append(getattr(importlib.import_module(module), name))
    return out


def safe_load(path: str | os.PathLike[str], map_location: Any = None) -> Any:
    """``torch.load(path, weights_only=True)`` admitting :data:`DEEPSPEED_GLOBALS` too; a file
    that names anything else is refused in one line naming the file and what it named."""
    try:
        with torch.serialization.safe_globals(_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # noqa: BLE001 - one line naming the file
        raise UnsafeCheckpointError(f"{str(path)!r} is refused: {why_refused(err)}") from None


def why_refused(err: BaseException) -> str:
    """The line of a failed ``torch.load(weights_only=True)`` that says what the file named
    (torch's message spends its first lines on advice), at most 300 characters."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [line for line in lines if "nsupported" in line or "GLOBAL" in line]
    detail = named[0] if named else lines[-1] if lines else type(err).__name__
    return detail.replace("WeightsUnpickler error: ", "")[:300]


class using_safe_load:  # noqa: N801 - used as a context manager
    """Within the block, ``engine``'s checkpoint engine reads files with :func:`safe_load`."""

    def __init__(self, engine: Any) -> None:
        target = getattr(engine, "checkpoint_engine", None)
        if target is None or not hasattr(target, "load"):
            raise TypeError(f"{type(engine).__name__} has no checkpoint_engine with a load method: not a DeepSpeed "
                            "engine")
        self.target: Any = target

    def __enter__(self) -> None:
        self.target.load = safe_load  # an instance attribute: shadows the class's method

    def __exit__(self, *exc: Any) -> None:
        del self.target.load
