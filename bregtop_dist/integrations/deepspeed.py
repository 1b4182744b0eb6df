"""DeepSpeed: build BregTop from a DeepSpeed config's ``"optimizer"`` block and run it on the
ZeRO fragments DeepSpeed hands the optimizer.

ZeRO gives a client optimizer one flat fp32 partition per param group (stages 1 and 2) or per
sub-group (stage 3), in which a matrix may be cut anywhere. :func:`initialize` builds the
engine, then tells BregTop which elements of every parameter each rank's partition holds, so
that the Kronecker blocks see whole matrices (moved to their owners with one all_to_all each
way) and the engine keeps doing everything else: gradient reduction, clipping, loss scaling,
fp16/bf16 master weights, the lr scheduler, checkpoints.

    engine, optimizer, _, scheduler = initialize(model=model, config="ds_config.json")

with ``"optimizer": {"type": "BregTop", "params": {"lr": 1e-3, "method": "bregtop-vn-v2"}}``
in the config. Without ``model_parameters`` the model is split the paper's way by
:func:`bregtop_dist.param_groups`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from bregtop_dist.config import BregTopConfig
from bregtop_dist.distributed.layout import GroupPieces, Piece, Range, flat_piece
from bregtop_dist.group_checks import wire_dtype
from bregtop_dist.grouping import param_groups
from bregtop_dist.integrations.deepspeed_files import using_safe_load
from bregtop_dist.optimizer import BregTop

OPTIMIZER_TYPE = "BregTop"


def load_config(config: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config as a dict (a copy), from a dict or a JSON file."""
    if isinstance(config, dict):
        return copy.deepcopy(config)
    path = Path(config)
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {str(path)!r} does not exist")
    loaded = json.loads(path.read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"DeepSpeed config {str(path)!r} must hold a JSON object, got {type(loaded).__name__}")
    return loaded


@dataclass(frozen=True)
class OptimizerBlock:
    """A DeepSpeed config's ``"optimizer"`` block for BregTop, validated: the group settings
    (every key of ``"params"`` but ``comm_dtype``) and the optimizer-wide ``comm_dtype``."""

    settings: BregTopConfig
    comm_dtype: str = "fp32"

    def build(self, params: Any, **overrides: Any) -> BregTop:
        """BregTop on ``params`` with these settings, ``overrides`` (BregTop settings) on top."""
        settings = dataclasses.replace(self.settings, **overrides) if overrides else self.settings
        return BregTop.from_config(params, settings, comm_dtype=self.comm_dtype)

    def as_kwargs(self) -> dict[str, Any]:
        """The block as ``BregTop(params, **kwargs)`` takes it."""
        return {**self.settings.as_defaults(), "comm_dtype": self.comm_dtype}


def optimizer_block(config: dict[str, Any]) -> OptimizerBlock:
    """The BregTop block of a DeepSpeed config, after checking that BregTop can run under the
    rest of the config. Its ``"params"`` are checked as ``BregTop(...)`` checks its keyword
    arguments; an error names the key and what is allowed."""
    block = config.get("optimizer")
    if not isinstance(block, dict) or str(block.get("type", "")).lower() != OPTIMIZER_TYPE.lower():
        found = None if not isinstance(block, dict) else block.get("type")
        raise ValueError(
            f'the DeepSpeed config needs "optimizer": {{"type": "{OPTIMIZER_TYPE}", "params": {{...}}}}; '
            f"found optimizer type {found!r}. Use deepspeed.initialize directly for other optimizers"
        )
    zero = config.get("zero_optimization", {}) or {}
    stage = int(zero.get("stage", 0))
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage={stage!r} is not one of 0, 1, 2, 3")
    for key in ("offload_optimizer", "offload_param"):
        device = (zero.get(key) or {}).get("device", "none")
        if device not in (None, "none"):
            raise ValueError(
                f'zero_optimization.{key}.device="{device}" is not supported with BregTop: its block '
                'state lives on the accelerator next to the fragments it updates; use "none"'
            )
    params = dict(block.get("params", {}) or {})
    _refuse_auto({k: v for k, v in params.items() if k != "backend"}, "optimizer.params")  # backend="auto" is BregTop's
    comm_dtype = params.pop("comm_dtype", "fp32")
    settings = BregTopConfig.from_mapping(params, where="DeepSpeed config optimizer.params", extra=("comm_dtype",))
    wire_dtype(comm_dtype)
    return OptimizerBlock(settings, comm_dtype)


