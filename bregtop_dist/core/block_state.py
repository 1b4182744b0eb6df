"""The Kronecker state of same-shape blocks, and its schema: the one place that says which
fields a block has, their shapes and dtypes, where they live, how a block starts, and how one
block is written out and read back.

A stack holds B blocks with every field stacked on dim 0, which is how the step runs them.
A checkpoint holds blocks one by one (:meth:`KronBlockState.block`), keyed by the parameter
and block index they belong to, so that it does not depend on which rank stacked which blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from bregtop_dist.core.finite import finite_rows
from bregtop_dist.core.validate import describe_type


@dataclass(frozen=True)
class FieldSpec:
    """One field of a block: its dims in terms of the block's (m, n), dtype, and whether it
    lives on the CPU whatever the device (the host schedules from it without a device sync)."""

    name: str
    dims: tuple[str, ...]  # "m" and "n"; () for a per-block scalar
    dtype: torch.dtype
    on_host: bool = False
    optional: bool = False  # present only in some states (the grafting's moments: only where the group grafts)

    def shape(self, m: int, n: int) -> tuple[int, ...]:
        return tuple(m if d == "m" else n for d in self.dims)


SCHEMA: tuple[FieldSpec, ...] = (
    FieldSpec("momentum", ("m", "n"), torch.float32),
    FieldSpec("L", ("m", "m"), torch.float32),
    FieldSpec("R", ("n", "n"), torch.float32),
    FieldSpec("U_L", ("m", "m"), torch.float32),
    FieldSpec("U_R", ("n", "n"), torch.float32),
    FieldSpec("lam_L", ("m",), torch.float32),
    FieldSpec("lam_R", ("n",), torch.float32),
    FieldSpec("step", (), torch.int64, on_host=True),
    FieldSpec("ready", (), torch.bool, on_host=True),
    FieldSpec("graft_m", ("m", "n"), torch.float32, optional=True),
    FieldSpec("graft_v", ("m", "n"), torch.float32, optional=True),
)
HOST_FIELDS = tuple(f.name for f in SCHEMA if f.on_host)


@dataclass
class KronBlockState:
    """Optimizer state of B same-shape blocks, each field stacked on dim 0 (see ``SCHEMA``)."""

    momentum: Tensor  # (B, m, n), in the eigenbasis: U_L^T M U_R
    L: Tensor  # (B, m, m)
    R: Tensor  # (B, n, n)
    U_L: Tensor  # (B, m, m), columns are eigenvector estimates
    U_R: Tensor  # (B, n, n)
    lam_L: Tensor  # (B, m), eigenvalue estimates in U_L's column order
    lam_R: Tensor  # (B, n)
    step: Tensor  # (B,) int64 steps taken, on the CPU whatever the device
    ready: Tensor  # (B,) bool, on the CPU: the block has seen a non-zero gradient and has state
    graft_m: Tensor | None = None  # (B, m, n): AdamW's moments of G in the parameter's basis,
    graft_v: Tensor | None = None  # only where the group grafts

    # ------------------------------------------------------------------ schema
    @staticmethod
    def shapes(m: int, n: int, count: int, graft: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of every field of ``count`` stacked m x n blocks (``graft``: with the
        grafting's moments)."""
        return {f.name: ((count, *f.shape(m, n)), f.dtype) for f in SCHEMA if graft or not f.optional}

    @classmethod
    def empty(cls, m: int, n: int, count: int, device: torch.device | str = "cpu", graft: bool = False) -> KronBlockState:
        """``count`` blocks none of which is ready (each is initialised by its first non-zero
        gradient): zero factors and momentum, identity bases, unit eigenvalue estimates (and
        zero grafting moments with ``graft``)."""
        out = {
            f.name: torch.zeros((count, *f.shape(m, n)), dtype=f.dtype, device="cpu" if f.on_host else device)
            for f in SCHEMA
            if graft or not f.optional
        }
        out["U_L"] += torch.eye(m, device=device)
        out["U_R"] += torch.eye(n, device=device)
        out["lam_L"] += 1.0
        out["lam_R"] += 1.0
        return cls(**out)

    @staticmethod
    def check_block(block: Mapping[str, Tensor], m: int, n: int, graft: bool = False) -> str | None:
        """Why ``block`` (one block's fields, as :meth:`block` writes them) cannot be an m x n
        block's state, or None when it can: every field a plain tensor of the schema's dtype and
        shape, holding values (not on the meta device; any other device is fine, the fields are
        copied to the plan's), the float fields finite and ``step`` >= 0. A block saved before
        ``ready`` existed may lack it (see :meth:`from_blocks`); the grafting's moments are read
        only where the group grafts (``graft``)."""
        if not isinstance(block, Mapping):
            return f"expected a dict of the fields {[f.name for f in SCHEMA]}, got {describe_type(block)}"
        for f in SCHEMA:
            got = block.get(f.name)
            if f.name == "ready" and got is None and "step" in block:
                continue  # saved before the field existed: see from_blocks
            if f.optional and not graft:
                continue
            why = _field_problem(f, got, m, n)
            if why is not None:
                return f"field {f.name!r} {why}"
        return None

    @classmethod
    def from_blocks(cls, blocks: list[Mapping[str, Tensor]], device: torch.device | str, graft: bool = False) -> KronBlockState:
        """Stack blocks written by :meth:`block` (checked with :meth:`check_block`) into a new
        state on ``device`` (host fields on the CPU), sharing no memory with ``blocks``. A
        block saved before ``ready`` existed was ready once it had stepped. The grafting's
        moments are taken only with ``graft``."""
        out = {}
        for f in SCHEMA:
            if f.optional and not graft:
                continue
            rows = [b["step"] > 0 if f.name == "ready" and "ready" not in b else b[f.name] for b in blocks]
            out[f.name] = torch.stack([r.detach().to("cpu" if f.on_host else device, f.dtype) for r in rows])
        return cls(**out)

    # --------------------------------------------------------------- per block
    def block(self, row: int) -> dict[str, Tensor]:
        """The fields of block ``row`` (views, not copies): one block as a checkpoint holds it."""
        return {f.name: getattr(self, f.name)[row] for f in SCHEMA if getattr(self, f.name) is not None}

    def tensors(self) -> dict[str, Tensor]:
        """Every field that is there (an optional field that is not is left out)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def select(self, idx: Tensor) -> KronBlockState:
        """A copy holding the blocks ``idx``."""
        return KronBlockState(**{k: v.index_select(0, idx.to(v.device)) for k, v in self.tensors().items()})

    def assign(self, idx: Tensor, part: KronBlockState) -> None:
        """Write ``part`` (from :meth:`select`) back into the blocks ``idx``, in place."""
        for k, v in self.tensors().items():
            v.index_copy_(0, idx.to(v.device), getattr(part, k))

    def with_rows(self, idx: Tensor, part: KronBlockState) -> KronBlockState:
        """A new state: this one with the blocks ``idx`` replaced by ``part`` (self unchanged)."""
        return KronBlockState(
            **{k: torch.index_copy(v, 0, idx.to(v.device), getattr(part, k)) for k, v in self.tensors().items()}
        )

    def uniform_step(self) -> int | None:
        """The step count every block has taken when every block is ready and they agree
        (the usual case), else None. Read from the host fields once per state object and then
        remembered while they are not written to (:meth:`remember_uniform_step` passes it on
        to the state a step returns), so that a steady step reads no tensor."""
        key = (self.step._version, self.ready._version)
        known = self.__dict__.get("_uniform_step")
        if known is not None and known[0] == key:
            return known[1]
        value = None
        if self.step.numel() and bool(self.ready.all()):
            first = int(self.step[0])
            value = first if bool((self.step == first).all()) else None
        self.__dict__["_uniform_step"] = (key, value)
        return value

    def remember_uniform_step(self, value: int) -> None:
        """Record that every block is ready and has taken ``value`` steps (the caller knows)."""
        self.__dict__["_uniform_step"] = ((self.step._version, self.ready._version), value)

    def changed_by_step(self, refreshed: bool) -> list[Tensor]:
        """The float fields a step writes (the bases only on a refresh): what its finiteness
        check has to look at, the rest being as finite as before."""
        out = [self.momentum, self.L, self.R, self.lam_L, self.lam_R]
        out += [t for t in (self.graft_m, self.graft_v) if t is not None]
        return out + [self.U_L, self.U_R] if refreshed else out

    def finite_blocks(self) -> Tensor:
        """(B,) bool on the state's device: every float field of the block is finite."""
        ok = finite_rows(self.momentum)
        for t in (self.L, self.R, self.lam_L, self.lam_R, self.graft_m, self.graft_v):
            if t is not None:
                ok &= finite_rows(t)
        return ok


