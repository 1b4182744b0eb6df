"""``python -m launch.lm``: a GPT-style language model trained with AdamW or any BregTop row.

GPT-2 BPE from the shipped files; Tiny Shakespeare by default, any local text file
(``--data``) or Hub dataset (``--dataset``, needs a network) otherwise; the last
``val_fraction`` of the tokens is the validation set. Prints and logs train loss, validation
loss and perplexity every ``--eval-every`` steps (the train loss is the mean since the last
line, ms/step the training time alone, without evaluation and checkpoint writes) to
``OUT/metrics.jsonl``, a tqdm bar when stdout is a terminal; at the end ``OUT/loss.png`` and
``OUT/summary.json``. The lr follows a constant or warm-up + cosine schedule (torch's
schedulers, :mod:`launch.schedule`); ``--grad-clip`` clips the gradients' global norm. Saves a
checkpoint (model and optimizer through torch.distributed.checkpoint, step, the scheduler's
state) every ``--ckpt-every`` steps and at the end, written atomically and verified on reading
(see :mod:`launch.checkpoints`), and ``--resume`` continues from the newest complete one
exactly, at any process count: batches are chosen by step number, so the data position is the
step (``batch_size`` is per process, so another process count trains on larger or smaller
batches from there). Sizes go from a few layers up to GPT-2 small (``--preset gpt2``, 124M
parameters).

Runs on one process, under ``torchrun --nproc_per_node N -m launch.lm --cpu`` and under
``accelerate launch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bregtop_dist import param_groups
from launch import checkpoints
from launch.checkpoints import CheckpointError
from launch.engines import build
from launch.jobconfig import ConfigError, JobConfig, from_sources, job_parser
from launch.lm_data import DEFAULT_TEXT, GPT2_DIR, DataError, batch_at, gpt2_tokenizer, load_text, token_ids
from launch.models import GPT
from launch.parallel import MeshLayout, parallelize
from launch.schedule import SCHEDULES, make_scheduler

PRESETS = {"tiny": (2, 2, 64, 64), "small": (4, 4, 128, 128), "gpt2": (12, 12, 768, 1024)}
"""name -> (layers, heads, dim, block_size)."""


@dataclass(frozen=True, kw_only=True)
class LMConfig(JobConfig):
    """Every setting of the job; ``--config FILE`` (YAML) may set any of them."""

    HELP: ClassVar[dict[str, str]] = {
        **JobConfig.HELP,
        "method": "adamw or one of the ten BregTop methods; the default is BregTop's own",
        "preset": "model size: tiny, small or gpt2 (124M parameters)",
        "layers": "transformer layers (overrides the preset)",
        "heads": "attention heads (overrides the preset)",
        "dim": "model width (overrides the preset)",
        "block_size": "context length in tokens (overrides the preset)",
        "batch_size": "sequences per step and process",
        "max_steps": "training steps",
        "schedule": "learning-rate schedule: constant, or cosine (decays to min_lr_ratio times lr at max_steps)",
        "warmup_steps": "steps of linear warm-up from lr/(warmup_steps+1) up to lr (0: none)",
        "min_lr_ratio": "cosine only: the lr at max_steps as a fraction of lr",
        "grad_clip": "clip the gradients' global L2 norm to this (0: off); with --deepspeed it sets gradient_clipping",
        "eval_every": "evaluate the validation loss every this many steps",
        "eval_batches": "validation batches per evaluation",
        "ckpt_every": "write a checkpoint every this many steps",
        "val_fraction": "share of the text held out for validation",
        "data": "the training text (the shipped Tiny Shakespeare by default)",
        "tokenizer_dir": "folder with the GPT-2 BPE files (shipped in data/)",
        "cache_dir": "where the tokenised text is cached",
        "out": "output folder: metrics.jsonl, summary.json, loss.png and checkpoints",
        "resume": "continue from the newest complete checkpoint in OUT",
        "tp": "tensor-parallel degree under torchrun: each block's MLP split over this many ranks, FSDP2 over the rest",
        "replicate": "HSDP under torchrun: this many replicas, each sharding the model (FSDP2) over the rest",
    }
    """What each ``launch.lm`` option does, as ``--help`` says it."""
    POSITIVE: ClassVar[tuple[str, ...]] = ("batch_size", "max_steps", "eval_every", "eval_batches", "ckpt_every",
                                           "layers", "heads", "dim", "block_size", "tp", "replicate")

    max_steps: int = 200
    batch_size: int = 16  # per process
    out: Path = Path("runs/lm")
    preset: str = "small"  # tiny | small | gpt2 (124M)
    layers: int | None = None  # override the preset
    heads: int | None = None
    dim: int | None = None
    block_size: int | None = None
    schedule: str = "constant"  # constant | cosine (to min_lr_ratio * lr at max_steps)
    warmup_steps: int = 0  # linear warm-up to lr first
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.0  # max global gradient norm; 0: off
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 100
    val_fraction: float = 0.1
    data: Path = DEFAULT_TEXT
    tokenizer_dir: Path = GPT2_DIR
    tp: int = 1  # tensor-parallel degree (launch.parallel)
    replicate: int = 1  # HSDP replicas

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not allowed; use one of {', '.join(PRESETS)}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule={self.schedule!r} is not allowed; use one of {', '.join(SCHEDULES)}")
        if self.warmup_steps < 0 or (self.schedule == "cosine" and self.warmup_steps >= self.max_steps):
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be >= 0"
                             + (f" and below max_steps={self.max_steps}" if self.schedule == "cosine" else ""))
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio!r} must be in [0, 1]")
        if not self.grad_clip >= 0.0:
            raise ValueError(f"grad_clip={self.grad_clip!r} must be >= 0 (0: off)")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction!r} must be in (0, 1)")
        if self.dims[2] % self.dims[1]:
            raise ValueError(f"dim={self.dims[2]} must be a multiple of heads={self.dims[1]}")
        if self.mesh.used and self.deepspeed is not None:
            raise ValueError("--tp and --replicate build the mesh with FSDP2; they do not combine with --deepspeed")
        if self.tp > 1 and (4 * self.dims[2]) % self.tp:
            raise ValueError(f"tp={self.tp} must divide the MLP width 4 x dim = {4 * self.dims[2]}")

    @property
    def mesh(self) -> MeshLayout:
        return MeshLayout(self.replicate, self.tp)

    @property
    def dims(self) -> tuple[int, int, int, int]:
        layers, heads, dim, block = PRESETS[self.preset]
        return (self.layers or layers, self.heads or heads, self.dim or dim, self.block_size or block)


@torch.no_grad()
def evaluate(model: Any, ids: torch.Tensor, cfg: LMConfig, accelerator: Any) -> float:
    model.eval()
    block = cfg.dims[3]
    losses = []
    for i in range(cfg.eval_batches):
        x, y = batch_at(ids, -1 - i, cfg.batch_size, block, cfg.seed, *data_rank(cfg, accelerator))
        _, loss = model(x.to(accelerator.device), y.to(accelerator.device))
        losses.append(accelerator.reduce(loss.detach(), reduction="mean"))
    model.train()
    return float(torch.stack(losses).mean())


def data_rank(cfg: LMConfig, accelerator: Any) -> tuple[int, int]:
    """(index, count) of this process among those that take different batches."""
    return cfg.mesh.data_rank() if cfg.mesh.used else (accelerator.process_index, accelerator.num_processes)


def _plain(model: Any, opt: Any, accelerator: Any) -> tuple[nn.Module, torch.optim.Optimizer]:
    """The model and optimizer inside Accelerate's wrappers (what torch.distributed.checkpoint reads)."""
    return accelerator.unwrap_model(model), getattr(opt, "optimizer", opt)