def fill_auto_batch(
    config: dict[str, Any], micro_batch_size: int | None, gradient_accumulation_steps: int | None, world: int,
) -> dict[str, Any]:
    """A copy of ``config`` with its ``"auto"`` (or missing) batch sizes filled from the
    arguments, as the transformers Trainer fills them from its own: the micro batch from
    ``micro_batch_size``, the accumulation from ``gradient_accumulation_steps`` (else 1), the
    global batch as their product times ``world``. A number in the config that an argument
    contradicts, or batch sizes nothing here can fill, is a ValueError naming the key and how
    to set it."""
    cfg = copy.deepcopy(config)
    given = {"train_micro_batch_size_per_gpu": micro_batch_size, "gradient_accumulation_steps": gradient_accumulation_steps}
    for key, value in given.items():
        name = "micro_batch_size" if key.startswith("train_micro") else key
        if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if value is not None and cfg.get(key, "auto") not in ("auto", value):
            raise ValueError(
                f"{key}={cfg[key]!r} in the DeepSpeed config and {name}={value!r} disagree: "
                'write "auto" in the config to take the argument, or leave the argument out'
            )
        if cfg.get(key, "auto") == "auto" and value is not None:
            cfg[key] = value
    if cfg.get("gradient_accumulation_steps", "auto") == "auto":
        cfg["gradient_accumulation_steps"] = 1
    micro = cfg.get("train_micro_batch_size_per_gpu", "auto")
    if cfg.get("train_batch_size", "auto") == "auto":
        if micro == "auto":
            raise ValueError(
                'train_micro_batch_size_per_gpu and train_batch_size are "auto" (or missing) in the DeepSpeed '
                "config: pass initialize(..., micro_batch_size=N), N the batch each process's loader "
                "yields, or write the numbers in the config"
            )
        cfg["train_batch_size"] = micro * cfg["gradient_accumulation_steps"] * world
    elif micro == "auto":
        del cfg["train_micro_batch_size_per_gpu"]  # DeepSpeed derives it from the global batch
    return cfg


def _refuse_auto(tree: dict[str, Any], prefix: str) -> None:
    """ValueError naming the first ``"auto"`` value in ``tree``: only the transformers Trainer
    fills the others (from its TrainingArguments)."""
    for key, value in tree.items():
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            _refuse_auto(value, path)
        elif value == "auto":
            raise ValueError(
                f'{path}="auto" in the DeepSpeed config: only the transformers Trainer fills this one '
                "(from its TrainingArguments). Write a value, or train with the Trainer and "
                "configs/deepspeed/trainer/zero2.json (see the README)"
            )


def initialize(
    model: nn.Module,
    config: str | os.PathLike[str] | dict[str, Any],
    model_parameters: Any = None,
    *,
    optimizer: BregTop | None = None,
    micro_batch_size: int | None = None,
    gradient_accumulation_steps: int | None = None,
    **kwargs: Any,
) -> tuple[Any, BregTop, Any, Any]:
    """``deepspeed.initialize`` with BregTop built from the config's optimizer block, or with
    ``optimizer``, a BregTop the caller built (the block is then checked with the rest of the
    config but not built again: the optimizer's own settings are the ones that run).

    ``micro_batch_size`` (the batch each process's loader yields) and
    ``gradient_accumulation_steps`` fill the config's ``"auto"`` batch sizes (see
    :func:`fill_auto_batch`; any other ``"auto"`` is refused, naming it). Returns DeepSpeed's ``(engine, optimizer, training_dataloader,
    lr_scheduler)``; the optimizer is the engine's (a ZeRO wrapper around BregTop for stages
    1-3). Everything is checked before DeepSpeed is started.
    """
    import deepspeed

    cfg = load_config(config)
    block = optimizer_block(cfg)
    if not dist.is_initialized():
        deepspeed.init_distributed()
    cfg = fill_auto_batch(cfg, micro_batch_size, gradient_accumulation_steps, dist.get_world_size())
    del cfg["optimizer"]
    _refuse_auto(cfg, "")
    if optimizer is None:
        optimizer = block.build(param_groups(model) if model_parameters is None else model_parameters)
    elif not isinstance(optimizer, BregTop):
        raise TypeError(f"optimizer must be a BregTop, not {type(optimizer).__name__}: DeepSpeed's own "
                        "deepspeed.initialize takes other optimizers")
    cfg["zero_allow_untested_optimizer"] = True
    engine, engine_optimizer, loader, scheduler = deepspeed.initialize(
        model=model, optimizer=optimizer, config=cfg, **kwargs
    )
    attach(optimizer, engine_optimizer)
    return engine, engine_optimizer, loader, scheduler


