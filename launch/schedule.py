"""Learning-rate schedules of the jobs, built from torch's own schedulers (no lr arithmetic of
our own), so their ``state_dict`` is torch's and a checkpoint restores them exactly.

``constant``: the optimizer's lr throughout. ``cosine``: cosine decay from the lr to
``min_lr_ratio`` times it at step ``total`` (CosineAnnealingLR). Either way ``warmup`` steps
first ramp the lr linearly (LinearLR) from ``start_factor`` times the lr up to the lr, reached
at step ``warmup``. ``launch.lm`` starts from ``lr / (warmup + 1)`` (the default),
``launch.lm_compare`` from ``lr / warmup``. Step the scheduler once after each optimizer step.
"""

from __future__ import annotations

import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

SCHEDULES = ("constant", "cosine")


def make_scheduler(opt: torch.optim.Optimizer, schedule: str, warmup: int, total: int,
                   min_lr_ratio: float = 0.0, start_factor: float | None = None) -> LRScheduler:
    """The scheduler of ``schedule`` over ``total`` steps, with ``warmup`` steps of linear warm-up
    from ``start_factor`` (default ``1 / (warmup + 1)``) times the lr.

    The lr the optimizer holds when it is built is the peak; every group keeps its own. A
    cosine's decay lasts ``total - warmup`` steps, at least one.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule={schedule!r} is not allowed; use one of {', '.join(SCHEDULES)}")
    if schedule == "cosine" and not 0 <= warmup <= total:
        raise ValueError(f"warmup={warmup} must be at most the {total} steps of the cosine schedule")
    start = 1.0 / (warmup + 1) if start_factor is None else start_factor
    ramp = LinearLR(opt, start_factor=start, end_factor=1.0, total_iters=warmup) if warmup else None
    if schedule == "constant":
        return ramp or ConstantLR(opt, factor=1.0, total_iters=0)
    peak = [group.get("initial_lr", group["lr"]) for group in opt.param_groups]
    if min_lr_ratio and len(set(peak)) > 1:  # CosineAnnealingLR's floor is one absolute lr for all groups
        raise ValueError(f"a cosine schedule with min_lr_ratio needs one lr for all groups, got {peak}")
    decay = CosineAnnealingLR(opt, T_max=max(1, total - warmup), eta_min=float(peak[0]) * min_lr_ratio)
    return decay if ramp is None else SequentialLR(opt, [ramp, decay], milestones=[warmup])
