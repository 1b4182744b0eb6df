"""BregTop: the paper's Kronecker-factored optimizer family as one torch.optim.Optimizer.

Matrices of BregTop groups run Algorithm 1 (per block, stacked by shape); groups with
``bregtop=False`` and every 1-D tensor run AdamW inside the same optimizer object, which is
what the transformers Trainer and DeepSpeed expect. Under an initialised process group the
Kronecker blocks are shared out among the ranks: each block's state lives on one owner, which
receives the block's gradient and sends its update back (see ``bregtop_dist.distributed``).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bregtop_dist.adamw import adamw_group_step, init_adamw_state
from bregtop_dist.block_plan import BlockStack, KronPlan, build_plan, is_kron_shape
from bregtop_dist.config import BregTopConfig
from bregtop_dist.core.block_state import KronBlockState, describe_value
from bregtop_dist.core.block_step import BlockHyper, BlockStepResult, Schedule, kron_block_step
from bregtop_dist.core.dispatch import resolve_backend
from bregtop_dist.core.finite import finite_rows, largest_magnitudes
from bregtop_dist.core.validate import ArgumentTypeError
from bregtop_dist.distributed.checks import agree_present, check_same_on_all_ranks, grad_maxima, step_verdict
from bregtop_dist.distributed.layout import (
    GroupShards,
    ParamShard,
    dtensor_shard,
    is_dtensor,
    replicated_shard,
)
from bregtop_dist.grouping import embedding_or_head_like
from bregtop_dist.load_checks import LoadProblem, first_on_every_rank, unforeseen
from bregtop_dist.state_format import (
    KRON,
    IncompleteStateDictWarning,
    KronTiles,
    adamw_entry_for_loading,
    adamw_for_saving,
    describe_tile,
    incomplete_message,
    saved_block,
    taken_per_rank,
    to_cpu_block,
)

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]
ShardSource = Callable[[bool], list[GroupShards]]

ADAMW_GRAD_LIMIT = math.sqrt(torch.finfo(torch.float32).max)
"""Largest |g| the AdamW side takes: its second moment holds g^2 in float32."""
COMM_DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or inf; raised on every rank before any state or parameter changes."""


class NonFiniteStepError(ArithmeticError):
    """Finite gradients that would make the optimizer state or an update leave the float32
    range (a gradient far outside the range the statistics have seen); raised on every rank
    before any state or parameter changes."""


def wire_dtype(comm_dtype: str | torch.dtype) -> torch.dtype:
    """The dtype on the wire that ``comm_dtype`` names; a ValueError naming the value and the choices."""
    if isinstance(comm_dtype, torch.dtype) and comm_dtype in COMM_DTYPES.values():
        return comm_dtype
    if isinstance(comm_dtype, str) and comm_dtype in COMM_DTYPES:
        return COMM_DTYPES[comm_dtype]
    raise ValueError(
        f"comm_dtype={comm_dtype!r} is not allowed; use one of {sorted(COMM_DTYPES)} or torch.float32/bfloat16"
    )


def _global_shape(p: Tensor) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 parameter keeps its shape in ds_shape


def _check_backend_on_devices(cfg: BregTopConfig, params: Any) -> None:
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


def _check_real(group: dict[str, Any], index: int) -> None:
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


def _warn_embeddings_on_kronecker_side(group: dict[str, Any]) -> None:
    """UserWarning when a group given without the paper's grouping holds matrices that look
    like embeddings or an output head (see :func:`~bregtop_dist.grouping.embedding_or_head_like`):
    they get Kronecker preconditioning, which the paper does not give them."""
    names = group.get("param_names") or [None] * len(group["params"])
    found = [
        name if name is not None else f"a {_global_shape(p)} matrix"
        for name, p in zip(names, group["params"]) if embedding_or_head_like(name, _global_shape(p))
    ]
    if found:
        warnings.warn(
            f"BregTop: {found[0]}{f' (and {len(found) - 1} more)' if len(found) > 1 else ''} looks like an "
            "embedding or output head and gets Kronecker preconditioning, since the parameters came without "
            "the paper's grouping, which trains these with AdamW. Use BregTop(param_groups(model), ...), or "
            "give them a group with bregtop=False; a group with bregtop=True keeps them here without this warning",
            UserWarning, stacklevel=4)


