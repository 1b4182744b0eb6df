"""BregTop: the paper's Kronecker-factored optimizer family as one torch.optim.Optimizer.

Matrices of BregTop groups run Algorithm 1 (per block, stacked by shape); groups with
``bregtop=False`` and every 1-D tensor run AdamW inside the same optimizer object, which is
what the transformers Trainer and DeepSpeed expect. Under an initialised process group the
Kronecker blocks are shared out among the ranks: each block's state lives on one owner, which
receives the block's gradient and sends its update back (see ``bregtop_dist.distributed``).
This module keeps the torch.optim surface; the parts live beside it: the source of
placements (``distributed/source``), the step's work (``step_work``: compute, then commit)
and its Kronecker side (``kron_side``), the verdict (``verdict``), checkpointing
(``checkpointing``), the settings (``group_settings``).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from bregtop_dist.block_plan import BlockStack
from bregtop_dist.checkpointing import Checkpointing
from bregtop_dist.config import BregTopConfig
from bregtop_dist.distributed.checks import check_same_on_all_ranks
from bregtop_dist.distributed.layout import GroupPieces, global_shape
from bregtop_dist.distributed.source import FunctionSource, Source, TensorSource, param_name
from bregtop_dist.group_checks import (
    check_backend_on_devices,
    check_parts,
    check_placements,
    check_real,
    warn_embeddings_on_kronecker_side,
    wire_dtype,
)
from bregtop_dist.group_settings import GroupSettings
from bregtop_dist.kron_side import KronSide
from bregtop_dist.step_work import commit_step, compute_step
from bregtop_dist.verdict import (
    ADAMW_GRAD_LIMIT,
    BasisWarning,
    NonFiniteGradientError,
    NonFiniteStepError,
    judge,
)

__all__ = ["ADAMW_GRAD_LIMIT", "BregTop", "NonFiniteGradientError", "NonFiniteStepError", "wire_dtype"]

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


class BregTop(Checkpointing, torch.optim.Optimizer):
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
        self._kron = KronSide(wire_dtype(comm_dtype))
        self._built_params: list[list[Tensor]] = []  # as added, before any engine replaces them
        self._settings = GroupSettings()
        self._basis_warning = BasisWarning()
        self._agreed = False  # the ranks' settings were compared (at the first collective call)
        self._gathered = False
        self._gathered_adamw: dict[Tensor, dict[str, Any]] = {}
        self._source: Source = TensorSource([], self._built_params, process_group)
        super().__init__(params, defaults)
        self._source = TensorSource(self.param_groups, self._built_params, process_group)

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
        cfg = BregTopConfig.from_group(merged)  # validated here
        check_backend_on_devices(cfg, param_group.get("params"))
        check_parts(cfg, param_group, len(self.param_groups))
        check_real(param_group, len(self.param_groups))
        check_placements(param_group, len(self.param_groups))
        if self.param_groups and "param_names" in self.param_groups[0] and "param_names" not in param_group:
            # torch wants every group named or none: name this one by position
            tensors = param_group["params"]
            count = 1 if isinstance(tensors, Tensor) else len(tensors)
            param_group["param_names"] = [f"param_groups[{len(self.param_groups)}]['params'][{i}]" for i in range(count)]
        ungrouped = "bregtop" not in param_group and self.defaults["bregtop"]
        super().add_param_group(param_group)
        self._built_params.append(list(self.param_groups[-1]["params"]))
        if ungrouped:
            warn_embeddings_on_kronecker_side(self.param_groups[-1])

    @property
    def kron_stacks(self) -> dict[str, BlockStack]:
        """This rank's block stacks by key ``"<group>:<m>x<n>"`` (only blocks it owns)."""
        return self._kron.stacks

    def traffic(self) -> tuple[int, int]:
        """(elements sent, elements received) by this rank in BregTop's collectives so far."""
        return self._kron.traffic()

    def attach_source(self, source: Source) -> None:
        """Let an engine that took over the tensors (DeepSpeed ZeRO) tell which pieces this rank
        holds. Plans and Kronecker state made for the tensors before it are dropped; the
        AdamW-side state stays keyed by the model parameters (:attr:`built_params`)."""
        self._source = source
        self._kron.plans.clear()
        for p in list(self.state):  # made for the tensors before the engine: rebuilt for its pieces
            entry = self.state[p]
            entry.pop("kron", None)
            if not entry or float(entry.get("step", 1)) == 0.0:
                del self.state[p]

    def attach_shard_source(self, source: Callable[[bool], list[GroupPieces]], process_group: dist.ProcessGroup | None) -> None:
        """Deprecated: use :meth:`attach_source` with a :class:`~bregtop_dist.distributed.source.Source`."""
        warnings.warn("BregTop.attach_shard_source is deprecated; use attach_source(source)", DeprecationWarning, stacklevel=2)
        self.attach_source(FunctionSource(source, process_group, self._built_params))

    @property
    def built_params(self) -> list[list[Tensor]]:
        """The parameters of each group as they were added, whatever an engine put in
        ``param_groups`` since (DeepSpeed ZeRO swaps in flat partitions)."""
        return [list(ps) for ps in self._built_params]

    def param_name(self, gi: int, pi: int) -> str:
        """Name of parameter ``pi`` of group ``gi`` (from ``param_names`` when the group has them)."""
        return param_name(self.param_groups, gi, pi, self._built_params[gi][pi])

    def _agree_once(self) -> None:
        """Every rank built the optimizer with the same settings and parameter shapes (one
        all_gather_object, at the first collective call: the constructor runs none)."""
        if self._agreed:
            return
        settings: dict[str, Any] = {"comm_dtype": str(self._kron.comm_dtype)}
        for gi, group in enumerate(self.param_groups):
            for k, v in sorted(group.items()):
                if k not in ("params", "param_names"):
                    settings[f"param_groups[{gi}][{k!r}]"] = v
            settings[f"param_groups[{gi}] shapes"] = [global_shape(p) for p in self._built_params[gi]]
        check_same_on_all_ranks(settings, self._source.pg(), self._source.world()[1])
        self._agreed = True

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
        self._agree_once()
        self._drop_gathered()
        self._check_dense_grads()
        # Compute every group's step with nothing written, then read one verdict on every
        # rank and raise before anything changes, or commit everything.
        work = compute_step(self._source, self._settings, self._kron, self.state)
        judge(work, self._basis_warning)
        commit_step(work, self._kron, self.state)
        return loss

    def _check_dense_grads(self) -> None:
        """TypeError naming a parameter with a sparse gradient (before anything is read)."""
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                if p.grad is not None and p.grad.layout != torch.strided:
                    raise TypeError(
                        f"the gradient of {param_name(self.param_groups, gi, pi, p)} is sparse ({p.grad.layout}): "
                        "BregTop needs dense gradients (nn.Embedding(sparse=False), or torch.optim.SparseAdam for "
                        "that parameter); no parameter or optimizer state was changed by this step"
                    )
