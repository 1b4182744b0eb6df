"""``python -m launch.lm``: a GPT-style language model trained with AdamW or any BregTop row.

GPT-2 BPE from the shipped files; Tiny Shakespeare by default, any local text file
(``--data``) or Hub dataset (``--dataset``, needs a network) otherwise; the last
``val_fraction`` of the tokens is the validation set. Prints and logs train loss, validation
loss and perplexity; saves a checkpoint (model and optimizer through
torch.distributed.checkpoint, step) every ``--ckpt-every`` steps and at the end, written
atomically and verified on reading (see :mod:`launch.checkpoints`), and ``--resume`` continues
from the newest complete one exactly, at any process count: batches are chosen by step number,
so the data position is the step (``batch_size`` is per process, so another process count
trains on larger or smaller batches from there). Sizes go from a few layers up to
GPT-2 small (``--preset gpt2``, 124M parameters).

Runs on one process, under ``torchrun --nproc_per_node N -m launch.lm --cpu`` and under
``accelerate launch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from bregtop_dist import METHODS, BregTop, param_groups
from launch import checkpoints
from launch.checkpoints import CheckpointError, check_dcp_metadata
from launch.engines import build
from launch.jobconfig import ConfigError, from_sources, job_parser
from launch.lm_data import DEFAULT_TEXT, GPT2_DIR, DataError, batch_at, gpt2_tokenizer, load_text, token_ids
from launch.models import GPT

PRESETS = {"tiny": (2, 2, 64, 64), "small": (4, 4, 128, 128), "gpt2": (12, 12, 768, 1024)}
"""name -> (layers, heads, dim, block_size)."""


LM_HELP = {
    "method": "adamw or one of the ten BregTop methods",
    "preset": "model size: tiny, small or gpt2 (124M parameters)",
    "layers": "transformer layers (overrides the preset)",
    "heads": "attention heads (overrides the preset)",
    "dim": "model width (overrides the preset)",
    "block_size": "context length in tokens (overrides the preset)",
    "batch_size": "sequences per step and process",
    "max_steps": "training steps",
    "lr": "learning rate",
    "weight_decay": "decoupled weight decay",
    "precondition_frequency": "BregTop's basis refresh period T",
    "eval_every": "evaluate the validation loss every this many steps",
    "eval_batches": "validation batches per evaluation",
    "ckpt_every": "write a checkpoint every this many steps",
    "val_fraction": "share of the text held out for validation",
    "seed": "seed of the model's initialisation and of the batches",
    "data": "the training text (the shipped Tiny Shakespeare by default)",
    "dataset": "a Hub dataset name instead of the text file (needs a network)",
    "tokenizer_dir": "folder with the GPT-2 BPE files (shipped in data/)",
    "cache_dir": "where the tokenised text is cached",
    "out": "output folder: metrics.jsonl, summary.json and checkpoints",
    "resume": "continue from the newest complete checkpoint in OUT",
    "cpu": "run on the CPU even where a GPU is present (for torchrun on a CPU machine)",
    "deepspeed": "a DeepSpeed JSON (configs/deepspeed/) whose optimizer block selects BregTop",
}
"""What each ``launch.lm`` option does, as ``--help`` says it."""


@dataclass(frozen=True)
class LMConfig:
    """Every setting of the job; ``--config FILE`` (YAML) may set any of them."""

    HELP: ClassVar[dict[str, str]] = LM_HELP

    method: str = "bregtop-vn-v2"  # "adamw" or one of the ten BregTop rows
    preset: str = "small"  # tiny | small | gpt2 (124M)
    layers: int | None = None  # override the preset
    heads: int | None = None
    dim: int | None = None
    block_size: int | None = None
    batch_size: int = 16  # per process
    max_steps: int = 200
    lr: float = 1e-3
    weight_decay: float = 0.0
    precondition_frequency: int = 10
    eval_every: int = 50
    eval_batches: int = 8
    ckpt_every: int = 100
    val_fraction: float = 0.1
    seed: int = 0
    data: Path = DEFAULT_TEXT
    dataset: str | None = None
    tokenizer_dir: Path = GPT2_DIR
    cache_dir: Path = Path("runs/cache")
    out: Path = Path("runs/lm")
    resume: bool = False
    cpu: bool = False
    deepspeed: Path | None = None  # a DeepSpeed JSON (configs/deepspeed/) whose optimizer block selects BregTop

    def __post_init__(self) -> None:
        if self.method not in (*METHODS, "adamw"):
            raise ValueError(f"method={self.method!r} is not allowed; use adamw or one of {', '.join(METHODS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is not allowed; use one of {', '.join(PRESETS)}")
        for name in ("batch_size", "max_steps", "precondition_frequency", "eval_every", "eval_batches", "ckpt_every",
                     "layers", "heads", "dim", "block_size"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value!r} must be an integer >= 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction!r} must be in (0, 1)")
        if self.dims[2] % self.dims[1]:
            raise ValueError(f"dim={self.dims[2]} must be a multiple of heads={self.dims[1]}")

    @property
    def dims(self) -> tuple[int, int, int, int]:
        layers, heads, dim, block = PRESETS[self.preset]
        return (self.layers or layers, self.heads or heads, self.dim or dim, self.block_size or block)


def make_optimizer(model: nn.Module, settings: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW, or BregTop with the tied embedding/head, norms and biases on its AdamW side."""
    if settings["method"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"])
    return BregTop(param_groups(model), **settings)


@torch.no_grad()
def evaluate(model: Any, ids: torch.Tensor, cfg: LMConfig, accelerator: Any) -> float:
    model.eval()
    block = cfg.dims[3]
    losses = []
    for i in range(cfg.eval_batches):
        x, y = batch_at(ids, -1 - i, cfg.batch_size, block, cfg.seed, accelerator.process_index, accelerator.num_processes)
        _, loss = model(x.to(accelerator.device), y.to(accelerator.device))
        losses.append(accelerator.reduce(loss.detach(), reduction="mean"))
    model.train()
    return float(torch.stack(losses).mean())


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
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    check_dcp_metadata(folder)
    msd, osd = get_state_dict(model, opt)
    dcp.load({"model": msd, "optim": osd}, checkpoint_id=str(folder))
    set_state_dict(model, opt, model_state_dict=msd, optim_state_dict=osd)


def build_parser() -> argparse.ArgumentParser:
    return job_parser(LMConfig, "python -m launch.lm", __doc__.split("\n\n")[0], "configs/lm/")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(from_sources(LMConfig, args.config, args))
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"python -m launch.lm: error: {err}", file=sys.stderr)
        return 2