def save_state(folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Model and optimizer into ``folder`` with torch.distributed.checkpoint (every rank)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(folder))


def load_state(folder: Path, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """Model and optimizer from a folder :func:`save_state` wrote, at any process count."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from launch import dcp_reading

    msd, osd = get_state_dict(model, opt)
    dcp_reading.load({"model": msd, "optim": osd}, folder)
    dcp_reading.refuse_non_finite(msd, folder, "model weight")
    try:  # the optimizer checks its state itself and raises alike on every rank
        set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)
    except ValueError as err:
        raise CheckpointError(f"{str(folder)!r}: {err}") from None


def build_parser() -> argparse.ArgumentParser:
    return job_parser(LMConfig, "python -m launch.lm", __doc__.split("\n\n")[0], "configs/lm/")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(from_sources(LMConfig, args.config, args))
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"python -m launch.lm: error: {err}", file=sys.stderr)
        return 2


def typed_config(cfg: LMConfig) -> dict[str, Any]:
    """The settings as JSON values: numbers, bools and null as they are, paths as strings."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(cfg).items()}


SCHEDULE_SETTINGS = ("optimizer.lr", "schedule", "warmup_steps", "min_lr_ratio")
CHANGEABLE_ON_RESUME = (
    "max_steps", "eval_every", "eval_batches", "ckpt_every", "grad_clip",
    "out", "cache_dir", "data", "tokenizer_dir", "resume", "cpu", "tp", "replicate",
    "optimizer.backend", "optimizer.rotation_precision",
)
"""Settings ``--resume`` may change, each from the first resumed step: how long the run goes
(``max_steps``, unless the cosine schedule's horizon depends on it), how often it logs,
evaluates and saves, gradient clipping, where its files are, and how BregTop computes the same
step (``backend``, ``rotation_precision``). Every other setting must be the checkpoint's:
the optimizer's would otherwise be overwritten by the saved ``param_groups`` or meet a state
built for others, the model's and data's would make another run."""


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optimizer": {"lr": x}}`` as ``{"optimizer.lr": x}``."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _same_setting(then: Any, now: Any) -> bool:
    if then == now:
        return True
    if isinstance(then, str) and not isinstance(now, str):  # older markers hold every setting as a string
        return then in (str(now), str(tuple(now)) if isinstance(now, list) else str(now))
    return False


def check_resume(cfg: LMConfig, marker: dict[str, Any]) -> None:
    """Refuse, in one line naming the setting and both values, a ``--resume`` whose settings
    differ from the checkpoint's in anything but :data:`CHANGEABLE_ON_RESUME`. The lr schedule
    continues exactly only as saved (for cosine also ``max_steps``, its horizon). A marker that
    lacks a setting (written before it existed) ran its default."""
    saved = marker.get("config")
    if not isinstance(saved, dict):
        raise CheckpointError("--resume: the checkpoint's manifest holds no settings ('config')")
    if "optimizer" not in saved and "lr" in saved:  # markers before the nesting held lr at the top
        saved = {**saved, "optimizer": {"lr": saved["lr"]}}
    then_flat = _flat(saved)
    now_flat = _flat(json.loads(json.dumps(typed_config(cfg))))
    defaults = _flat(json.loads(json.dumps(typed_config(LMConfig()))))
    fixed_horizon = ("max_steps",) if cfg.schedule == "cosine" else ()
    for key, now in now_flat.items():
        if key in CHANGEABLE_ON_RESUME and key not in fixed_horizon:
            continue
        then = then_flat.get(key, defaults[key])
        if _same_setting(then, now):
            continue
        name = key.rsplit(".", 1)[-1]
        flag = f"--{name.replace('_', '-')}"
        shown = " ".join(map(str, then)) if isinstance(then, list) else then
        if key in SCHEDULE_SETTINGS or key in fixed_horizon:
            why = f"the lr schedule continues exactly only as saved (pass {flag} {shown})"
        else:
            why = (f"a resumed run continues with the checkpoint's settings (pass {flag} {shown}, or start a new "
                   f"run in another --out); only {', '.join(c.rsplit('.', 1)[-1] for c in CHANGEABLE_ON_RESUME)} "
                   "may change on resume")
        raise ConfigError(f"--resume: {name}={'null' if now is None else now} differs from the checkpoint's "
                          f"{'null' if then is None else then}; {why}")


def advance_scheduler(scheduler: Any, start: int, marker: dict[str, Any], where: Path) -> None:
    """Advance the fresh ``scheduler`` to step ``start`` (before the optimizer state loads: torch's
    schedulers step from the lr the groups hold) and refuse a checkpoint whose recorded
    scheduler state differs: the schedule is a function of the settings (equal, see
    :func:`check_resume`) and the step, so the manifest's copy is a check, not an input."""
    import warnings

    with warnings.catch_warnings():  # stepping the schedule before the optimizer is the point here
        warnings.filterwarnings("ignore", message="Detected call of", category=UserWarning)
        for _ in range(start):
            scheduler.step()
    saved = marker.get("scheduler")
    if saved is not None:
        ours = json.loads(json.dumps(scheduler.state_dict()))
        if saved != ours:
            raise CheckpointError(f"{str(where)!r}: the scheduler state it records is not the schedule's at step "
                                  f"{start} (recorded last lr {saved.get('_last_lr') if isinstance(saved, dict) else saved!r}, "
                                  f"the schedule's {ours.get('_last_lr')}); delete the folder to resume from the "
                                  "checkpoint before it")


def apply_changeable(cfg: LMConfig, opt: torch.optim.Optimizer) -> None:
    """The optimizer settings among :data:`CHANGEABLE_ON_RESUME`, written over the param
    groups a checkpoint loaded (which hold the saved values)."""
    for key in CHANGEABLE_ON_RESUME:
        if key.startswith("optimizer."):
            name = key.split(".", 1)[1]
            for group in opt.param_groups:
                if name in group:
                    group[name] = getattr(cfg.optimizer, name)


@dataclass
class Interval:
    """What one log line reports since the one before: the mean training loss (summed on the
    device, read once) and gradient norm, and the training time alone (the clock is stopped
    around evaluation and checkpoint writes)."""

    steps: int = 0
    loss: Any = 0.0
    norm: Any = 0.0
    norms: int = 0
    seconds: float = 0.0
    started: float | None = None

    def add(self, loss: torch.Tensor, norm: Any) -> None:
        self.steps += 1
        self.loss = self.loss + loss.detach()
        if norm is not None:
            self.norm, self.norms = self.norm + norm, self.norms + 1

    def start(self) -> None:
        self.started = time.perf_counter()

    def stop(self, device: torch.device) -> None:
        if device.type == "cuda":  # the queued steps belong to training, not to what follows
            torch.cuda.synchronize(device)
        if self.started is not None:
            self.seconds += time.perf_counter() - self.started
        self.started = None


def plot_losses(metrics: Path, path: Path, title: str = "") -> None:
    """Train loss (mean of each interval) and validation loss against the step, from the log
    (the newest line of a step wins: a resumed run logs again what came after its checkpoint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = {row["step"]: row for row in map(json.loads, metrics.read_text().splitlines())}
    steps = sorted(rows)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(steps, [rows[s]["train_loss"] for s in steps], marker=".", label="train (mean since the last point)")
    ax.plot(steps, [rows[s]["val_loss"] for s in steps], marker=".", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: LMConfig) -> int:
    from accelerate import Accelerator
    from tqdm import tqdm

    accelerator = Accelerator(cpu=cfg.cpu)
    tokenizer = gpt2_tokenizer(cfg.tokenizer_dir)
    with accelerator.main_process_first():
        ids = token_ids(load_text(cfg.data, cfg.dataset), tokenizer, cfg.cache_dir)
    cut = int(ids.numel() * (1.0 - cfg.val_fraction))
    train_ids, val_ids = ids[:cut], ids[cut:]
    layers, heads, dim, block = cfg.dims

    torch.manual_seed(cfg.seed)
    model = GPT(tokenizer.get_vocab_size(), layers, heads, dim, block)
    out = Path(cfg.out)
    ckpt_root = out / "ckpt"
    start = 0
    resume_from: Path | None = None
    marker: dict[str, Any] = {}
    if cfg.resume:
        try:
            resume_from, marker = checkpoints.latest(ckpt_root)
        except CheckpointError as err:
            raise DataError(f"--resume: {err}") from None
        start = marker["step"]
        processes = marker.get("processes")
        if type(processes) is not int or processes < 1:
            raise CheckpointError(f"--resume: {str(resume_from / checkpoints.MARKER)!r} records processes="
                                  f"{processes!r}, not a count of processes")
        check_resume(cfg, marker)
    if cfg.mesh.used:
        if accelerator.num_processes == 1:
            raise ConfigError("--tp and --replicate shard the model over processes: start the job with torchrun")
        try:
            cfg.mesh.check(accelerator.num_processes)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        model = parallelize(model.to(accelerator.device), cfg.mesh)
    engine = build(accelerator, model, cfg.row_config(), cfg.deepspeed, cfg.batch_size, adamw=cfg.method == "adamw",
                   groups=functools.partial(param_groups, split_fused=cfg.split_qkv),
                   grad_clip=cfg.grad_clip, parallelized=cfg.mesh.used)  # a DeepSpeed engine clips itself
    model, opt = engine.model, engine.optimizer
    ds_engine = hasattr(model, "get_global_grad_norm")  # directly or through Accelerate
    direct_ds = cfg.deepspeed is not None and hasattr(model, "save_checkpoint")
    scheduler = make_scheduler(opt, cfg.schedule, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    if resume_from is not None:
        advance_scheduler(scheduler, start, marker, resume_from / checkpoints.MARKER)
        if direct_ds:
            from bregtop_dist.integrations.deepspeed import load_checkpoint

            try:
                load_checkpoint(model, resume_from / "deepspeed", tag="resume")
            except ValueError as err:  # a refused file, or BregTop's state refused alike on every rank
                raise CheckpointError(str(err)) from None
        else:
            load_state(resume_from, *_plain(model, opt, accelerator))
        apply_changeable(cfg, opt)
        for group, lr in zip(opt.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr  # the next step's lr, whatever the loaded optimizer state held

    main_proc = accelerator.is_main_process
    metrics = None
    # a bar on a terminal (tqdm's disable=None), the log lines above it or alone
    bar = tqdm(total=cfg.max_steps, initial=start, file=sys.stdout, unit="step", dynamic_ncols=True,
               disable=None if main_proc else True)

    def show(text: str, **postfix: str) -> None:
        bar.set_postfix(postfix, refresh=False)
        bar.write(text, file=sys.stdout)
        sys.stdout.flush()

    n_params = sum(p.numel() for p in (model.module if direct_ds else accelerator.unwrap_model(model)).parameters())
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        metrics = (out / "metrics.jsonl").open("a" if cfg.resume else "w")
        show(f"{cfg.method}: {layers} layers, {heads} heads, dim {dim}, block {block}, {n_params:,} "
                      f"parameters; {train_ids.numel():,} train / {val_ids.numel():,} val tokens; "
                      f"{accelerator.num_processes} process(es) on {accelerator.device}; steps {start}..{cfg.max_steps}")
        show(f"{'step':>6}{'train loss':>12}{'val loss':>10}{'val ppl':>10}{'lr':>10}{'grad norm':>11}"
                      f"{'ms/step':>9}")

    def save(step: int) -> None:
        def write(folder: Path) -> None:
            if direct_ds:  # the engine writes model, BregTop state of every rank, and its own state
                model.save_checkpoint(str(folder / "deepspeed"), tag="resume")
            else:
                save_state(folder, *_plain(model, opt, accelerator))

        info = {"config": typed_config(cfg), "processes": accelerator.num_processes,
                "scheduler": scheduler.state_dict()}
        checkpoints.save(ckpt_root, step, write, info, main_proc, accelerator.wait_for_everyone)

    model.train()
    started = time.perf_counter()
    interval, train_seconds, last = Interval(), 0.0, None
    interval.start()
    for step in range(start, cfg.max_steps):
        x, y = batch_at(train_ids, step, cfg.batch_size, block, cfg.seed, *data_rank(cfg, accelerator))
        _, loss = model(x.to(accelerator.device), y.to(accelerator.device))
        engine.backward(loss)
        norm = None
        if cfg.grad_clip and not ds_engine:
            norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        engine.step()
        if ds_engine:
            norm = model.get_global_grad_norm()
        lr = opt.param_groups[0]["lr"]  # the lr this step used
        scheduler.step()
        interval.add(loss, norm)
        bar.update(1)
        done = step + 1
        log = done % cfg.eval_every == 0 or done == cfg.max_steps
        ckpt = done % cfg.ckpt_every == 0 or done == cfg.max_steps
        if log or ckpt:
            interval.stop(accelerator.device)
        if log:
            train = float(accelerator.reduce(interval.loss, reduction="mean")) / interval.steps
            grad = float(interval.norm) / interval.norms if interval.norms else None
            val = evaluate(model, val_ids, cfg, accelerator)
            ms = interval.seconds * 1e3 / interval.steps
            train_seconds += interval.seconds
            last = {"step": done, "train_loss": train, "val_loss": val, "val_ppl": math.exp(val), "lr": float(lr),
                    "grad_norm": grad, "ms_per_step": ms}
            if main_proc and metrics is not None:
                show(f"{done:>6}{train:>12.4f}{val:>10.4f}{math.exp(val):>10.1f}{lr:>10.2e}"
                              f"{'-' if grad is None else f'{grad:.3g}':>11}{ms:>9.0f}",
                              loss=f"{train:.4f}", val=f"{val:.4f}")
                metrics.write(json.dumps(last) + "\n")
                metrics.flush()
            interval = Interval()
        if ckpt:
            save(done)
        if log or ckpt:
            interval.start()
    bar.close()
    if main_proc and metrics is not None:
        metrics.close()
        plot_losses(out / "metrics.jsonl", out / "loss.png", f"{cfg.method}: {layers} layers, dim {dim}, block {block}")
        steps = cfg.max_steps - start
        summary = {
            "config": typed_config(cfg), "processes": accelerator.num_processes, "parameters": n_params,
            "resumed_from": start if cfg.resume else None, "final_step": cfg.max_steps,
            **{k: v for k, v in (last or {}).items() if k != "step"},  # the last log line's figures
            "train_ms_per_step": train_seconds * 1e3 / steps if steps and last else None,
            "wall_time_s": time.perf_counter() - started,
            "metrics": str(out / "metrics.jsonl"), "plot": str(out / "loss.png"), "checkpoints": str(ckpt_root),
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"wrote {out / 'metrics.jsonl'}, {out / 'summary.json'}, {out / 'loss.png'} and {ckpt_root}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group under torchrun: gloo may abort at exit otherwise
    return 0


if __name__ == "__main__":
    sys.exit(main())