def attach(optimizer: BregTop, engine_optimizer: Any) -> None:
    """Point ``optimizer`` at the ZeRO fragments of ``engine_optimizer`` (DeepSpeed's ZeRO
    wrapper around it). Nothing to do without ZeRO (stage 0 hands BregTop whole tensors).

    Use directly after a plain ``deepspeed.initialize(model=..., optimizer=bregtop, config=...)``
    (``attach(bregtop, engine.optimizer)``); :func:`attach_prepared` finds both objects inside
    what ``accelerator.prepare`` returned.
    """
    if hasattr(engine_optimizer, "bit16_groups") and hasattr(engine_optimizer, "single_partition_of_fp32_groups"):
        source = ZeroFragments.stage_1_2(optimizer, engine_optimizer)
    elif hasattr(engine_optimizer, "fp32_partitioned_groups_flat"):
        source = ZeroFragments.stage_3(optimizer, engine_optimizer)
    else:
        return
    optimizer.attach_source(source)


def attach_prepared(prepared: Any) -> BregTop | None:
    """After ``accelerator.prepare`` (or inside a Trainer callback): walk the ``.optimizer``
    chain of the prepared optimizer to BregTop, attach it to the ZeRO wrapper on the way if
    there is one, and return it (None when the chain holds no BregTop)."""
    chain = [prepared]
    while hasattr(chain[-1], "optimizer") and len(chain) < 8:
        chain.append(chain[-1].optimizer)
    bregtop = next((o for o in chain if isinstance(o, BregTop)), None)
    if bregtop is not None:
        for outer in chain[: chain.index(bregtop)]:
            attach(bregtop, outer)
    return bregtop


