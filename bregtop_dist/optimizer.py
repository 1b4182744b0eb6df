"""BregTop: the paper's Kronecker-factored optimizer family as one torch.optim.Optimizer.

Matrices of BregTop groups run Algorithm 1 (per block, stacked by shape); groups with
``bregtop=False`` and every 1-D tensor run AdamW inside the same optimizer object, which is
what the transformers Trainer and DeepSpeed expect.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from bregtop_dist.adamw import adamw_step
from bregtop_dist.block_plan import BlockStack, is_kron_param, plan_group
from bregtop_dist.config import BregTopConfig
from bregtop_dist.core.block_step import BlockHyper, KronBlockState, init_block_state, kron_block_step

ParamsT = Iterable[Tensor] | Iterable[dict[str, Any]]


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or inf; raised before any state or parameter changes."""


def _hyper(cfg: BregTopConfig) -> BlockHyper:
    return BlockHyper(
        stats=cfg.stats,
        rho=cfg.resolved_rho,
        q=cfg.resolved_q,
        c=cfg.resolved_c,
        beta1=cfg.betas[0],
        beta2=cfg.betas[1],
        eps=cfg.eps,
        frequency=cfg.precondition_frequency,
        backend=cfg.backend,
    )


class BregTop(torch.optim.Optimizer):
    """Kronecker-factored optimizer of the BregTop family (Liu, Zhou, Zhao, 2026).

    ``method`` is one of the paper's Table 4 rows: ``shampoo, kl, vn-v1, vn-v2, f-v1,
    f-v2`` (every entry preconditioned, rho = 1) or ``bregtop-vn-v1, bregtop-vn-v2,
    bregtop-f-v1, bregtop-f-v2`` (top set by rho/q/c, defaults from appendix D). Every
    setting is a field of :class:`~bregtop_dist.config.BregTopConfig` and may be set per
    param group; ``bregtop=False`` in a group runs it with AdamW (see ``param_groups``).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        method: str = "bregtop-vn-v2",
        rho: float | None = None,
        q: float | None = None,
        c: float | None = None,
        betas: tuple[float, float] = (0.9, 0.98),
        precondition_frequency: int = 10,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        max_precond_dim: int = 1024,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        stagger_refresh: bool = True,
        backend: str = "auto",
    ) -> None:
        defaults = BregTopConfig(
            lr=lr, method=method, rho=rho, q=q, c=c, betas=betas,
            precondition_frequency=precondition_frequency, eps=eps, weight_decay=weight_decay,
            max_precond_dim=max_precond_dim, adam_betas=adam_betas, adam_eps=adam_eps,
            stagger_refresh=stagger_refresh, backend=backend,
        ).as_defaults()
        self._stacks: dict[str, BlockStack] = {}
        self._planned_groups = 0
        self._warned_basis = False
        super().__init__(params, defaults)

    # ----------------------------------------------------------------- groups and plan
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group; its settings are validated before the optimizer changes."""
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        BregTopConfig.from_group(merged)
        super().add_param_group(param_group)

    def _plan(self) -> None:
        """Block stacks for groups added since the last step (existing stacks keep state)."""
        for gi in range(self._planned_groups, len(self.param_groups)):
            group = self.param_groups[gi]
            cfg = BregTopConfig.from_group(group)
            kron = [p for p in group["params"] if is_kron_param(p, cfg.bregtop)]
            for stack in plan_group(
                gi, kron, cfg.max_precond_dim, cfg.precondition_frequency, cfg.stagger_refresh
            ):
                self._stacks[stack.key] = stack
        self._planned_groups = len(self.param_groups)

    def _param_name(self, gi: int, pi: int) -> str:
        group = self.param_groups[gi]
        names = group.get("param_names")
        if names:
            return str(names[pi])
        shape = tuple(group["params"][pi].shape)
        return f"param_groups[{gi}]['params'][{pi}] (shape {shape})"

    # ------------------------------------------------------------------------- step
    def _check_finite(self) -> None:
        where = [
            (gi, pi, p.grad)
            for gi, group in enumerate(self.param_groups)
            for pi, p in enumerate(group["params"])
            if p.grad is not None
        ]
        if not where:
            return
        finite = torch.stack([torch.isfinite(g).all() for _, _, g in where])
        if bool(finite.all()):
            return
        gi, pi, _ = where[int((~finite).nonzero()[0])]
        raise NonFiniteGradientError(
            f"the gradient of {self._param_name(gi, pi)} contains NaN or inf; "
            "no parameter or optimizer state was changed by this step"
        )

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One optimizer step; raises :class:`NonFiniteGradientError` before changing anything."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_finite()
        self._plan()
        configs = [BregTopConfig.from_group(g) for g in self.param_groups]
        for stack in self._stacks.values():
            self._step_stack(stack, configs[stack.group])
        for group, cfg in zip(self.param_groups, configs):
            for p in group["params"]:
                if p.grad is None or is_kron_param(p, cfg.bregtop):
                    continue
                adamw_step(
                    p, p.grad, self.state[p], lr=cfg.lr, betas=cfg.adam_betas,
                    eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                )
        return loss

    def _step_stack(self, stack: BlockStack, cfg: BregTopConfig) -> None:
        grads = {i: g.contiguous() for i, ref in enumerate(stack.blocks) if (g := ref.param.grad) is not None}
        pieces = {i: stack.blocks[i].of(g) for i, g in grads.items()}
        if not pieces:
            return
        active = list(pieces)
        grad = torch.stack(list(pieces.values())).float()
        if stack.state is None:
            stack.state = stack.empty_state(grad.device)
        whole = len(active) == len(stack.blocks)
        idx = torch.tensor(active, dtype=torch.int64)  # CPU, like the step counts
        state = stack.state if whole else stack.state.select(idx)
        fresh = (state.step == 0).nonzero().flatten()
        if fresh.numel():
            init, eigh_failed = init_block_state(cfg.stats, grad.index_select(0, fresh.to(grad.device)))
            state.assign(fresh, init)
            self._warn_basis(eigh_failed)
        update, qr_failed = kron_block_step(state, grad, _hyper(cfg), stack.offsets.index_select(0, idx))
        self._warn_basis(qr_failed)
        if not whole:
            stack.state.assign(idx, state)

        # Blocks partition their parameter, so each element is decayed exactly once.
        for k, i in enumerate(active):
            ref = stack.blocks[i]
            piece = ref.of(ref.param)
            if cfg.weight_decay:
                piece.mul_(1.0 - cfg.lr * cfg.weight_decay)
            piece.add_(update[k].to(piece.dtype), alpha=-cfg.lr)

    def _warn_basis(self, failed: Tensor | None) -> None:
        if failed is None or self._warned_basis or not bool(failed.any()):
            return
        self._warned_basis = True
        warnings.warn(
            f"BregTop: eigenbasis computation failed in float32 and float64 for "
            f"{int(failed.sum())} block(s); they keep their previous basis (warned once)",
            RuntimeWarning,
            stacklevel=3,
        )

    # ------------------------------------------------------------------- state dict
    def state_dict(self) -> dict[str, Any]:
        """torch's format (AdamW-side state, param groups) plus ``kron_blocks``: per block
        stack (``"<group>:<m>x<n>"``) its stacked Kronecker state tensors."""
        out = super().state_dict()
        out["kron_blocks"] = {
            key: stack.state.tensors() for key, stack in self._stacks.items() if stack.state is not None
        }
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; everything is validated before anything changes."""
        saved_groups = state_dict["param_groups"]
        if len(saved_groups) != len(self.param_groups):
            raise ValueError(
                f"the state dict has {len(saved_groups)} param groups, this optimizer has "
                f"{len(self.param_groups)}"
            )
        id_to_param: dict[int, Tensor] = {}
        for gi, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"param group {gi} has {len(saved['params'])} params in the state dict and "
                    f"{len(group['params'])} in this optimizer"
                )
            merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
            BregTopConfig.from_group(merged)
            id_to_param.update(zip(saved["params"], group["params"]))
        self._plan()
        kron = state_dict.get("kron_blocks", {})
        for key, tensors in kron.items():
            stack = self._stacks.get(key)
            if stack is None:
                raise ValueError(f"the state dict has block stack {key!r}, unknown to this optimizer")
            for name, (shape, _) in stack.state_shapes().items():
                got = tensors.get(name)
                if got is None or tuple(got.shape) != shape:
                    found = None if got is None else tuple(got.shape)
                    raise ValueError(f"block stack {key!r} field {name!r}: expected shape {shape}, got {found}")

        # Validated: now change state.
        for saved, group in zip(saved_groups, self.param_groups):
            group.update({k: v for k, v in saved.items() if k != "params"})
        self.state.clear()
        for pid, pstate in state_dict["state"].items():
            param = id_to_param[pid]
            self.state[param] = {
                k: v.detach().clone().to(param.device) if torch.is_tensor(v) else v
                for k, v in pstate.items()
            }
        for stack in self._stacks.values():
            stack.state = None
        for key, tensors in kron.items():
            stack = self._stacks[key]
            device = stack.blocks[0].param.device
            stack.state = KronBlockState(
                **{
                    name: tensors[name].detach().to(device="cpu" if name == "step" else device, dtype=dtype, copy=True)
                    for name, (_, dtype) in stack.state_shapes().items()
                }
            )
