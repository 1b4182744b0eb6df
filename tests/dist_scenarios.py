"""Scenarios run on every rank of a gloo group by ``dist_harness``: each engine against the
single-process run of the same optimizer, and the failure modes of a sharded step.

Every rank feeds the same batches, so the engines' gradient averages (sum of W equal values,
divided by W, W a power of two) are exactly the single-process gradients and any difference
comes from the optimizer. The single-process reference runs on each rank in a one-rank group.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from bregtop_dist import BregTop, NonFiniteGradientError, param_groups

SETTINGS: dict[str, Any] = dict(
    lr=0.02, method="bregtop-vn-v2", precondition_frequency=3, max_precond_dim=8, weight_decay=0.01
)
STEPS = 7  # more than two refresh periods
FP32_TOL = 1e-5
BF16_TOL = 2e-2  # bf16 on the wire: gradients and updates carry 8 bits of mantissa


class Net(nn.Module):
    """Blocks of several shapes: 20x12 and 13x20 cut by max_precond_dim=8, a 3-row matrix
    (fewer rows than 4 ranks), a conv kernel read as 6x9, and an AdamW side."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(11, 12)
        self.a = nn.Linear(12, 20)
        self.b = nn.Linear(20, 13, bias=False)
        self.c = nn.Linear(13, 3)
        self.conv = nn.Conv1d(3, 6, 3)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(self.embed(idx)))
        h = self.c(torch.tanh(self.b(h)))
        out = self.conv(h.transpose(1, 2))
        return (out - 0.5).square().mean()