class ZeroFragments:
    """Which parameter elements every rank's ZeRO partitions hold: the placement source
    (:class:`~bregtop_dist.distributed.source.Source`) BregTop reads at each ``step`` call
    (ZeRO steps one group or sub-group at a time)."""

    engine_saves_state = True  # ZeRO writes every rank's partition of the state itself

    def __init__(self, optimizer: BregTop, parts: list[tuple[int, Tensor, list[Tensor], list[int], list[Range]]],
                 group: Any) -> None:
        self.optimizer = optimizer
        self.built = optimizer.built_params
        self.groups = list(optimizer.param_groups)  # the group dicts themselves; ZeRO swaps their "params"
        self.names = {
            id(p): optimizer.param_name(gi, pi) for gi, ps in enumerate(optimizer.built_params) for pi, p in enumerate(ps)
        }
        self.parts = parts  # (param group, flat fp32 partition, params, offsets in the flat, my ranges)
        self.process_group = group
        world = dist.get_world_size(group)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, [ranges for *_, ranges in parts], group=group)
        self.ranges = [
            [tuple(gathered[r][k][j] for r in range(world)) for j in range(len(part[2]))]
            for k, part in enumerate(parts)
        ]

    @classmethod
    def stage_1_2(cls, optimizer: BregTop, zero: Any) -> ZeroFragments:
        parts = []
        for gi, params in enumerate(zero.bit16_groups):
            offsets, ranges = [], []
            for p in params:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is None:
                    offsets.append(0)
                    ranges.append((0, 0))
                    continue
                lp, hp = mapping.lp_fragment_address, mapping.hp_fragment_address
                offsets.append(int(hp.start))
                ranges.append((int(lp.start), int(lp.start + lp.numel)))
            parts.append((gi, zero.single_partition_of_fp32_groups[gi], list(params), offsets, ranges))
        return cls(optimizer, parts, zero.real_dp_process_group[0])

    @classmethod
    def stage_3(cls, optimizer: BregTop, zero: Any) -> ZeroFragments:
        rank = dist.get_rank(zero.dp_process_group)
        parts = []
        for sg, params in enumerate(zero.fp16_groups):
            offsets, ranges = [], []
            for p in params:
                _, offset, size = zero.grad_position[zero.get_param_id(p)]
                start = min(rank * size, p.ds_numel)
                offsets.append(int(offset))
                ranges.append((start, min(start + size, p.ds_numel)))
            parts.append((zero.sub_group_to_group_id[sg], zero.fp32_partitioned_groups_flat[sg], list(params), offsets, ranges))
        return cls(optimizer, parts, zero.dp_process_group)

    def pg(self) -> Any:
        return self.process_group

    def world(self) -> tuple[int, int]:
        return dist.get_rank(self.process_group), dist.get_world_size(self.process_group)

    def parameters(self) -> list[list[Tensor]]:
        return [list(ps) for ps in self.built]

    def pieces(self, every_group: bool) -> list[GroupPieces]:
        rank = self.world()[0]
        visible = self.optimizer.param_groups
        views = []
        for k, (gi, flat, params, offsets, _) in enumerate(self.parts):
            group = self.groups[gi]
            if not every_group and not (any(group is g for g in visible) and any(t is flat for t in group["params"])):
                continue
            pieces = [
                _fragment(p, self.names.get(id(p), f"param {j} of group {gi}"), ranges_all, flat, offsets[j], rank)
                for j, (p, ranges_all) in enumerate(zip(params, self.ranges[k]))
            ]
            views.append(GroupPieces(f"{gi}.{k}", gi, group, pieces))
        return views


def _fragment(p: Tensor, name: str, ranges: Sequence[Range], flat: Tensor, offset: int, rank: int) -> Piece:
    start, stop = ranges[rank]
    value = flat.narrow(0, offset, stop - start)
    grad = None if flat.grad is None else flat.grad.narrow(0, offset, stop - start)
    shape = tuple(getattr(p, "ds_shape", p.shape))
    return flat_piece(p, name, shape, tuple(ranges), value, grad)



def load_checkpoint(engine: Any, load_dir: str | os.PathLike[str], tag: str | None = None, **kwargs: Any) -> Any:
    """``engine.load_checkpoint`` after checking, on every rank, that the checkpoint was saved
    at this data-parallel world size: DeepSpeed's ZeRO partitions (and BregTop's state inside
    them) load only there, and at another size some ranks find no file and fail without saying
    why. Every file is read with torch's weights-only loader
    (:func:`~bregtop_dist.integrations.deepspeed_files.safe_load`), not DeepSpeed's unrestricted
    one. Returns what ``engine.load_checkpoint`` returns."""
    root = Path(load_dir)
    if tag is None:
        latest = root / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{str(root)!r} has no 'latest' file; pass the checkpoint's tag")
        tag = latest.read_text().strip()
    if not tag or tag in (".", "..") or os.path.basename(str(tag)) != str(tag):
        raise ValueError(f"tag {str(tag)!r} is not a folder name inside {str(root)!r}")
    saved = len(list((root / str(tag)).glob("*zero_pp_rank_*_optim_states.pt")))
    world = engine.dp_world_size if hasattr(engine, "dp_world_size") else dist.get_world_size()
    if saved and saved != world:
        raise ValueError(
            f"the DeepSpeed checkpoint {str(root / str(tag))!r} was saved by {saved} data-parallel ranks and "
            f"this run has {world}: ZeRO's partitioned optimizer state loads only at the world size it was "
            f"saved with. Resume on {saved} ranks, or save BregTop's state in the world-size independent "
            "format (torch.distributed.checkpoint, see the README's checkpoint section) and load that"
        )
    with using_safe_load(engine):  # DeepSpeed's own loader would unpickle anything
        return engine.load_checkpoint(str(root), tag=tag, **kwargs)