class BregTop(torch.optim.Optimizer):
    """Kronecker-factored optimizer of the BregTop family (Liu, Zhou, Zhao, 2026).

    ``method`` is one of the paper's Table 4 rows: ``shampoo, kl, vn-v1, vn-v2, f-v1,
    f-v2`` (every entry preconditioned, rho = 1) or ``bregtop-vn-v1, bregtop-vn-v2,
    bregtop-f-v1, bregtop-f-v2`` (top set by rho/q/c, defaults from appendix D); the default
    is ``kl``, the fastest row measured here (README, *Defaults*). Every
    setting is a field of :class:`~bregtop_dist.config.BregTopConfig` and may be set per
    param group; ``bregtop=False`` in a group runs it with AdamW (see ``param_groups``).

    Distributed runs: under an initialised process group (``process_group``, default the
    whole world) every Kronecker block gets one owner rank that holds its state. Plain
    parameters (DDP) are treated as replicated and the owners' updates are all-gathered;
    FSDP2 DTensor parameters and DeepSpeed ZeRO fragments are sharded and move with one
    all_to_all each way. ``comm_dtype`` (``"fp32"`` or ``"bf16"``) is the dtype on the wire.
    The result equals the single-process run up to rounding, whatever the world size.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float | Tensor = BregTopConfig.lr,
        *,
        process_group: dist.ProcessGroup | None = None,
        comm_dtype: str | torch.dtype = "fp32",
        **settings: Any,
    ) -> None:
        """``settings`` are the fields of :class:`~bregtop_dist.config.BregTopConfig` (its
        defaults are BregTop's), given by keyword: ``BregTop(params, lr=1e-3, method="kl")``.
        They are every group's defaults; a group may set any of them for itself."""
        config = BregTopConfig.from_mapping({"lr": lr, **settings}, where="BregTop", extra=("process_group", "comm_dtype"))
        defaults = config.as_defaults()
        defaults["lr"] = lr  # a Tensor lr stays a Tensor, as in torch's optimizers
        self._comm_dtype = wire_dtype(comm_dtype)
        self._process_group = process_group
        self._plans: dict[str, KronPlan] = {}
        self._shard_source: ShardSource | None = None
        self._built_params: list[list[Tensor]] = []  # as added, before any engine replaces them
        self._warned_basis = False
        self._gathered = False  # consolidate_state_dict ran since the last step (rank `to` holds every block)
        self._gathered_adamw: dict[Tensor, dict[str, Any]] = {}  # and full AdamW state of DTensor params
        super().__init__(params, defaults)
        self._check_ranks_agree()

    @classmethod
    def from_config(
        cls, params: ParamsT, config: BregTopConfig, *, process_group: dist.ProcessGroup | None = None,
        comm_dtype: str | torch.dtype = "fp32",
    ) -> BregTop:
        """BregTop with every group's defaults taken from ``config``."""
        return cls(params, process_group=process_group, comm_dtype=comm_dtype, **config.as_defaults())

    def __repr__(self) -> str:
        """Each group's resolved settings: the method's rho/q/c/exponent filled in, and only
        the AdamW settings on an AdamW group."""
        lines = [f"{type(self).__name__} ("]
        for gi, group in enumerate(self.param_groups):
            try:
                cfg = BregTopConfig.from_group(group)
            except (TypeError, ValueError):  # a bad value set since: the next step names it
                return super().__repr__()
            if cfg.bregtop:
                shown = {k: v for k, v in cfg.as_defaults().items() if not k.startswith("adam_") and k != "bregtop"}
                shown.update(rho=cfg.resolved_rho, q=cfg.resolved_q, c=cfg.resolved_c, exponent=cfg.resolved_exponent)
                kind = "Kronecker (matrices; 1-D tensors on AdamW)"
            else:
                shown = {"lr": cfg.lr, "betas": cfg.resolved_adam_betas, "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay}
                kind = "AdamW"
            lines.append(f"Parameter Group {gi}: {kind}, {len(group['params'])} tensors")
            lines += [f"    {k}: {shown[k]}" for k in sorted(shown)]
        return "\n".join(lines + [")"])

    # ----------------------------------------------------------------- groups and ranks
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its settings, and its backend on its parameters' devices, are
        validated before the optimizer changes."""
        params = param_group.get("params")
        if params is not None and not isinstance(params, (Tensor, set, list)):
            param_group["params"] = list(params)  # a generator is read once (torch lists it too)
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _check_backend_on_devices(BregTopConfig.from_group(merged), param_group.get("params"))
        _check_real(param_group, len(self.param_groups))
        if self.param_groups and "param_names" in self.param_groups[0] and "param_names" not in param_group:
            # torch wants every group named or none: name this one by position
            tensors = param_group["params"]
            count = 1 if isinstance(tensors, Tensor) else len(tensors)
            param_group["param_names"] = [f"param_groups[{len(self.param_groups)}]['params'][{i}]" for i in range(count)]
        ungrouped = "bregtop" not in param_group and self.defaults["bregtop"]
        super().add_param_group(param_group)
        self._built_params.append(list(self.param_groups[-1]["params"]))
        if ungrouped:
            _warn_embeddings_on_kronecker_side(self.param_groups[-1])

    @property
    def kron_stacks(self) -> dict[str, BlockStack]:
        """This rank's block stacks by key ``"<group>:<m>x<n>"`` (only blocks it owns)."""
        return {stack.key: stack for plan in self._plans.values() for stack in plan.stacks.values()}

    def traffic(self) -> tuple[int, int]:
        """(elements sent, elements received) by this rank in BregTop's collectives so far."""
        return (
            sum(p.exchange.traffic.sent for p in self._plans.values()),
            sum(p.exchange.traffic.received for p in self._plans.values()),
        )

    def _group(self) -> dist.ProcessGroup | None:
        for group in self.param_groups:
            for p in group["params"]:
                if is_dtensor(p):
                    return p.device_mesh.get_group()  # type: ignore[attr-defined]
        return self._process_group

    def _world(self) -> tuple[int, int]:
        if not (dist.is_available() and dist.is_initialized()):
            return 0, 1
        group = self._group()
        return dist.get_rank(group), dist.get_world_size(group)

    def _check_ranks_agree(self) -> None:
        rank, world = self._world()
        settings: dict[str, Any] = {"comm_dtype": str(self._comm_dtype)}
        for gi, group in enumerate(self.param_groups):
            for k, v in sorted(group.items()):
                if k not in ("params", "param_names"):
                    settings[f"param_groups[{gi}][{k!r}]"] = v
            settings[f"param_groups[{gi}] shapes"] = [_global_shape(p) for p in group["params"]]
        check_same_on_all_ranks(settings, self._group(), world)

    def attach_shard_source(self, source: ShardSource, process_group: dist.ProcessGroup | None) -> None:
        """Let an engine (DeepSpeed ZeRO) say which elements this rank holds: ``source()``
        returns the groups visible to the current ``step`` call (every group when passed True);
        ``process_group`` is the ranks among which the blocks are shared. The AdamW-side state
        stays keyed by the model parameters (:attr:`built_params`)."""
        self._shard_source = source
        self._process_group = process_group
        self._plans.clear()
        for p in list(self.state):  # made for the tensors before the engine: rebuilt for its fragments
            entry = self.state[p]
            entry.pop(KRON, None)
            if not entry or float(entry.get("step", 1)) == 0.0:
                del self.state[p]

    @property
    def built_params(self) -> list[list[Tensor]]:
        """The parameters of each group as they were added, whatever an engine put in
        ``param_groups`` since (DeepSpeed ZeRO swaps in flat partitions)."""
        return [list(ps) for ps in self._built_params]

    def param_name(self, gi: int, pi: int) -> str:
        """Name of parameter ``pi`` of group ``gi`` (from ``param_names`` when the group has them)."""
        return self._name(gi, pi, self._built_params[gi][pi])

    def _name(self, gi: int, pi: int, p: Tensor) -> str:
        names = self.param_groups[gi].get("param_names")
        if names and pi < len(names):
            return str(names[pi])
        return f"param_groups[{gi}]['params'][{pi}] (shape {_global_shape(p)})"

    def _views(self, every_group: bool = False) -> list[GroupShards]:
        """The param groups this ``step`` call works on (all of them with ``every_group``),
        as shards of this rank."""
        if self._shard_source is not None:
            return self._shard_source(every_group)
        _, world = self._world()
        views = []
        for gi, group in enumerate(self.param_groups):
            self._check_not_flattened(gi, group)
            shards = [
                dtensor_shard(p, self._name(gi, pi, p)) if is_dtensor(p) else replicated_shard(p, self._name(gi, pi, p), world)
                for pi, p in enumerate(group["params"])
            ]
            if shards:
                views.append(GroupShards(str(gi), gi, group, shards))
        return views

    def _check_not_flattened(self, gi: int, group: dict[str, Any]) -> None:
        """An engine (DeepSpeed ZeRO) that swapped a group's matrices for flat partitions
        without telling BregTop would silently turn it into AdamW: refuse instead."""
        params = group["params"]
        if (
            gi < len(self._built_params) and any(len(_global_shape(p)) >= 2 for p in self._built_params[gi])
            and group.get("bregtop", True)
            and params and all(p.ndim < 2 for p in params)
        ):
            raise RuntimeError(
                f"param group {gi} had matrices when BregTop was built but now holds only flat tensors "
                f"(shapes {[tuple(p.shape) for p in params][:3]}): an engine such as DeepSpeed ZeRO replaced "
                "them. Build the engine with bregtop_dist.integrations.deepspeed.initialize, or after "
                "deepspeed.initialize call bregtop_dist.integrations.deepspeed.attach(bregtop, engine.optimizer), "
                "or after accelerator.prepare bregtop_dist.integrations.deepspeed.attach_prepared(optimizer) "
                "(in a transformers Trainer: callbacks=[bregtop_dist.integrations.hf.AttachZeroFragments()])"
            )

    # ------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimizer step. Raises :class:`NonFiniteGradientError` for a NaN/inf gradient
        and :class:`NonFiniteStepError` for finite gradients whose step would leave the
        float32 range, on every rank, before changing anything; a bad setting put into
        ``param_groups`` since construction raises ValueError before any group steps."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._drop_gathered()
        _, world = self._world()
        group = self._group()
        self._check_dense_grads()
        views = self._views()
        configs = [BregTopConfig.from_group(view.settings) for view in views]  # every group, first
        every = [s for v in views for s in v.shards]
        limits = [
            math.inf if is_kron_shape(s.shape, cfg.bregtop) else ADAMW_GRAD_LIMIT
            for view, cfg in zip(views, configs) for s in view.shards
        ]
        # Compute every step first, with nothing written, then read one verdict (gradients
        # finite, steps finite) and raise before anything changes, or commit everything.
        present = agree_present(every, group, world)
        grad_max = grad_maxima(every)
        flags = iter(present)
        work: list[tuple[BregTopConfig, list[ParamShard], _PendingKron | None]] = []
        for view, cfg in zip(views, configs):
            shards = [_with_zero_grad(s) if a and s.grad is None else s for s, a in zip(view.shards, flags)]
            kron_shards = [s for s in shards if is_kron_shape(s.shape, cfg.bregtop)]
            pending = None
            if kron_shards:
                plan = self._plan(view, kron_shards, cfg, *self._world())
                pending = self._kron_compute(plan, kron_shards, cfg, group)
            work.append((cfg, shards, pending))
        pendings = [p for _, _, p in work if p is not None]
        step_max, failed = _step_extremes(pendings, grad_max.device)
        verdict = step_verdict(grad_max, step_max, failed, limits, group, self._world()[0], world)
        if verdict.non_finite is not None:
            raise NonFiniteGradientError(
                f"the gradient of {every[verdict.non_finite].name} contains NaN or inf; "
                "no parameter or optimizer state was changed by this step"
            )
        if verdict.too_large is not None:
            raise NonFiniteStepError(
                f"the gradient of {every[verdict.too_large].name} has entries up to "
                f"{verdict.largest[verdict.too_large]:.3g}; its AdamW second moment (the squared gradient) "
                f"leaves the float32 range above {ADAMW_GRAD_LIMIT:.3g} (scale the loss down or clip "
                "gradients); no parameter or optimizer state was changed by this step"
            )
        if any(verdict.step_bad):
            self._raise_non_finite_step(pendings, verdict.step_bad)
        if verdict.basis_failed:
            self._warn_basis(pendings)
        for cfg, shards, pending in work:
            if pending is not None:
                self._kron_commit(pending, cfg, group)
            side = [s for s in shards if s.grad is not None and not is_kron_shape(s.shape, cfg.bregtop)
                    and s.value.numel() > 0]
            side_grads: list[Tensor] = [s.grad for s in side if s.grad is not None]
            if cfg.maximize and side_grads:
                side_grads = list(torch._foreach_neg(side_grads))
            adamw_group_step(
                [s.value for s in side], side_grads, [self.state[s.param] for s in side],
                lr=cfg.lr, betas=cfg.resolved_adam_betas, eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
            )
        return loss

    def _check_dense_grads(self) -> None:
        """TypeError naming a parameter with a sparse gradient (before anything is read)."""
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise TypeError(
                        f"the gradient of {self._name(gi, pi, p)} is sparse ({p.grad.layout}): BregTop needs dense "
                        "gradients (nn.Embedding(sparse=False), or torch.optim.SparseAdam for that parameter); "
                        "no parameter or optimizer state was changed by this step"
                    )

    def _plan(self, view: GroupShards, shards: list[ParamShard], cfg: BregTopConfig, rank: int, world: int) -> KronPlan:
        plan = self._plans.get(view.key)
        if plan is None:
            plan = build_plan(
                view.key, shards, cfg.max_precond_dim, cfg.precondition_frequency, cfg.stagger_refresh, rank, world
            )
            self._plans[view.key] = plan
            self._register_tiles(plan)
        return plan

    def _kron_compute(
        self, plan: KronPlan, shards: list[ParamShard], cfg: BregTopConfig, group: dist.ProcessGroup | None
    ) -> _PendingKron:
        """Exchange the gradients and run Algorithm 1 on this rank's blocks, committing nothing."""
        active = [s.grad is not None for s in shards]
        device = shards[0].value.device
        hyper = cfg.block_hyper()
        if plan.views is not None and all(active):  # every block, from this rank's own parameters
            grads = {shape: stack.grad_buffer(device) for shape, stack in plan.stacks.items()}
            plan.views.gather(shards, grads)
            if cfg.maximize and grads:
                torch._foreach_neg_(list(grads.values()))
            steps = [self._step_stack(stack, list(range(len(stack.block_ids))), grads[shape], hyper)
                     for shape, stack in plan.stacks.items()]
            return _PendingKron(plan, shards, active, steps, whole=True)
        buffers: dict[int, Tensor] = {}
        gathered: list[tuple[BlockStack, list[int], Tensor]] = []
        for stack in plan.stacks.values():
            rows = [k for k, b in enumerate(stack.block_ids) if active[plan.blocks[b].shard]]
            if not rows:
                continue
            grad = torch.empty((len(rows), *stack.shape), dtype=torch.float32, device=device)
            buffers.update((stack.block_ids[k], g) for k, g in zip(rows, grad))
            gathered.append((stack, rows, grad))
        plan.exchange.gather_grads(shards, active, buffers, self._comm_dtype, group)
        if cfg.maximize and gathered:
            torch._foreach_neg_([grad for _, _, grad in gathered])
        steps = [self._step_stack(stack, rows, grad, hyper) for stack, rows, grad in gathered]
        return _PendingKron(plan, shards, active, steps)

    def _step_stack(self, stack: BlockStack, rows: list[int], grad: Tensor, hyper: BlockHyper) -> _StackStep:
        """Algorithm 1 on the blocks ``rows`` of ``stack`` (gradients ``grad``), not committed.
        A whole stack whose blocks are all ready at one step count runs on a schedule the host
        already knows (no read of the state's counts)."""
        base = stack.state if stack.state is not None else stack.empty_state(grad.device)
        whole = len(rows) == len(stack.block_ids)
        taken = base.uniform_step() if whole else None
        if taken is not None:
            schedule = Schedule(stack.refresh_rows(taken + 1, hyper.frequency, grad.device))
            result = kron_block_step(base, grad, hyper, stack.offsets, schedule)
            result.state.remember_uniform_step(taken + 1)
            return _StackStep(stack, base, rows, whole, grad, result, schedule.refresh is not None)
        idx = torch.tensor(rows, dtype=torch.int64)  # CPU, like the step counts
        result = kron_block_step(base if whole else base.select(idx), grad, hyper, stack.offsets.index_select(0, idx))
        return _StackStep(stack, base, rows, whole, grad, result, result.failed is not None)

    def _raise_non_finite_step(self, pending: list[_PendingKron], bad: list[bool]) -> None:
        """NonFiniteStepError naming the first non-finite block of this rank, or the rank."""
        rank = self._world()[0]
        unchanged = "no parameter or optimizer state was changed by this step"
        if not bad[rank]:
            culprit = bad.index(True)
            raise NonFiniteStepError(f"the step went non-finite on rank {culprit} (see its error); {unchanged}")
        for plan_step in pending:
            for s in plan_step.steps:
                ok = (s.result.state.finite_blocks() & finite_rows(s.result.update)).tolist()
                if all(ok):
                    continue
                first = ok.index(False)
                blk = plan_step.plan.blocks[s.stack.block_ids[s.rows[first]]]
                name = plan_step.shards[blk.shard].name
                largest = float(s.grad[first].abs().max())
                raise NonFiniteStepError(
                    f"the step would make the optimizer state or the update of {name} (a {blk.shape[0]}x"
                    f"{blk.shape[1]} Kronecker block) non-finite in float32: its gradient (largest entry "
                    f"{largest:.3g}) is out of the range its statistics can represent next to their current "
                    f"values (scale the loss down or clip gradients); {unchanged}"
                )
        raise NonFiniteStepError(f"the step went non-finite on rank {rank}; {unchanged}")

    def _kron_commit(self, pending: _PendingKron, cfg: BregTopConfig, group: dist.ProcessGroup | None) -> None:
        """Store the computed states, then decay and update the parameters."""
        for s in pending.steps:
            if s.whole:
                s.stack.state = s.result.state
            else:
                s.base.assign(torch.tensor(s.rows, dtype=torch.int64), s.result.state)
                s.stack.state = s.base
        decaying = [shard.value for shard, a in zip(pending.shards, pending.active) if a]
        if cfg.weight_decay and decaying:
            torch._foreach_mul_(decaying, 1.0 - cfg.lr * cfg.weight_decay)
        if pending.whole and pending.plan.views is not None and self._world()[1] == 1:
            pending.plan.views.apply(pending.shards, {s.stack.shape: s.result.update for s in pending.steps}, cfg.lr)
            return
        updates: dict[int, Tensor] = {}
        for s in pending.steps:
            updates.update((s.stack.block_ids[k], u) for k, u in zip(s.rows, s.result.update))
        pending.plan.exchange.apply_updates(pending.shards, pending.active, updates, cfg.lr, self._comm_dtype, group)

    def _warn_basis(self, pending: list[_PendingKron]) -> None:
        if self._warned_basis:
            return
        failed = [s.result.failed for p in pending for s in p.steps if s.result.failed is not None]
        count = int(sum(int(f.sum()) for f in failed))
        if count == 0:
            return
        self._warned_basis = True
        warnings.warn(
            f"BregTop: eigenbasis computation failed in float32 and float64 for "
            f"{count} block(s); they keep their previous basis (warned once)",
            RuntimeWarning,
            stacklevel=4,
        )

    # ------------------------------------------------------------------- state dict
    def _logical(self) -> list[list[Tensor]]:
        if self._shard_source is not None:  # the engine swapped param_groups' tensors for fragments
            return self.built_params
        return [list(g["params"]) for g in self.param_groups]

    def _all_plans(self) -> list[GroupShards]:
        """Plans for every group (they are otherwise made by the first step that needs them),
        and the AdamW side's not-yet-stepped state; returns every group's shards."""
        rank, world = self._world()
        views = self._views(every_group=True)
        for view in views:
            cfg = BregTopConfig.from_group(view.settings)
            kron = [s for s in view.shards if is_kron_shape(s.shape, cfg.bregtop)]
            if kron:
                self._plan(view, kron, cfg, rank, world)
            for s in view.shards:
                if not is_kron_shape(s.shape, cfg.bregtop) and not self.state.get(s.param):
                    init_adamw_state(self.state[s.param], s.value)
        return views

    def _register_tiles(self, plan: KronPlan) -> None:
        """``state[p]["kron"]`` for every Kronecker parameter of ``plan`` (on every rank, so
        that every rank's state names every parameter), holding the tiles this rank owns."""
        tiles = [self.state[p].setdefault(KRON, KronTiles()) for p in plan.params]
        for stack in plan.stacks.values():
            for row, bid in enumerate(stack.block_ids):
                blk = plan.blocks[bid]
                tiles[blk.shard].own(blk.tile, stack, row)

    def _tiles(self) -> list[KronTiles]:
        return [v[KRON] for v in self.state.values() if isinstance(v.get(KRON), KronTiles)]

    def _drop_gathered(self) -> None:
        if self._gathered:
            for tiles in self._tiles():
                tiles.gathered.clear()
            self._gathered_adamw = {}
            self._gathered = False

    def state_dict(self) -> dict[str, Any]:
        """torch's layout, world-size independent (see :mod:`bregtop_dist.state_format`).

        ``state`` holds, per parameter, the AdamW-side state (DTensors for DTensor parameters)
        or ``{"kron": {tile: block fields}}`` with the Kronecker blocks this rank owns, plus the
        other ranks' blocks on the rank that last ran :meth:`consolidate_state_dict` (until
        the next step). Collective-free: it may be called on one rank only. Every rank's dict
        together (torch.distributed.checkpoint), or one consolidated dict, loads at any world
        size.

        Warns (:class:`~bregtop_dist.state_format.IncompleteStateDictWarning`, once per call,
        naming the fix for each saver) when taken on a rank of a multi-process run whose dict
        lacks other ranks' blocks and no :meth:`consolidate_state_dict` ran since the last
        step: what a rank-0 saver would write and resuming would refuse. Not inside
        torch.distributed.checkpoint's ``get_state_dict`` / ``get_optimizer_state_dict`` or
        Accelerate's ``prepare`` (every rank takes its own part there), and not under an engine
        that saves every rank's state itself (DeepSpeed ZeRO)."""
        self._all_plans()
        self._warn_if_incomplete()
        index: dict[int, int] = {}
        groups = []
        for group, params in zip(self.param_groups, self._logical()):
            ids = []
            for p in params:
                index.setdefault(id(p), len(index))
                ids.append(index[id(p)])
            groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": ids})
        state: dict[int, dict[str, Any]] = {i: {} for i in index.values()}  # every parameter, as DCP expects
        for p, entry in self.state.items():
            if id(p) not in index:
                continue
            full = self._gathered_adamw.get(p)
            state[index[id(p)]] = {
                k: {t: dict(b) for t, b in v.items()} if k == KRON else full[k] if full else adamw_for_saving(p, v)
                for k, v in entry.items()
            }
        return {"state": state, "param_groups": groups}

    def _warn_if_incomplete(self) -> None:
        """The warning :meth:`state_dict` gives on a rank whose dict alone cannot be resumed.
        After a consolidation every rank is quiet: the whole state is on rank ``to``, and
        Accelerate's ``save_state`` takes every rank's dict but writes the main process's."""
        rank, world = self._world()
        if world == 1 or self._gathered or self._shard_source is not None:
            return
        owners = [blk.owner for plan in self._plans.values() for blk in plan.blocks]
        held = owners.count(rank)
        if held < len(owners) and not taken_per_rank():
            warnings.warn(incomplete_message(rank, world, held, len(owners)), IncompleteStateDictWarning, stacklevel=3)

    def consolidate_state_dict(self, to: int = 0) -> None:
        """Gather every rank's Kronecker blocks to rank ``to`` (a rank of the optimizer's
        process group), so that its next :meth:`state_dict` holds the whole state, for savers
        that write rank ``to``'s dict alone (Accelerate's ``save_state`` and the Trainer under
        DDP). A collective: call it on every rank. The gathered copies are dropped at the next
        step; until then no rank's :meth:`state_dict` warns that it is incomplete. The AdamW-side
        state of DTensor parameters is gathered too (that of plain parameters is replicated)."""
        rank, world = self._world()
        if not 0 <= to < world:
            raise ValueError(f"to={to!r} is not a rank of the optimizer's {world}-rank process group")
        views = self._all_plans()
        self._drop_gathered()
        if world == 1:
            return
        mine = {
            (plan.key, bid): to_cpu_block(stack.state.block(row))
            for plan in self._plans.values() for stack in plan.stacks.values() if stack.state is not None
            for row, bid in enumerate(stack.block_ids)
        }
        group = self._group()
        received: list[Any] | None = [None] * world if rank == to else None
        dst = to if group is None else dist.get_global_rank(group, to)
        dist.gather_object(mine, received, dst=dst, group=group)
        adamw = self._gather_sharded_adamw(views)
        self._gathered = True
        if received is None:
            return
        for r, blocks in enumerate(received):
            if r == rank:
                continue
            for (key, bid), block in blocks.items():
                plan = self._plans[key]
                blk = plan.blocks[bid]
                self.state[plan.params[blk.shard]][KRON].gathered[str(blk.tile)] = block
        self._gathered_adamw = adamw

    def _gather_sharded_adamw(self, views: list[GroupShards]) -> dict[Tensor, dict[str, Any]]:
        """Full copies of the AdamW-side state of DTensor parameters (a collective per
        parameter, in the same order on every rank; ranks whose shard is empty add nothing)."""
        from torch.distributed.tensor import DTensor

        full: dict[Tensor, dict[str, Any]] = {}
        for view in views:
            cfg = BregTopConfig.from_group(view.settings)
            for s in view.shards:
                if is_kron_shape(s.shape, cfg.bregtop) or not is_dtensor(s.param):
                    continue
                mine = self.state.get(s.param, {})
                step = mine.get("step", torch.zeros((), dtype=torch.float32)).reshape(1).to(s.value.device, copy=True)
                dist.all_reduce(step, op=dist.ReduceOp.MAX, group=s.param.device_mesh.get_group())  # type: ignore[attr-defined]
                if float(step) == 0.0:
                    continue
                entry: dict[str, Any] = {"step": step.reshape(()).cpu()}
                for key in ("exp_avg", "exp_avg_sq"):
                    local = mine.get(key, torch.zeros_like(s.value, dtype=torch.float32))
                    whole = DTensor.from_local(local, s.param.device_mesh, s.param.placements, run_check=False,  # type: ignore[attr-defined]
                                               shape=s.param.shape, stride=s.param.stride())
                    entry[key] = whole.full_tensor().cpu()
                full[s.param] = entry
        return full

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` saved at any world size (or torch.distributed.checkpoint's
        form of it, keyed by parameter name); this rank takes the Kronecker blocks it owns.

        Everything is read, checked and built (on its devices) before anything changes, and the
        ranks agree on it: when any rank finds a problem (the dict's layout, a group's settings,
        a missing block, a field of the wrong dtype or device, a NaN or inf in a factor or a
        moment, a negative count or second moment) or fails while reading, every rank raises the
        same ValueError naming the first one (an ArgumentTypeError for a setting of the wrong
        type) and no rank changes. Under a process group every rank must call it (one
        all_gather_object)."""
        rank, world = self._world()
        cause: Exception | None = None
        try:
            loaded, problem = self._read_for_loading(state_dict, rank, world)
        except Exception as err:  # noqa: BLE001 - raised on every rank below, once every rank knows
            loaded, problem, cause = None, unforeseen(err, rank, world), err
        first = first_on_every_rank(problem, self._group(), world)
        if first is not None:
            raise first.error() from (cause if first == problem else None)
        assert loaded is not None
        self._commit_load(loaded)

    def _read_for_loading(
        self, state_dict: Any, rank: int, world: int
    ) -> tuple[_Loaded | None, LoadProblem | None]:
        """What loading ``state_dict`` puts in place, read, checked and built without changing
        the optimizer's state or settings, or the first problem this rank finds. Plans are
        made for every group on the way (as :meth:`state_dict` makes them)."""
        parts = _saved_parts(state_dict)
        if isinstance(parts, LoadProblem):
            return None, parts
        saved_groups, saved_by_key = parts
        settings = self._saved_settings(saved_groups)
        if isinstance(settings, LoadProblem):
            return None, settings
        key_to_param: dict[Any, Tensor] = {}
        for saved, params in zip(saved_groups, self._logical()):
            key_to_param.update(zip(saved["params"], params))
        views = self._all_plans()
        saved_state = {id(key_to_param[k]): v for k, v in saved_by_key.items() if k in key_to_param}
        if "kron_blocks" in state_dict:  # the format before tiles: per-rank stacks, same world size only
            try:
                saved_state = self._from_stacked(state_dict, saved_state, world)
            except ValueError as err:
                return None, LoadProblem((0, 1 + len(saved_groups)), "", str(err))
        shards = {id(s.param): s for view in views for s in view.shards}
        stacks, problem = self._take_blocks(saved_state)
        if problem is not None:
            return None, problem
        adamw, problem = self._take_adamw(saved_state, list(key_to_param.values()), shards, rank)
        if problem is not None:
            return None, problem
        return _Loaded(settings, adamw, stacks), None

    def _saved_settings(self, saved_groups: list[Any]) -> list[dict[str, Any]] | LoadProblem:
        """Each saved group's settings (everything but ``params``), checked against this
        optimizer's groups as the constructor checks settings, or the first problem: the
        number of groups, a group that is not a dict with a list of params, a different number
        of params, a refused setting."""
        if len(saved_groups) != len(self.param_groups):
            return LoadProblem(
                (0, 0), "", f"the state dict has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}")
        out = []
        for gi, (saved, group, params) in enumerate(zip(saved_groups, self.param_groups, self._logical())):
            position = (0, 1 + gi)
            if not isinstance(saved, Mapping) or not isinstance(saved.get("params"), (list, tuple)):
                return LoadProblem(position, f"param group {gi}",
                                   f"expected a dict with a list 'params', got {describe_value(saved)}")
            if len(saved["params"]) != len(params):
                return LoadProblem(position, "", f"param group {gi} has {len(saved['params'])} params in the "
                                   f"state dict and {len(params)} in this optimizer")
            settings = {k: v for k, v in saved.items() if k != "params"}
            try:
                BregTopConfig.from_group({**group, **settings})
            except (TypeError, ValueError) as err:
                return LoadProblem(position, f"the settings of param group {gi}", str(err),
                                   wrong_type=isinstance(err, ArgumentTypeError))
            out.append(settings)
        return out

    def _take_blocks(
        self, saved_state: dict[int, Any]
    ) -> tuple[list[tuple[BlockStack, KronBlockState]], LoadProblem | None]:
        """A new state for every stack of this rank, built on its plan's device from the saved
        blocks (keyed by id of parameter, then tile), or the first block that is missing or
        cannot be a block's state (see :meth:`KronBlockState.check_block`)."""
        problems: list[LoadProblem] = []
        rows: list[tuple[BlockStack, KronPlan, list[Mapping[str, Tensor]]]] = []
        for pi, plan in enumerate(self._plans.values()):
            for stack in plan.stacks.values():
                taken: list[Mapping[str, Tensor]] = []
                for bid in stack.block_ids:
                    blk = plan.blocks[bid]
                    block = saved_block(saved_state.get(id(plan.params[blk.shard])), blk.tile)
                    why = "it is missing" if block is None else KronBlockState.check_block(block, *blk.shape)
                    if why is None:
                        taken.append(block)  # type: ignore[arg-type]
                    else:
                        where = describe_tile(plan.names[blk.shard], blk.tile, blk.shape)
                        problems.append(LoadProblem((1 + pi, bid), where, why, missing_block=block is None))
                rows.append((stack, plan, taken))
        if problems:
            return [], min(problems, key=lambda p: p.position)
        return [(stack, KronBlockState.from_blocks(taken, plan.device)) for stack, plan, taken in rows], None

    def _take_adamw(
        self, saved_state: dict[int, Any], params: list[Tensor], shards: dict[int, ParamShard], rank: int,
    ) -> tuple[dict[Tensor, dict[str, Tensor]], LoadProblem | None]:
        """This rank's AdamW-side entries, checked (see :func:`adamw_entry_for_loading`) and
        copied to their devices in float32 (the step counter on the CPU, where the host reads
        it), or the first problem. ``params`` are the parameters in the state dict's order."""
        kron_params = {id(p) for plan in self._plans.values() for p in plan.params}
        adamw: dict[Tensor, dict[str, Tensor]] = {}
        for i, p in enumerate(params):
            entry = saved_state.get(id(p))
            if id(p) in kron_params or entry is None or id(p) not in shards:
                continue
            shard = shards[id(p)]
            try:
                taken = adamw_entry_for_loading(shard, rank, entry)
            except ValueError as err:
                return {}, LoadProblem((1 + len(self._plans), i), f"the AdamW-side state of {shard.name}", str(err))
            if taken:
                adamw[p] = {
                    k: v.detach().to("cpu" if k == "step" else shard.value.device, torch.float32, copy=True)
                    for k, v in taken.items()
                }
        return adamw, None

    def _commit_load(self, loaded: _Loaded) -> None:
        """Put a load every rank agreed on in place: plain assignments of what
        :meth:`_read_for_loading` built, nothing that can fail half-way."""
        for group, settings in zip(self.param_groups, loaded.settings):
            group.update(settings)
        self.state.clear()
        self._gathered, self._gathered_adamw = False, {}
        for p, entry in loaded.adamw.items():
            self.state[p] = entry
        for stack, state in loaded.stacks:
            stack.state = state
        for plan in self._plans.values():
            self._register_tiles(plan)

    def _from_stacked(self, state_dict: dict[str, Any], saved_state: dict[int, Any], world: int) -> dict[int, Any]:
        """A state dict of the earlier format (``kron_blocks`` per stack of this rank) in tiles,
        which is possible at the world size it was saved with."""
        saved_world = state_dict.get("world_size", 1)
        if saved_world != world:
            raise ValueError(
                f"the state dict was saved with world_size={saved_world} in BregTop's earlier per-rank format "
                f"(kron_blocks), and this run has {world}; that format loads only at the world size it was saved "
                "with. Load it there and save again: the current format loads at any world size"
            )
        out = {k: dict(v) for k, v in saved_state.items()}
        stacks = self.kron_stacks
        for key, tensors in state_dict["kron_blocks"].items():
            stack = stacks.get(key)
            if stack is None:
                raise ValueError(f"the state dict has block stack {key!r}, unknown to this optimizer on this rank")
            plan = self._plans[stack.plan]
            for row, bid in enumerate(stack.block_ids):
                blk = plan.blocks[bid]
                entry = out.setdefault(id(plan.params[blk.shard]), {})
                entry.setdefault(KRON, {})[str(blk.tile)] = {k: v[row] for k, v in tensors.items()}
        return out


@dataclass
class _StackStep:
    """One stack's computed step: the state it started from, the rows it ran, the result."""

    stack: BlockStack
    base: KronBlockState
    rows: list[int]  # rows of the stack
    whole: bool
    grad: Tensor
    result: BlockStepResult
    refreshed: bool  # some basis was recomputed (or initialised): the bases changed


@dataclass
class _PendingKron:
    """A param group's computed Kronecker step, waiting for the finiteness verdict."""

    plan: KronPlan
    shards: list[ParamShard]
    active: list[bool]
    steps: list[_StackStep]
    whole: bool = False  # every block of every owned stack, gathered through the plan's views


def _step_extremes(pending: list[_PendingKron], device: torch.device) -> tuple[Tensor, Tensor]:
    """On the device, no host read: the largest |x| over everything the pending Kronecker
    steps computed (NaN or inf when something is non-finite), and
    whether some eigenbasis computation failed."""
    changed = [t for p in pending for s in p.steps
               for t in (*s.result.state.changed_by_step(s.refreshed), s.result.update) if t.numel()]
    step_max = torch.zeros((), dtype=torch.float32, device=device)
    if changed:
        step_max = largest_magnitudes(changed).amax()
    fails = [s.result.failed for p in pending for s in p.steps if s.result.failed is not None]
    failed = torch.cat(fails).any() if fails else torch.zeros((), dtype=torch.bool, device=device)
    return step_max, failed


@dataclass
class _Loaded:
    """What a load puts in place, all of it built before the ranks agree: each group's saved
    settings, the AdamW-side entries (on their devices), a new state for each owned stack."""

    settings: list[dict[str, Any]]
    adamw: dict[Tensor, dict[str, Tensor]]
    stacks: list[tuple[BlockStack, KronBlockState]]


def _saved_parts(state_dict: Any) -> tuple[list[Any], Mapping[Any, Any]] | LoadProblem:
    """A state dict's param groups and per-parameter state, or what is wrong with its layout."""
    if not isinstance(state_dict, Mapping):
        return LoadProblem((0, 0), "", "a state dict is a dict with 'state' and 'param_groups', got "
                           f"{describe_value(state_dict)}")
    for key in ("state", "param_groups"):
        if key not in state_dict:
            return LoadProblem((0, 0), "", f"the state dict has no {key!r} key (its keys: {list(state_dict)[:8]})")
    groups, state = state_dict["param_groups"], state_dict["state"]
    if not isinstance(groups, (list, tuple)):
        return LoadProblem((0, 0), "", f"the state dict's 'param_groups' is {describe_value(groups)}, expected a "
                           "list of dicts, one per param group")
    if not isinstance(state, Mapping):
        return LoadProblem((0, 0), "", f"the state dict's 'state' is {describe_value(state)}, expected a dict "
                           "of per-parameter entries")
    return list(groups), state


def _with_zero_grad(shard: ParamShard) -> ParamShard:
    """``shard`` with zeros for a gradient it lacks on this rank but has on another."""
    return dataclasses.replace(shard, grad=torch.zeros_like(shard.value))
