"""Typed, validated settings of one BregTop parameter group, and the ten method presets.

The presets are the columns of the paper's Table 4. Defaults follow appendix D (rho/q/c per
family) and, where the paper defers to Lin et al., KL-Shampoo's public defaults
(betas (0.9, 0.98), precondition_frequency 10, eps 1e-8).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from bregtop_dist.core.block_step import GRAFTS, INITS, BlockHyper
from bregtop_dist.core.dispatch import BACKENDS
from bregtop_dist.core.precondition import SELECTION_ALLOWED, check_selection
from bregtop_dist.core.rotation import ROTATION_PRECISIONS
from bregtop_dist.core.stats import STATS_METHODS
from bregtop_dist.core.validate import ArgumentTypeError, describe_type, is_int, is_real, wrong_type


def lr_value(lr: Any) -> Any:
    """A learning rate as a number: a one-element real tensor (torch's optimizers take a Tensor
    lr, and schedulers then write into it) is read as a float; anything else is returned as it
    is, for the config's checks to judge."""
    if isinstance(lr, torch.Tensor) and lr.numel() == 1 and lr.is_floating_point():
        return float(lr)
    return lr


@dataclass(frozen=True)
class MethodPreset:
    """What a method name means: its STATS rule and its Algorithm 2 selection defaults."""

    stats: str
    rho: float
    q: float
    c: float

    @property
    def selects_top(self) -> bool:
        """BregTop rows precondition a top set only; the baselines precondition every entry."""
        return self.rho < 1.0


_FULL = dict(rho=1.0, q=0.01, c=1.0)  # q and c are unused when every entry is in the top set
_VN = dict(rho=0.06, q=0.01, c=3.0)  # appendix D, BregTop-VN
_F = dict(rho=0.05, q=0.01, c=1.6)  # appendix D, BregTop-F

PRESETS: dict[str, MethodPreset] = {
    **{name: MethodPreset(stats=name, **_FULL) for name in STATS_METHODS},
    "bregtop-vn-v1": MethodPreset(stats="vn-v1", **_VN),
    "bregtop-vn-v2": MethodPreset(stats="vn-v2", **_VN),
    "bregtop-f-v1": MethodPreset(stats="f-v1", **_F),
    "bregtop-f-v2": MethodPreset(stats="f-v2", **_F),
}
METHODS = tuple(PRESETS)
SHAMPOO_EXPONENTS = (0.25, 0.5)


def _check_betas(name: str, betas: Any) -> tuple[float, float]:
    message = f"{name}={betas!r} must be a pair of floats in [0, 1)"
    if not isinstance(betas, (tuple, list)):
        raise ArgumentTypeError(f"{message} (got {describe_type(betas)})")
    if len(betas) != 2:
        raise ValueError(f"{message} (got {len(betas)} values)")
    for i, b in enumerate(betas):
        if not is_real(b):
            raise wrong_type(f"{name}[{i}]", b, f"{name} must be a pair of numbers in [0, 1)")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name}[{i}]={b!r} is outside the allowed range [0, 1)")
    return float(betas[0]), float(betas[1])


_PRESET = ", or None for the method's preset"
_REALS = {  # every real-valued field: what it allows, as its error messages say it
    "lr": "lr must be a finite number >= 0",
    "rho": SELECTION_ALLOWED["rho"] + _PRESET,
    "q": SELECTION_ALLOWED["q"] + _PRESET,
    "c": SELECTION_ALLOWED["c"] + _PRESET,
    "eps": SELECTION_ALLOWED["eps"],
    "exponent": "exponent must be 0.25 or 0.5 (method='shampoo' only), or None for the method's own p",
    "init_factor": "it must be a finite number > 0",
    "eig_floor": "it must be in [0, 1)",
    "weight_decay": "it must be a finite number >= 0",
    "adam_eps": "it must be a finite number > 0",
}
_OPTIONAL = ("rho", "q", "c", "exponent")
_INTS = {
    "precondition_frequency": "it must be an integer >= 1",
    "max_precond_dim": "it must be an integer >= 1",
    "parts": "it must be an integer >= 1",
}
_BOOLS = ("stagger_refresh", "bregtop", "maximize")