class Wide(nn.Module):
    """Many blocks (max_precond_dim=8) of a few shapes, no AdamW side."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.layers = nn.ModuleList(nn.Linear(d_in, d_out, bias=False) for d_in, d_out in
                                    [(32, 40), (40, 24), (24, 48), (48, 32), (32, 16)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.square().mean()


def batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, 11, (4, 9), generator=g)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range, data: Callable[[int], torch.Tensor] = batch) -> None:
    for step in steps:
        opt.zero_grad(set_to_none=True)
        model(data(step)).backward()
        opt.step()


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t  # type: ignore[no-any-return]


def reference(single: dist.ProcessGroup, steps: int = STEPS, **settings: Any) -> dict[str, torch.Tensor]:
    model = Net()
    train(model, BregTop(param_groups(model), process_group=single, **{**SETTINGS, **settings}), range(steps))
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def assert_close(model: nn.Module, want: dict[str, torch.Tensor], tol: float) -> None:
    for name, p in model.named_parameters():
        got = full(p.detach())
        rel = float((got - want[name]).abs().max() / want[name].abs().max())
        assert rel <= tol, f"{name}: max relative difference {rel:.3g} > {tol:g}"


def fsdp2(model: nn.Module, world: int) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for child in model.children():
        if not isinstance(child, nn.Embedding):
            fully_shard(child, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# ---------------------------------------------------------------------------- engines
def ddp_equals_single(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    from torch.nn.parallel import DistributedDataParallel

    model = Net()
    wrapped = DistributedDataParallel(model)
    opt = BregTop(param_groups(model), **SETTINGS)
    train(wrapped, opt, range(STEPS))
    assert_close(model, reference(single), FP32_TOL)


def fsdp2_equals_single(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    model = fsdp2(Net(), world)
    opt = BregTop(param_groups(model), **SETTINGS)
    train(model, opt, range(STEPS))
    assert_close(model, reference(single), FP32_TOL)


def fsdp2_bf16_comm(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    model = fsdp2(Net(), world)
    train(model, BregTop(param_groups(model), comm_dtype="bf16", **SETTINGS), range(STEPS))
    assert_close(model, reference(single), BF16_TOL)


def ddp_bf16_comm(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    model = Net()
    train(model, BregTop(param_groups(model), comm_dtype="bf16", **SETTINGS), range(STEPS))
    assert_close(model, reference(single), BF16_TOL)


def kl_without_stagger(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    settings = dict(method="kl", stagger_refresh=False)
    model = fsdp2(Net(), world)
    train(model, BregTop(param_groups(model), **{**SETTINGS, **settings}), range(STEPS))
    assert_close(model, reference(single, **settings), FP32_TOL)


def rank_without_blocks(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    """One 6x5 block on up to 4 ranks: the other ranks own nothing; under FSDP2 the last
    rank also holds no row of it."""

    def make() -> nn.Module:
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(5, 6), nn.Tanh())

    def data(step: int) -> torch.Tensor:
        return torch.randn(7, 5, generator=torch.Generator().manual_seed(step))

    class Loss(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return (self.inner(x) - 0.3).square().mean()

    ref = Loss(make())
    train(ref, BregTop(param_groups(ref), process_group=single, **SETTINGS), range(STEPS), data)
    want = {k: v.detach().clone() for k, v in ref.named_parameters()}
    for engine in ("replicated", "fsdp2"):
        model = Loss(make())
        if engine == "fsdp2":
            fsdp2(model.inner, world)
        opt = BregTop(param_groups(model), **SETTINGS)
        train(model, opt, range(STEPS), data)
        owned = sum(len(s.block_ids) for s in opt.kron_stacks.values())
        assert owned == (1 if rank == 0 else 0), (engine, owned)
        assert_close(model, want, FP32_TOL)


# ----------------------------------------------------------------------- failure modes
def nonfinite_on_one_rank(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    for engine in ("replicated", "fsdp2"):
        model = Net() if engine == "replicated" else fsdp2(Net(), world)
        opt = BregTop(param_groups(model), **SETTINGS)
        train(model, opt, range(2))
        before = [full(p.detach()).clone() for p in model.parameters()]
        opt.zero_grad(set_to_none=True)
        model(batch(2)).backward()
        if rank == world - 1:
            grad = model.b.weight.grad
            local = grad.to_local() if hasattr(grad, "to_local") else grad
            if local.numel():
                local.view(-1)[-1] = float("nan")
            else:  # this rank holds none of b.weight: poison a parameter it holds
                model.a.weight.grad.to_local().view(-1)[0] = float("nan")
        try:
            opt.step()
        except NonFiniteGradientError as err:
            assert "contains NaN or inf" in str(err)
        else:
            raise AssertionError(f"{engine}: no NonFiniteGradientError on rank {rank}")
        after = [full(p.detach()) for p in model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(before, after)), f"{engine}: parameters changed"


def settings_differ(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    model = Net()
    opt = BregTop(param_groups(model), **{**SETTINGS, "lr": 0.02 if rank == 0 else 0.03})  # no collective here
    before = [p.detach().clone() for p in model.parameters()]
    model(batch(0)).backward()
    try:
        opt.step()  # the first collective call compares the ranks' settings
    except ValueError as err:
        assert "differ across ranks" in str(err) and "'lr'" in str(err), str(err)
    else:
        raise AssertionError("different lr on different ranks was not detected")
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters())), "a parameter changed"
    assert not opt.state or all(not v.get("step") for v in opt.state.values()), "the optimizer state changed"


def state_dict_round_trip(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    for engine in ("replicated", "fsdp2"):
        def build(sd: dict[str, torch.Tensor] | None = None, engine: str = engine) -> tuple[nn.Module, BregTop]:
            model = Net()
            if sd is not None:
                model.load_state_dict(sd)
            if engine == "fsdp2":
                fsdp2(model, world)
            return model, BregTop(param_groups(model), **SETTINGS)

        model, opt = build()
        train(model, opt, range(4))
        saved_model = {k: full(v.detach()).clone() for k, v in model.state_dict().items()}
        buf = io.BytesIO()
        torch.save(opt.state_dict(), buf)
        train(model, opt, range(4, STEPS))
        want = {k: full(v.detach()).clone() for k, v in model.named_parameters()}

        model2, opt2 = build(saved_model)
        buf.seek(0)
        opt2.load_state_dict(torch.load(buf, weights_only=False))
        train(model2, opt2, range(4, STEPS))
        for name, p in model2.named_parameters():
            assert torch.equal(full(p.detach()), want[name]), f"{engine}: {name} differs after resume"


def state_is_sharded(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    def state_bytes(opt: BregTop) -> int:
        return sum(
            t.numel() * t.element_size()
            for s in opt.kron_stacks.values() if s.state is not None
            for t in s.state.tensors().values()
        )

    def x(step: int) -> torch.Tensor:
        return torch.randn(6, 32, generator=torch.Generator().manual_seed(step))

    ref, model = Wide(), Wide()
    opt_ref = BregTop(ref.parameters(), process_group=single, **SETTINGS)
    opt = BregTop(model.parameters(), **SETTINGS)
    train(ref, opt_ref, range(1), x)
    train(model, opt, range(1), x)
    total, mine = state_bytes(opt_ref), state_bytes(opt)
    assert mine <= total / world * 1.1, f"rank {rank} holds {mine} of {total} state bytes"


class RandomNet(nn.Module):
    """A model drawn from ``seed``: a 1 x d0 weight (1 x n blocks), a d1 x 1 weight (m x 1
    blocks), a d2 x d1 and a d2 x d2 weight, fed batches of 5 rows (fewer than most sides, so
    the first factors are rank-deficient)."""

    BATCH = 5

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.d0, d1, d2 = (int(torch.randint(lo, hi, (), generator=g)) for lo, hi in ((6, 41), (6, 41), (2, 25)))
        torch.manual_seed(seed)
        self.a = nn.Linear(self.d0, 1)
        self.b = nn.Linear(1, d1)
        self.c = nn.Linear(d1, d2, bias=False)
        self.e = nn.Linear(d2, d2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.b(torch.tanh(self.a(x))))
        return self.e(torch.tanh(self.c(h))).square().mean()


def random_settings(seed: int) -> dict[str, Any]:
    """The optimizer of the run drawn from ``seed``: any Table 4 row, parameters cut into blocks or whole,
    staggered refreshes, more than three refresh periods in ``REPRO_STEPS``."""
    from bregtop_dist.config import METHODS

    g = torch.Generator().manual_seed(seed + 1)
    method = METHODS[int(torch.randint(len(METHODS), (), generator=g))]
    max_dim = (8, 64)[int(torch.randint(2, (), generator=g))]
    return dict(lr=0.02, method=method, precondition_frequency=3, max_precond_dim=max_dim, weight_decay=0.01,
                stagger_refresh=True)


REPRO_STEPS = 10  # refresh period 3: more than three periods
REPRO_ENGINES = ("ddp", "fsdp2", "zero1", "zero2", "zero3")
STEP0_ROUNDING = {"zero1": 2.4e-7, "zero2": 2.4e-7}
"""Relative difference allowed after step 0 (others: none, bit for bit). ZeRO-1/2 keep the
parameters as views into one flat buffer, and torch's CPU matmul rounds by the memory
alignment of its operand: one process's gradient of a 1 x 10 weight moved to float offsets 2,
6, 10, 14 of a buffer (8-byte, not 16-byte, aligned) differs by 1.9e-9 in one entry, the
rest bit for bit (2026-12-07). So one parameter of some drawn models ends 1 float32 ulp
(4.5e-8 - 6e-8 relative) off the one-process run after step 0 (7 of 22 seeds on 2 ranks);
two ulp are allowed so that the check still catches any real difference."""


FOLLOWED = ("zero1", "zero2")
"""Engines whose end is compared with a one-process run fed, step by step, the gradients the
engine reduced (DeepSpeed's ``safe_get_full_grad``); the others with the free-running
one-process run. The alignment-dependent gradient (STEP0_ROUNDING) differs a little on every
step, and how far a method carries that is not the optimizer's distributed step: free-running,
bregtop's f-v2 on seed 0 ended 3.5e-5 off after 10 steps. Fed the engine's gradients: bit for
bit on seeds 0-2 (2 ranks, 2026-12-07)."""


def _random_run(engine: str, seed: int, world: int, single: dist.ProcessGroup) -> tuple[list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """The parameters after step 0 and after the last step of the run drawn from ``seed`` on
    ``engine`` ("single": one process), and, for FOLLOWED engines, the last parameters of the
    one-process run fed the engine's gradients ({} for the others)."""
    from torch.nn.parallel import DistributedDataParallel

    settings = random_settings(seed)
    model = RandomNet(seed)
    follower = RandomNet(seed) if engine in FOLLOWED else None
    follower_opt = BregTop(follower.parameters(), process_group=single, **settings) if follower else None

    def data(step: int) -> torch.Tensor:
        return torch.randn(RandomNet.BATCH, model.d0, generator=torch.Generator().manual_seed(seed + step))

    if engine.startswith("zero"):
        import deepspeed
        from deepspeed.utils import safe_get_full_grad

        from bregtop_dist.integrations.deepspeed import initialize

        stage = int(engine[-1])
        # DeepSpeed's default clips at norm 1: not the one-process run
        config = _ds_config(stage, settings, RandomNet.BATCH, gradient_clipping=0.0)
        ds_engine, _, _, _ = initialize(model=model, config=config)

        def step(i: int) -> None:
            ds_engine.backward(ds_engine(data(i)))
            if follower is not None:  # the gradients the engine reduced, before its step
                for mine, theirs in zip(follower.parameters(), model.parameters(), strict=True):
                    mine.grad = safe_get_full_grad(theirs).clone()
                follower_opt.step()
            ds_engine.step()

        def snapshot() -> dict[str, torch.Tensor]:
            with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
                return {k: v.detach().clone() for k, v in model.named_parameters()}
    else:
        if engine == "fsdp2":
            fsdp2(model, world)
        call = DistributedDataParallel(model) if engine == "ddp" else model
        opt = BregTop(model.parameters(), process_group=single if engine == "single" else None, **settings)

        def step(i: int) -> None:
            opt.zero_grad(set_to_none=True)
            call(data(i)).backward()
            opt.step()

        def snapshot() -> dict[str, torch.Tensor]:
            return {k: full(v.detach()).clone() for k, v in model.named_parameters()}

    out = []
    for i in range(REPRO_STEPS):
        step(i)
        if i in (0, REPRO_STEPS - 1):
            out.append(snapshot())
    followed = {k: v.detach().clone() for k, v in follower.named_parameters()} if follower else {}
    return out, followed


def random_models_equal_single(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    """Every engine on a model and optimizer drawn from the run's seed (see RandomNet,
    random_settings) against the one-process run: step 0 bit for bit (ZeRO-1/2: within
    STEP0_ROUNDING), the end within FP32_TOL (ZeRO-1/2: of the one-process run fed their
    gradients, see FOLLOWED).
    Each engine runs (all its collectives) before anything is asserted."""
    seed_file = workdir / "seed"
    seed = int(seed_file.read_text()) if seed_file.is_file() else 0
    want, _ = _random_run("single", seed, world, single)
    got = {engine: _random_run(engine, seed, world, single) for engine in REPRO_ENGINES}
    described = f"RandomNet(seed={seed}), {random_settings(seed)}"
    failures = []
    for engine, ((first, last), followed) in got.items():
        allowed = STEP0_ROUNDING.get(engine, 0.0)
        differ = {name: f"{rel:.2g}" for name, value in first.items()
                  if (rel := float((value - want[0][name]).abs().max() / want[0][name].abs().max())) > allowed}
        if differ:
            failures.append(f"{engine}: after step 0 not bit-identical (relative differences {differ})")
        against = followed or want[1]
        for name, value in last.items():
            rel = float((value - against[name]).abs().max() / against[name].abs().max())
            if rel > FP32_TOL:
                which = "the one-process run fed its gradients" if followed else "the one-process run"
                failures.append(f"{engine}: {name} after {REPRO_STEPS} steps: relative difference {rel:.3g} from {which}")
    assert not failures, f"{described} on {world} ranks:\n" + "\n".join(failures)


SCENARIOS: dict[str, Callable[[int, int, dist.ProcessGroup, Path], None]] = {
    f.__name__: f
    for f in (
        ddp_equals_single, fsdp2_equals_single, fsdp2_bf16_comm, ddp_bf16_comm, kl_without_stagger,
        rank_without_blocks, nonfinite_on_one_rank, settings_differ, state_dict_round_trip, state_is_sharded,
        random_models_equal_single,
    )
}


class Attention(nn.Module):
    """A fused q/k/v projection (param_groups splits it into three parts) beside a plain matrix."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(11, 12)
        self.qkv = nn.Linear(12, 36)
        self.proj = nn.Linear(12, 12)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.embed(idx)).chunk(3, dim=-1)
        att = torch.softmax(q @ k.transpose(-1, -2) / 12**0.5, dim=-1)
        return (self.proj(att @ v) - 0.5).square().mean()


def fused_parts_equal_single(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    """A fused projection preconditioned as its three parts runs under DDP and FSDP2 as in one
    process (its rows cut by FSDP2 across the parts' boundaries)."""
    from torch.nn.parallel import DistributedDataParallel

    settings = {**SETTINGS, "method": "kl"}
    want_model = Attention()
    groups = param_groups(want_model)
    assert any(g.get("parts") == 3 for g in groups), groups
    train(want_model, BregTop(groups, process_group=single, **settings), range(STEPS))
    want = {k: v.detach().clone() for k, v in want_model.named_parameters()}
    ddp_model = Attention()
    train(DistributedDataParallel(ddp_model), BregTop(param_groups(ddp_model), **settings), range(STEPS))
    assert_close(ddp_model, want, FP32_TOL)
    sharded = fsdp2(Attention(), world)
    train(sharded, BregTop(param_groups(sharded), **settings), range(STEPS))
    assert_close(sharded, want, FP32_TOL)


SCENARIOS[fused_parts_equal_single.__name__] = fused_parts_equal_single


def graft_equal_single(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    """graft='adamw' (each block's update at AdamW's norm, its moments owned with the block)
    runs under DDP and FSDP2 as in one process; under FSDP2 saved with
    torch.distributed.checkpoint half-way and resumed by a fresh model and optimizer."""
    from torch.nn.parallel import DistributedDataParallel

    settings = {**SETTINGS, "graft": "adamw"}
    want = reference(single, graft="adamw")
    model = Net()
    train(DistributedDataParallel(model), BregTop(param_groups(model), **settings), range(STEPS))
    assert_close(model, want, FP32_TOL)
    assert_close(_fsdp2_dcp_resumed(world, settings, workdir / "graft"), want, FP32_TOL)


SCENARIOS[graft_equal_single.__name__] = graft_equal_single


def fsdp2_dcp_resume_at_the_same_world_equals_single(rank: int, world: int, single: dist.ProcessGroup,
                                                     workdir: Path) -> None:
    """Saved with torch.distributed.checkpoint by FSDP2 ranks and resumed by as many, where a
    rank's shard of a short parameter is empty (c: 3 rows, conv: 6 on 4 ranks): the AdamW-side
    step counts agree across ranks (DCP saves a plain tensor from one rank, any rank), so the
    resume equals the uninterrupted run. Empty shards once kept step 0, and 4 ranks resumed
    0.04-9% off."""

    def steps_agree(opt: BregTop) -> None:
        steps = [float(entry["step"]) for entry in opt.state_dict()["state"].values() if "step" in entry]
        every = [None] * world
        dist.all_gather_object(every, steps)
        assert all(s == steps for s in every), f"AdamW-side step counts differ across ranks: {every}"

    resumed = _fsdp2_dcp_resumed(world, SETTINGS, workdir / "same-world", before_save=steps_agree)
    assert_close(resumed, reference(single), FP32_TOL)


SCENARIOS[fsdp2_dcp_resume_at_the_same_world_equals_single.__name__] = fsdp2_dcp_resume_at_the_same_world_equals_single


def _fsdp2_dcp_resumed(world: int, settings: dict[str, Any], checkpoint: Path,
                       before_save: Callable[[BregTop], None] | None = None) -> nn.Module:
    """The user's resume under FSDP2: Net trained 3 steps, saved with torch.distributed.checkpoint
    to ``checkpoint`` (``before_save`` sees the optimizer first), loaded into a fresh,
    differently initialised model and optimizer through their state-dict templates (made
    before any step), trained on to STEPS."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    sharded = fsdp2(Net(), world)
    opt = BregTop(param_groups(sharded), **settings)
    train(sharded, opt, range(3))
    if before_save is not None:
        before_save(opt)
    dcp.save(dict(zip(("model", "optim"), get_state_dict(sharded, opt))), checkpoint_id=str(checkpoint))
    resumed = fsdp2(Net(seed=5), world)
    opt = BregTop(param_groups(resumed), **settings)
    msd, osd = get_state_dict(resumed, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(checkpoint))
    set_state_dict(resumed, opt, model_state_dict=msd, optim_state_dict=osd)
    train(resumed, opt, range(3, STEPS))
    return resumed


# ---------------------------------------------------------------------------- DeepSpeed
def _ds_config(stage: int, params: dict[str, Any] | None = None, micro_batch: int = 4, **extra: Any) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": stage},
        "optimizer": {"type": "BregTop", "params": dict(SETTINGS if params is None else params)},
        **extra,
    }


def _zero_equals_single(stage: int, rank: int, world: int, single: dist.ProcessGroup, workdir: Path,
                        **settings: Any) -> None:
    """ZeRO-``stage`` from a DeepSpeed JSON whose optimizer params are SETTINGS with ``settings``
    on top, against the one-process run of the same settings."""
    from bregtop_dist.integrations.deepspeed import initialize

    model = Net()
    config = workdir / f"ds_zero{stage}{''.join(f'_{k}' for k in settings)}.json"
    if rank == 0:
        import json

        config.write_text(json.dumps(_ds_config(stage, {**SETTINGS, **settings})))
    dist.barrier()
    engine, _, _, _ = initialize(model=model, config=config)
    for step in range(STEPS):
        loss = engine(batch(step))
        engine.backward(loss)
        engine.step()
    if stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            got = {k: v.detach().clone() for k, v in model.named_parameters()}
    else:
        got = {k: v.detach().clone() for k, v in model.named_parameters()}
    want = reference(single, **settings)
    for name, value in got.items():
        rel = float((value - want[name]).abs().max() / want[name].abs().max())
        assert rel <= FP32_TOL, f"ZeRO-{stage} {settings} {name}: max relative difference {rel:.3g}"


def zero0_equals_single(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    """Stage 0: DeepSpeed's plain data parallelism; BregTop sees replicated tensors."""
    _zero_equals_single(0, rank, world, single, workdir)


def zero1_equals_single(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _zero_equals_single(1, rank, world, single, workdir)


def zero2_equals_single(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _zero_equals_single(2, rank, world, single, workdir)


def zero3_equals_single(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _zero_equals_single(3, rank, world, single, workdir)


SCENARIOS.update({f.__name__: f for f in (zero0_equals_single, zero1_equals_single, zero2_equals_single, zero3_equals_single)})


def zero_graft_equals_single(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    """graft='adamw' declared in the DeepSpeed JSON: ZeRO-2 (flat fragments) and ZeRO-3
    (partitioned parameters) each run as one process does."""
    for stage in (2, 3):
        _zero_equals_single(stage, rank, world, single, workdir, graft="adamw")


SCENARIOS[zero_graft_equals_single.__name__] = zero_graft_equals_single


def deepspeed_json_runs_the_job_s_optimizer(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    """A job's ``--deepspeed`` JSON path (launch.engines.build): the optimizer built from the
    job's settings record and grouping (here layer b on the AdamW side, which the JSON path
    used to drop) is the one the ZeRO-2 engine steps, equal to the one-process run of it."""
    import json
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from bregtop_dist import BregTopConfig
    from launch.engines import build

    def groups(m: nn.Module) -> list[dict[str, Any]]:
        return param_groups(m, head_names=["b"])

    config = workdir / "ds_job.json"
    if rank == 0:
        config.write_text(json.dumps(_ds_config(2, params={"method": "shampoo", "comm_dtype": "fp32"})))
    dist.barrier()
    model = Net()
    no_accelerator = SimpleNamespace(distributed_type=DistributedType.NO, prepare=lambda x: x)
    engine = build(no_accelerator, model, BregTopConfig(**SETTINGS), config, 4, groups=groups)
    opt = engine.optimizer
    assert isinstance(opt, BregTop) and opt.defaults["method"] == SETTINGS["method"], opt.defaults["method"]
    on_adamw = {n for g in opt.param_groups if not g["bregtop"] for n in g["param_names"]}
    assert "b.weight" in on_adamw, sorted(on_adamw)
    for step in range(STEPS):
        engine.backward(engine.model(batch(step)))
        engine.step()
    got = {k: v.detach().clone() for k, v in model.named_parameters()}
    reference_model = Net()
    train(reference_model, BregTop(groups(reference_model), process_group=single, **SETTINGS), range(STEPS))
    for name, want in reference_model.named_parameters():
        rel = float((got[name] - want.detach()).abs().max() / want.detach().abs().max())
        assert rel <= FP32_TOL, f"{name}: max relative difference {rel:.3g}"
    from bregtop_dist.integrations.deepspeed import initialize

    other = Net()
    try:
        initialize(other, config, optimizer=torch.optim.AdamW(other.parameters()))  # type: ignore[arg-type]
    except TypeError as err:
        assert "optimizer must be a BregTop, not AdamW" in str(err), err
    else:
        raise AssertionError("initialize took torch's AdamW")


SCENARIOS[deepspeed_json_runs_the_job_s_optimizer.__name__] = deepspeed_json_runs_the_job_s_optimizer


def _zero_resume(stage: int, rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    """engine.save_checkpoint after 4 steps, load into a fresh engine, 3 more steps: the same
    parameters as the uninterrupted run."""
    from bregtop_dist.integrations.deepspeed import initialize

    def gathered(model: nn.Module) -> dict[str, torch.Tensor]:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters()), enabled=stage == 3):
            return {k: v.detach().clone() for k, v in model.named_parameters()}

    def run(engine: Any, steps: range) -> None:
        for step in steps:
            loss = engine(batch(step))
            engine.backward(loss)
            engine.step()

    ckpt = workdir / f"ckpt_zero{stage}"
    model = Net()
    engine, _, _, _ = initialize(model=model, config=_ds_config(stage))
    run(engine, range(4))
    engine.save_checkpoint(str(ckpt), tag="step4")
    run(engine, range(4, STEPS))
    want = gathered(model)

    model2 = Net(seed=5)  # different start: everything must come from the checkpoint
    engine2, _, _, _ = initialize(model=model2, config=_ds_config(stage))
    engine2.load_checkpoint(str(ckpt), tag="step4")
    run(engine2, range(4, STEPS))
    got = gathered(model2)
    for name in want:
        assert torch.equal(got[name], want[name]), f"ZeRO-{stage} {name} differs after resume"


def zero2_resume(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _zero_resume(2, rank, world, single, workdir)


def zero3_resume(rank: int, world: int, single: dist.ProcessGroup, workdir: Path) -> None:
    _zero_resume(3, rank, world, single, workdir)


SCENARIOS.update({f.__name__: f for f in (zero2_resume, zero3_resume)})