def non_finite(t: Tensor) -> str | None:
    """What a floating-point tensor holds that is not finite (``"holds 2 NaN and 1 inf of its
    144 entries"``), or None when every entry is finite (or the tensor is not floating)."""
    if not t.is_floating_point() or bool(torch.isfinite(t).all()):
        return None
    counts = [(int(torch.isnan(t).sum()), "NaN"), (int(torch.isinf(t).sum()), "inf")]
    found = " and ".join(f"{count} {what}" for count, what in counts if count)
    return f"holds {found} of its {t.numel()} entries"


def _is_dtensor(value: Tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


def _field_problem(spec: FieldSpec, value: object, m: int, n: int) -> str | None:
    """What is wrong with ``value`` as field ``spec`` of an m x n block (the message goes on
    after the field's name), or None."""
    if value is None:
        return "is missing"
    if not isinstance(value, Tensor):
        return f"is {describe_value(value)}, expected a {spec.dtype} tensor"
    if _is_dtensor(value):
        return "is a DTensor; a block's fields are plain tensors, as state_dict() writes them"
    if value.device.type == "meta":
        return "is on the meta device, which holds no values; expected a tensor on the CPU or an accelerator"
    if value.dtype != spec.dtype:
        return f"has dtype {value.dtype}, expected {spec.dtype}"
    if tuple(value.shape) != spec.shape(m, n):
        return f"has shape {tuple(value.shape)}, expected {spec.shape(m, n)} for a {m}x{n} block"
    bad = non_finite(value)
    if bad is not None:
        return f"{bad}; a block's float fields must be finite"
    if spec.name == "step" and int(value) < 0:
        return f"is {int(value)}; it counts the steps the block has taken and must be >= 0"
    return None


def describe_value(value: object, limit: int = 40) -> str:
    """``a str ('abc')``: a value that should have been a tensor, as a message names it."""
    text = repr(value)
    return f"{describe_type(value)} ({text if len(text) <= limit else text[: limit - 3] + '...'})"