def run(cfg: LMConfig) -> int:
    from accelerate import Accelerator

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
    if cfg.resume:
        try:
            resume_from, marker = checkpoints.latest(ckpt_root)
        except CheckpointError as err:
            raise DataError(f"--resume: {err}") from None
        start = int(marker["step"])
    if cfg.method == "adamw" and cfg.deepspeed is not None:
        raise ConfigError("--deepspeed configs select BregTop; run adamw without --deepspeed")
    overrides: dict[str, Any] = {"method": cfg.method, "lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.method != "adamw":
        overrides["precondition_frequency"] = cfg.precondition_frequency
    engine = build(accelerator, model, make_optimizer, overrides, cfg.deepspeed, cfg.batch_size)
    model, opt = engine.model, engine.optimizer
    direct_ds = cfg.deepspeed is not None and hasattr(model, "save_checkpoint")
    if resume_from is not None:
        if direct_ds:
            from bregtop_dist.integrations.deepspeed import load_checkpoint

            load_checkpoint(model, resume_from / "deepspeed", tag="resume")
        else:
            load_state(resume_from, *_plain(model, opt, accelerator))

    main_proc = accelerator.is_main_process
    metrics = None
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        metrics = (out / "metrics.jsonl").open("a" if cfg.resume else "w")
        n = sum(p.numel() for p in (model.module if direct_ds else accelerator.unwrap_model(model)).parameters())
        print(f"{cfg.method}: {layers} layers, {heads} heads, dim {dim}, block {block}, {n:,} parameters; "
              f"{train_ids.numel():,} train / {val_ids.numel():,} val tokens; {accelerator.num_processes} "
              f"process(es) on {accelerator.device}; steps {start}..{cfg.max_steps}", flush=True)
        print(f"{'step':>6}{'train loss':>12}{'val loss':>10}{'val ppl':>10}{'ms/step':>9}", flush=True)

    def save(step: int) -> None:
        def write(folder: Path) -> None:
            if direct_ds:  # the engine writes model, BregTop state of every rank, and its own state
                model.save_checkpoint(str(folder / "deepspeed"), tag="resume")
            else:
                save_state(folder, *_plain(model, opt, accelerator))

        config = {k: str(v) for k, v in dataclasses.asdict(cfg).items()}
        checkpoints.save(ckpt_root, step, write, {"config": config, "processes": accelerator.num_processes},
                         main_proc, accelerator.wait_for_everyone)

    model.train()
    train_loss, t0 = math.nan, time.perf_counter()
    for step in range(start, cfg.max_steps):
        x, y = batch_at(train_ids, step, cfg.batch_size, block, cfg.seed, accelerator.process_index, accelerator.num_processes)
        _, loss = model(x.to(accelerator.device), y.to(accelerator.device))
        engine.backward(loss)
        engine.step()
        train_loss = float(accelerator.reduce(loss.detach(), reduction="mean"))
        done = step + 1
        if done % cfg.eval_every == 0 or done == cfg.max_steps:
            val = evaluate(model, val_ids, cfg, accelerator)
            ms = (time.perf_counter() - t0) * 1e3 / max(1, done - start)
            if main_proc and metrics is not None:
                print(f"{done:>6}{train_loss:>12.4f}{val:>10.4f}{math.exp(val):>10.1f}{ms:>9.0f}", flush=True)
                metrics.write(json.dumps({"step": done, "train_loss": train_loss, "val_loss": val,
                                          "val_ppl": math.exp(val), "lr": cfg.lr, "ms_per_step": ms}) + "\n")
                metrics.flush()
        if done % cfg.ckpt_every == 0 or done == cfg.max_steps:
            save(done)
    if metrics is not None:
        metrics.close()
        print(f"wrote {out / 'metrics.jsonl'} and {ckpt_root}")
    accelerator.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