@dataclass(frozen=True, kw_only=True)
class BregTopConfig:
    """Settings of one parameter group; every field is validated in ``__post_init__``."""

    lr: float = 1e-3
    """Learning rate of both the Kronecker blocks and the AdamW side (>= 0)."""
    method: str = "kl"
    """One of :data:`METHODS`, the paper's Table 4 rows. The default is KL-Shampoo, the row that
    trained fastest here (README, *Defaults, from these measurements*)."""
    rho: float | None = None
    """Top-set fraction in (0, 1]; None takes the method's preset. Baselines need 1."""
    q: float | None = None
    """Quantile of S^-1/2 over the bottom set, in [0, 1]; None takes the preset (0.01)."""
    c: float | None = None
    """Bottom-set scale multiplier (finite, > 0); None takes the preset (VN 3.0, F 1.6)."""
    betas: tuple[float, float] = (0.9, 0.98)
    """(momentum, factor and eigenvalue EMA), each in [0, 1)."""
    precondition_frequency: int = 10
    """T: basis refresh (one warm-started QR power iteration) every T steps (>= 1)."""
    eps: float = 1e-8
    """Top-set scale is 1 / (S^p + eps) (>= 0; 0 is the paper's S^-p)."""
    exponent: float | None = None
    """p of the preconditioner S^-p. None takes the method's: 1/4 for shampoo (the standard
    L^-1/4 G R^-1/4), 1/2 for every other row (their divergences fix it). Only shampoo may
    set it, to 0.25 or 0.5."""
    init: str = "first-gradient-averaged"
    """How a block's state starts (see :mod:`bregtop_dist.core.block_step`):
    ``first-gradient-averaged``, the default (the ``first-gradient`` start, then factor and
    estimate EMAs that average the block's statistics so far, bias-corrected as Adam's second
    moment, so the first gradient does not dominate them for ``1/(1-beta2)`` steps; chosen by
    issue 28's measurements, docs/results/first-state.md), ``first-gradient``
    (factors, bases and eigenvalue estimates from the first non-zero gradient, taken from the
    isotropic state at the gradient's scale, which also updates the parameters; the default
    until 2026-12-07), ``first-gradient-unit`` (from
    the unit state: the first estimates at ``|G|^2``, so the first steps depend on the loss's
    units; the state before ed21fa1) or ``kl-methods`` (Lin et al.'s public code, the paper's [11]:
    constant estimates ``init_factor``, a first step that only initialises, precondition
    with the previous estimates then update them, and their absolute clamp)."""
    init_factor: float = 0.1
    """``kl-methods`` only: the constant first eigenvalue estimate (> 0; [11]'s 0.1)."""
    eig_floor: float = 0.0
    """Damping: in S = lam_L lam_R^T each eigenvalue estimate is raised to at least
    eig_floor x its factor's largest, so S^-1/2 is at most (1/eig_floor) x its value at the
    top (in [0, 1); 0 is the paper's algorithm)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (>= 0), applied as p *= 1 - lr * weight_decay."""
    max_precond_dim: int = 1024
    """Dimensions above this are cut into blocks of at most this size (>= 1)."""
    parts: int = 1
    """Precondition each matrix of the group as this many equal parts along ``parts_dim``, each
    its own Kronecker matrix (>= 1): a fused q/k/v projection as the paper's three, Q, K and V
    (``param_groups`` sets it for the fused projections it recognises)."""
    parts_dim: int = 0
    """The side ``parts`` cuts: 0 the rows of the 2-D view (an ``nn.Linear``'s or
    ``nn.MultiheadAttention.in_proj_weight``'s output features), 1 its columns (a transformers
    ``Conv1D``, which stores the weight transposed)."""
    adam_betas: tuple[float, float] | None = None
    """Betas of the AdamW side (embeddings, biases, norms, head, 1-D tensors), each in [0, 1).
    None takes ``(betas[0], 0.999)``: one momentum for both sides, so a scheduler that cycles
    it (OneCycleLR, CyclicLR with ``cycle_momentum``, which write ``betas[0]``) drives the
    AdamW side too, as it drives torch's AdamW."""
    adam_eps: float = 1e-8
    """Epsilon of the AdamW side (> 0: 0 divides 0 by 0 on a zero gradient)."""
    graft: str = "none"
    """``adamw`` rescales each Kronecker block's update to the norm AdamW's update would have
    for that block (``m_hat / (sqrt(v_hat) + adam_eps)``, m the method's momentum, v an EMA of
    G^2 with the AdamW side's beta2): the direction is the method's, the size AdamW's, so a
    learning rate tuned for AdamW carries over (Distributed Shampoo's AdamW grafting; AdamW's
    two parameter-sized float32 moments as more state). ``none`` (default) is the paper's algorithm. Set
    it when the group is created: a group that has stepped cannot start grafting."""
    stagger_refresh: bool = True
    """Spread basis refreshes over the T steps (each block its own offset) instead of all
    blocks refreshing on the same step; False is the paper's schedule."""
    bregtop: bool = True
    """False runs the whole group with AdamW (the paper's embedding/bias/norm/head group)."""
    backend: str = "auto"
    """Masked scaling of Algorithm 2: ``auto`` (Triton on CUDA, torch otherwise), ``torch``
    or ``triton``; see :mod:`bregtop_dist.core.dispatch`."""
    maximize: bool = False
    """Maximise the objective instead (every update uses the negated gradient), as torch's
    optimizers' ``maximize``."""
    rotation_precision: str = "fp32"
    """Precision of the products that rotate into and out of the eigenbases (the gradient,
    the update and, on refresh, the momentum): ``fp32`` (default, exact float32), ``tf32``
    (float32 storage, TF32 tensor-core products on CUDA; plain float32 elsewhere) or ``bf16``
    (bfloat16 operands and products, float32 state); see docs/benchmarks.md for their error
    against fp32. Factors, eigenbases and the selection stay float32."""

    def __post_init__(self) -> None:
        self._check_types()
        if self.method not in PRESETS:
            raise ValueError(f"method={self.method!r} is unknown; allowed: {', '.join(METHODS)}")
        preset = PRESETS[self.method]
        if not (self.lr >= 0.0 and math.isfinite(self.lr)):
            raise ValueError(f"lr={self.lr!r} is not allowed: {_REALS['lr']}")
        check_selection(self.rho, self.q, self.c, self.eps)
        if self.rho is not None:
            if not preset.selects_top and self.rho != 1.0:
                raise ValueError(
                    f"rho={self.rho!r} is not allowed for method={self.method!r}, which "
                    "preconditions every entry (rho=1); use a bregtop-* method to select a top set"
                )
        object.__setattr__(self, "betas", _check_betas("betas", self.betas))
        if self.adam_betas is not None:
            object.__setattr__(self, "adam_betas", _check_betas("adam_betas", self.adam_betas))
        for name, allowed in _INTS.items():
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: {allowed}")
        if not is_int(self.parts_dim):
            raise wrong_type("parts_dim", self.parts_dim, "it must be 0 (rows) or 1 (columns)")
        if self.parts_dim not in (0, 1):
            raise ValueError(f"parts_dim={self.parts_dim!r} is not allowed: it must be 0 (rows) or 1 (columns)")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} is unknown; allowed: {', '.join(BACKENDS)}")
        if self.rotation_precision not in ROTATION_PRECISIONS:
            raise ValueError(f"rotation_precision={self.rotation_precision!r} is unknown; allowed: "
                             f"{', '.join(ROTATION_PRECISIONS)}")
        if not 0.0 <= self.eig_floor < 1.0:
            raise ValueError(f"eig_floor={self.eig_floor!r} is not allowed: {_REALS['eig_floor']}")
        if self.graft not in GRAFTS:
            raise ValueError(f"graft={self.graft!r} is unknown; allowed: {', '.join(GRAFTS)}")
        if self.init not in INITS:
            raise ValueError(f"init={self.init!r} is unknown; allowed: {', '.join(INITS)}")
        if not (0.0 < self.init_factor and math.isfinite(self.init_factor)):
            raise ValueError(f"init_factor={self.init_factor!r} is not allowed: {_REALS['init_factor']}")
        if self.exponent is not None:
            if self.method != "shampoo":
                raise ValueError(
                    f"exponent={self.exponent!r} is not allowed for method={self.method!r}: its divergence "
                    "fixes p = 1/2; only method='shampoo' takes an exponent"
                )
            if self.exponent not in SHAMPOO_EXPONENTS:
                raise ValueError(
                    f"exponent={self.exponent!r} is not allowed for method='shampoo'; allowed: 0.25 "
                    "(L^-1/4 G R^-1/4, the default) or 0.5"
                )
        if not (self.weight_decay >= 0.0 and math.isfinite(self.weight_decay)):
            raise ValueError(f"weight_decay={self.weight_decay!r} is not allowed: {_REALS['weight_decay']}")
        if not (self.adam_eps > 0.0 and math.isfinite(self.adam_eps)):
            raise ValueError(f"adam_eps={self.adam_eps!r} is not allowed: {_REALS['adam_eps']}")

    def _check_types(self) -> None:
        """ArgumentTypeError (a TypeError and a ValueError) naming the first field of the wrong
        type: the names must be str, the switches bool, the counts int and every other
        number a real number (neither bool nor str); only rho, q, c and exponent take None."""
        for name, allowed in (
            ("method", f"method must be one of {', '.join(METHODS)}"),
            ("init", f"init must be one of {', '.join(INITS)}"),
            ("graft", f"graft must be one of {', '.join(GRAFTS)}"),
            ("backend", f"backend must be one of {', '.join(BACKENDS)}"),
            ("rotation_precision", f"rotation_precision must be one of {', '.join(ROTATION_PRECISIONS)}"),
        ):
            if not isinstance(getattr(self, name), str):
                raise wrong_type(name, getattr(self, name), allowed)
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise wrong_type(name, getattr(self, name), f"{name} must be True or False")
        for name, allowed in _REALS.items():
            value = getattr(self, name)
            if not (is_real(value) or (value is None and name in _OPTIONAL)):
                raise wrong_type(name, value, allowed)
        for name, allowed in _INTS.items():
            if not is_int(getattr(self, name)):
                raise wrong_type(name, getattr(self, name), allowed)

    @property
    def stats(self) -> str:
        return PRESETS[self.method].stats

    @property
    def resolved_rho(self) -> float:
        return PRESETS[self.method].rho if self.rho is None else self.rho

    @property
    def resolved_q(self) -> float:
        return PRESETS[self.method].q if self.q is None else self.q

    @property
    def resolved_c(self) -> float:
        return PRESETS[self.method].c if self.c is None else self.c

    @property
    def resolved_adam_betas(self) -> tuple[float, float]:
        """The AdamW side's betas: the setting, else (betas[0], 0.999)."""
        return self.adam_betas if self.adam_betas is not None else (self.betas[0], 0.999)

    @property
    def resolved_exponent(self) -> float:
        """p of S^-p: the setting, else 1/4 for shampoo and 1/2 for every other method."""
        if self.exponent is not None:
            return float(self.exponent)
        return 0.25 if self.method == "shampoo" else 0.5

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(cls.__dataclass_fields__)

    @classmethod
    def from_group(cls, group: Mapping[str, Any]) -> BregTopConfig:
        """The config of an optimizer param group (its non-settings keys are ignored)."""
        names = cls.field_names()
        return cls.from_mapping({k: v for k, v in group.items() if k in names})

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any], where: str = "BregTop", extra: tuple[str, ...] = ()) -> BregTopConfig:
        """The config of a mapping of settings (keyword arguments, a YAML or JSON block), with
        the same checks as the constructor: an unknown key is a TypeError naming it, ``where``
        it was found and the allowed names (the fields, and ``extra`` names the caller takes
        itself). JSON and YAML lists become the betas' tuples; a one-element tensor lr is read
        as a float."""
        names = cls.field_names()
        unknown = [k for k in settings if k not in names]
        if unknown:
            raise ArgumentTypeError(
                f"{where}: unknown setting {unknown[0]!r}; allowed: {', '.join((*names, *extra))}"
            )
        values = dict(settings)
        for key in ("betas", "adam_betas"):
            if isinstance(values.get(key), list):
                values[key] = tuple(values[key])
        if "lr" in values:
            values["lr"] = lr_value(values["lr"])
        return cls(**values)

    def block_hyper(self) -> BlockHyper:
        """What the block math of :mod:`bregtop_dist.core` reads: these settings with the
        method's preset filled in."""
        return BlockHyper(
            stats=self.stats, rho=self.resolved_rho, q=self.resolved_q, c=self.resolved_c,
            beta1=self.betas[0], beta2=self.betas[1], eps=self.eps, frequency=self.precondition_frequency,
            backend=self.backend, eig_floor=self.eig_floor, exponent=self.resolved_exponent, init=self.init,
            init_factor=self.init_factor, rotation_precision=self.rotation_precision,
            graft=self.graft, graft_beta2=self.resolved_adam_betas[1], graft_eps=self.adam_eps,
        )

    def with_lr(self, lr: Any) -> BregTopConfig:
        """This config with another ``lr``, of which only ``lr`` is checked (a scheduler's
        write): the rest was validated when this config was made."""
        lr = lr_value(lr)
        if not is_real(lr):
            raise wrong_type("lr", lr, _REALS["lr"])
        if not (lr >= 0.0 and math.isfinite(lr)):
            raise ValueError(f"lr={lr!r} is not allowed: {_REALS['lr']}")
        out = copy.copy(self)
        object.__setattr__(out, "lr", lr)
        return out

    def as_defaults(self) -> dict[str, Any]:
        return asdict(self)
