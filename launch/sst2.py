"""``python -m launch.sst2``: the paper's SST-2 optimisation-speed experiment (section 6,
appendix D, Table 4).

A randomly initialised Transformer encoder (4 layers, hidden 128, 8 heads) is trained on the
full SST-2 training set with MSE on one-hot targets, batch 128, lr 1e-3 for both parameter
groups, no weight decay; Adam for embeddings, biases, norms and the head, the chosen method
for the other matrices. The measure is the number of steps until the EMA (0.98) of the
training loss falls below 0.05; the EMA starts at the first step's loss.

Each (method, seed) is one row: ``seeds="0,1,2"`` trains every method once per seed, the seed
fixing both the model's initialisation and the data order. Writes ``OUT/metrics.jsonl`` (one
line per step, with its method and seed), ``OUT/summary.json`` (one entry per row, keyed
``METHOD/seedN``), ``OUT/ema_loss.png`` (the training loss of every row in the summary, raw and
faint under a bias-corrected EMA) and prints a table (with the paper's counts beside rows that
ran the protocol's length, ``max_steps`` >= 2000). Runs on one process, under ``torchrun ... --cpu`` and under ``accelerate launch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from bregtop_dist import METHODS, BregTopConfig, NonFiniteGradientError, param_groups
from launch.engines import build
from launch.jobconfig import ConfigError, JobConfig, from_sources, job_parser, parse_list
from launch.models import EncoderClassifier
from launch.sst2_data import DEFAULT_DEV, DEFAULT_TRAIN, DataError, Encoded, collate, load_sst2, wordpiece

PAPER_TABLE4 = {
    "shampoo": 1119, "kl": 1092, "vn-v1": 1141, "vn-v2": 1127, "f-v1": 1598, "f-v2": 1602,
    "bregtop-vn-v1": 1018, "bregtop-vn-v2": 1003, "bregtop-f-v1": 1084, "bregtop-f-v2": 1059,
}
PROTOCOL_STEPS = 2000  # a row with max_steps below this is not comparable with PAPER_TABLE4


@dataclass(frozen=True, kw_only=True)
class SST2Config(JobConfig):
    """Every setting of the job; ``--config FILE`` (YAML) may set any of them."""

    HELP: ClassVar[dict[str, str]] = {
        **JobConfig.HELP,
        "method": "optimizer row(s): one of the ten Table 4 methods, adamw, a comma-separated list, or all; "
                  "the default is the paper's BregTop-VN-v2 (BregTop's own default is kl)",
        "max_steps": "steps per row at most",
        "target_loss": "a row has reached the target once the EMA of its training loss is below this",
        "ema": "decay of the training-loss EMA that is judged (the paper's 0.98)",
        "stop_at_target": "stop a row once it reaches the target",
        "seeds": "comma-separated seeds (\"0,1,2\"), one row per method and seed; replaces --seed",
        "out": "output folder: metrics.jsonl, summary.json, table and plot",
        "batch_size": "sentences per step, over all processes",
        "exponent": "the shampoo row's p of S^-p: 0.25 or 0.5 (unset: 0.25); the other rows' is fixed at 1/2",
        "loss_reduction": "mean (F.mse_loss over batch and classes) or sum (summed over classes)",
        "vocab_size": "WordPiece vocabulary size (the shipped vocabulary is used when it matches)",
        "max_len": "tokens per sentence at most",
        "dim": "model width",
        "layers": "transformer encoder layers",
        "heads": "attention heads",
        "ff": "feed-forward width",
        "dropout": "dropout probability",
        "train_file": "SST-2 training sentences (TSV)",
        "dev_file": "SST-2 dev sentences (TSV)",
        "cache_dir": "where a WordPiece vocabulary trained here is kept",
        "log_every": "print a line every this many steps",
        "resume": "skip rows already in OUT/summary.json with the same settings",
    }
    """What each ``launch.sst2`` option does, as ``--help`` says it."""
    OPTIMIZER_OWN: ClassVar[tuple[str, ...]] = ("method", "exponent", "bregtop")
    POSITIVE: ClassVar[tuple[str, ...]] = ("max_steps", "batch_size", "vocab_size", "max_len", "dim", "layers",
                                           "heads", "ff", "log_every")

    # The job is the paper's experiment, which it ran with BregTop-VN-v2: that is its default
    # (README: "the paper's SST-2 experiment with BregTop-VN-v2"), not BregTop's own (kl).
    method: str = "bregtop-vn-v2"
    max_steps: int = 3000
    batch_size: int = 128  # global, over all processes
    out: Path = Path("runs/sst2")
    target_loss: float = 0.05
    ema: float = 0.98
    stop_at_target: bool = True
    seeds: str | None = None  # one row per (method, seed); replaces seed
    exponent: float | None = None  # the shampoo row's p of S^-p (None: BregTop's default, 0.25)
    loss_reduction: str = "mean"
    vocab_size: int = 30000
    max_len: int = 128
    dim: int = 128
    layers: int = 4
    heads: int = 8
    ff: int = 512
    dropout: float = 0.0
    train_file: Path = DEFAULT_TRAIN
    dev_file: Path = DEFAULT_DEV
    log_every: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.ema < 1.0:
            raise ValueError(f"ema={self.ema!r} must be in (0, 1)")
        if not self.target_loss > 0.0:
            raise ValueError(f"target_loss={self.target_loss!r} must be > 0")
        if self.loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction={self.loss_reduction!r} is not allowed; use mean or sum")
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout!r} must be in [0, 1)")
        if self.seeds is not None:
            if self.seed != 0:
                raise ValueError(f"seed={self.seed!r} and seeds={self.seeds!r}: set one of them, not both")
            parse_list(self.seeds, "seeds")
        if self.exponent is not None and "shampoo" not in self.methods:
            raise ValueError(f"exponent={self.exponent!r} applies to the shampoo row only, which "
                             f"method={self.method!r} does not run")

    @property
    def methods(self) -> tuple[str, ...]:
        if self.method == "all":
            return METHODS
        return tuple(dict.fromkeys(m.strip() for m in self.method.split(",") if m.strip()))

    @property
    def seed_list(self) -> tuple[int, ...]:
        """The seeds to run: ``seeds`` when given, else ``seed``."""
        if self.seeds is None:
            return (self.seed,)
        return tuple(dict.fromkeys(parse_list(self.seeds, "seeds")))

    def row_config(self, method: str | None = None) -> BregTopConfig:
        """The settings of a row: ``optimizer`` with the row's method, and ``exponent`` on the
        shampoo row only (adamw: the record as it is)."""
        if method != "shampoo" or self.exponent is None:
            return super().row_config(method)
        return dataclasses.replace(self.optimizer, method=method, exponent=self.exponent)

    def fingerprint(self, method: str | None = None, seed: int | None = None) -> dict[str, Any]:
        """The settings a row's result depends on (what ``--resume`` compares), as strings: the
        row's seed in place of seed/seeds, exponent only on the shampoo row, the one that uses
        it, and BregTop's settings flat: lr, precondition_frequency, eig_floor, init and
        init_factor always (the settings of summaries written before the nesting), any other
        only where it is not BregTop's default."""
        skip = {"method", "seeds", "out", "resume", "log_every", "cache_dir", "cpu", "deepspeed", "optimizer"}
        out = {k: str(v) for k, v in dataclasses.asdict(self).items() if k not in skip}
        default = BregTopConfig().as_defaults()
        always = ("lr", "precondition_frequency", "eig_floor", "init", "init_factor")
        for key, value in self.optimizer.as_defaults().items():
            if key in always or (key not in self.OPTIMIZER_OWN and value != default[key]):
                out[key] = str(value)
        out["seed"] = str(self.seed_list[0] if seed is None else seed)
        if method is not None and method != "shampoo":
            out["exponent"] = "None"
        return out


def row_key(method: str, seed: int) -> str:
    """The summary.json key of one (method, seed) row."""
    return f"{method}/seed{seed}"


# ----------------------------------------------------------------------------- training
def mse(logits: torch.Tensor, labels: torch.Tensor, reduction: str) -> torch.Tensor:
    target = F.one_hot(labels, logits.shape[-1]).to(logits.dtype)
    if reduction == "mean":
        return F.mse_loss(logits, target)
    return (logits - target).square().sum(-1).mean()


def run_method(method: str, seed: int, cfg: SST2Config, accelerator: Any, train: Encoded, dev: Encoded,
               vocab: int, metrics: Any) -> dict[str, Any]:
    """Train one method from the initialisation and data order of ``seed``; its summary row."""
    torch.manual_seed(seed)
    model = EncoderClassifier(vocab, cfg.dim, cfg.layers, cfg.heads, cfg.ff, cfg.max_len, dropout=cfg.dropout)
    n_params = sum(p.numel() for p in model.parameters())
    if cfg.batch_size % accelerator.num_processes:
        raise ConfigError(f"batch_size={cfg.batch_size} must be a multiple of the {accelerator.num_processes} processes")
    per_process = cfg.batch_size // accelerator.num_processes
    row = cfg.row_config(method)
    applied: dict[str, Any] = dict.fromkeys(("init", "init_factor", "exponent", "eig_floor"))
    if method != "adamw":
        applied = {"init": row.init, "init_factor": row.init_factor, "exponent": row.resolved_exponent,
                   "eig_floor": row.eig_floor}
    engine = build(accelerator, model, row, cfg.deepspeed, per_process, adamw=method == "adamw",
                   groups=lambda m: param_groups(m, head_names=["head"], split_fused=cfg.split_qkv))  # Adam on the head
    opt = engine.optimizer
    loader = engine.prepare_loader(DataLoader(train, batch_size=per_process, shuffle=True, drop_last=True,
                                              collate_fn=collate, generator=torch.Generator().manual_seed(seed)))
    dev_loader = engine.prepare_loader(DataLoader(dev, batch_size=256, collate_fn=collate))
    model = engine.model

    quiet = not accelerator.is_main_process  # a bar on a terminal (tqdm's disable=None), else log lines
    bar = tqdm(total=cfg.max_steps, desc=row_key(method, seed), leave=False, disable=True if quiet else None)
    ema = math.nan
    reached: int | None = None
    diverged: int | None = None  # the step whose loss or gradient was NaN/inf; the row ends there
    started = time.perf_counter()
    step = 0
    model.train()
    while step < cfg.max_steps and not (reached and cfg.stop_at_target) and diverged is None:
        for batch in loader:
            t0 = time.perf_counter()
            loss = mse(model(batch["ids"], batch["mask"]), batch["labels"], cfg.loss_reduction)
            value = float(accelerator.reduce(loss.detach(), reduction="mean"))
            if not math.isfinite(value):
                diverged = step + 1
                break
            engine.backward(loss)
            try:
                engine.step()
            except NonFiniteGradientError:
                diverged = step + 1
                break
            step += 1
            ema = value if step == 1 else cfg.ema * ema + (1.0 - cfg.ema) * value
            if reached is None and ema < cfg.target_loss:
                reached = step
            if metrics is not None:
                metrics.write(json.dumps({"method": method, "seed": seed, "step": step, "loss": value, "ema": ema,
                                          "lr": opt.param_groups[0]["lr"],
                                          "step_time_s": time.perf_counter() - t0}) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4f}", ema=f"{ema:.4f}")
            if bar.disable and not quiet and (step == 1 or step % cfg.log_every == 0):
                print(f"[{row_key(method, seed)}] step {step} loss {value:.4f} ema {ema:.4f}", flush=True)
            if step >= cfg.max_steps or (reached and cfg.stop_at_target):
                break
    bar.close()
    if diverged is not None and accelerator.is_main_process:
        print(f"[{row_key(method, seed)}] diverged: the loss or a gradient was NaN/inf at step {diverged}", flush=True)
    wall = time.perf_counter() - started
    return {
        "method": method, "seed": seed, **applied,
        "steps_to_target": reached, "final_step": step, "final_ema_loss": ema, "diverged_at": diverged,
        "dev_accuracy": evaluate(model, dev_loader, accelerator), "wall_time_s": wall,
        "n_params": n_params, "settings": cfg.fingerprint(method, seed),
    }


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, accelerator: Any) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        pred = model(batch["ids"], batch["mask"]).argmax(-1)
        pred, labels = accelerator.gather_for_metrics((pred, batch["labels"]))
        correct += int((pred == labels).sum())
        total += int(labels.numel())
    model.train()
    return correct / max(total, 1)


# ------------------------------------------------------------------------------ reports
def row_method(key: str, row: dict[str, Any]) -> str:
    """The method of a summary row (summaries written before seeds were keyed by method)."""
    return str(row.get("method", key))


def row_seed(row: dict[str, Any]) -> int:
    """The seed of a summary row (summaries written before seeds hold it in their settings)."""
    return int(row["seed"]) if "seed" in row else int(row["settings"]["seed"])


def ema_curves(metrics: Path, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, judged EMA) of the last run of each summary row in ``keys`` found in ``metrics``
    (a run restarts at step 1). Lines are keyed like the summary: ``METHOD/seedN``, or the
    method alone for lines written before seeds."""
    return curves(metrics, keys, "ema")


def metrics_lines(metrics: Path) -> list[str]:
    """The lines of ``metrics`` (a run's metrics.jsonl), or of ``metrics.jsonl.gz`` beside it as
    docs/results ships them."""
    packed = metrics.with_name(metrics.name + ".gz")
    if metrics.is_file():
        return metrics.read_text().splitlines()
    if packed.is_file():
        return gzip.decompress(packed.read_bytes()).decode().splitlines()
    raise FileNotFoundError(f"neither {str(metrics)!r} nor {str(packed)!r} exists")


def curves(metrics: Path, keys: list[str], field: str) -> dict[str, list[tuple[int, float]]]:
    """(step, ``field``) of the last run of each summary row in ``keys``, as :func:`ema_curves`."""
    wanted = set(keys)
    out: dict[str, list[tuple[int, float]]] = {}
    for line in metrics_lines(metrics):
        row = json.loads(line)
        key = row_key(row["method"], row["seed"]) if "seed" in row else row["method"]
        if key in wanted:
            if row["step"] == 1:
                out[key] = []
            out.setdefault(key, []).append((row["step"], row[field]))
    return out


def debiased_ema(values: list[float], decay: float) -> list[float]:
    """The plot's smoothing: an EMA started at 0 and divided by ``1 - decay**t`` (Adam's bias
    correction), so the curve follows the first steps without leaning on the first loss. The
    judged EMA (the ``ema`` in metrics.jsonl) starts at the first loss, per the paper."""
    smoothed, ema = [], 0.0
    for t, value in enumerate(values, 1):
        ema = decay * ema + (1.0 - decay) * value
        smoothed.append(ema / (1.0 - decay**t))
    return smoothed


def loss_figure(summary: dict[str, Any], metrics_path: Path, target: float, decay: float = 0.98) -> Any:
    """Training-loss curves of every row in the summary (the newest run of each): the raw loss
    faint, under its bias-corrected EMA (:func:`debiased_ema`); one colour per method, one
    line per seed, and the target in the legend. A matplotlib Figure (Agg)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colours: dict[str, Any] = {}
    for key, points in curves(metrics_path, list(summary), "loss").items():
        method = row_method(key, summary[key])
        steps, values = zip(*points)
        raw, = ax.plot(steps, values, color=colours.get(method), alpha=0.15, linewidth=0.6)
        ax.plot(steps, debiased_ema(list(values), decay), color=raw.get_color(), linewidth=1.0,
                label=None if method in colours else method, linestyle="-" if method.startswith("bregtop") else "--")
        colours.setdefault(method, raw.get_color())
    ax.axhline(target, color="black", linewidth=0.8, linestyle=":", label=f"target {target:g}")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel(f"training loss (faint) and its bias-corrected EMA({decay:g})")
    ax.set_title("SST-2, 4-layer Transformer, batch 128")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot(summary: dict[str, Any], metrics_path: Path, target: float, out: Path, decay: float = 0.98) -> None:
    """:func:`loss_figure` written to ``out`` (PNG)."""
    import matplotlib.pyplot as plt

    fig = loss_figure(summary, metrics_path, target, decay)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def full_length(row: dict[str, Any]) -> bool:
    """Whether a summary row ran the protocol's length, so that the paper's count compares."""
    return int(row.get("settings", {}).get("max_steps", 0)) >= PROTOCOL_STEPS


def format_table(summary: dict[str, Any]) -> str:
    """One line per row; the paper's count only when some row ran the protocol's length (and
    only beside those rows): a shorter run's steps are not comparable with it."""
    paper = any(full_length(row) for row in summary.values())
    head = (f"{'method':<15}{'seed':>5}{'steps<target':>13}" + (f"{'paper':>7}" if paper else "")
            + f"{'final EMA':>11}{'dev acc':>9}{'wall s':>9}")
    lines = [head, "-" * len(head)]
    for key, row in summary.items():
        method, steps = row_method(key, row), row["steps_to_target"]
        cell = f"{PAPER_TABLE4.get(method, '-') if full_length(row) else '-':>7}" if paper else ""
        lines.append(
            f"{method:<15}{row_seed(row):>5}{steps if steps is not None else '-':>13}{cell}"
            f"{row['final_ema_loss']:>11.4f}{row['dev_accuracy']:>9.3f}{row['wall_time_s']:>9.0f}"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    return job_parser(SST2Config, "python -m launch.sst2", __doc__.split("\n\n")[0], "configs/sst2/")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = from_sources(SST2Config, args.config, args)
        return run(cfg)
    except (ConfigError, DataError) as err:
        print(f"python -m launch.sst2: error: {err}", file=sys.stderr)
        return 2


def run(cfg: SST2Config) -> int:
    from accelerate import Accelerator

    out = Path(cfg.out)
    summary_path, metrics_path = out / "summary.json", out / "metrics.jsonl"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if cfg.resume and summary_path.is_file() else {}
    if any("method" not in row for row in summary.values()):  # keyed by method, one seed, seedless metrics
        raise ConfigError(f"--resume: {str(summary_path)!r} was written before seeds (rows keyed by method) "
                          "and cannot be extended; pass a new --out")

    accelerator = Accelerator(cpu=cfg.cpu)
    train_split, dev_split = load_sst2(cfg.train_file, cfg.dev_file, cfg.dataset)
    with accelerator.main_process_first():
        tokenizer = wordpiece(train_split.sentences, cfg.vocab_size, cfg.cache_dir)
    train, dev = Encoded(train_split, tokenizer, cfg.max_len), Encoded(dev_split, tokenizer, cfg.max_len)
    vocab = tokenizer.get_vocab_size()

    main_proc = accelerator.is_main_process
    if main_proc:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume:
            metrics_path.write_text("")
        print(f"SST-2: {len(train)} train / {len(dev)} dev sentences, WordPiece vocabulary {vocab}; "
              f"{accelerator.num_processes} process(es) on {accelerator.device}", flush=True)
    for seed in cfg.seed_list:  # seed-major: an interrupted run holds whole tables
        for method in cfg.methods:
            key = row_key(method, seed)
            done = summary.get(key)
            if done is not None and done.get("settings") == cfg.fingerprint(method, seed):
                continue
            metrics = metrics_path.open("a") if main_proc else None
            try:
                row = run_method(method, seed, cfg, accelerator, train, dev, vocab, metrics)
            finally:
                if metrics is not None:
                    metrics.close()
            summary[key] = row
            if main_proc:
                summary_path.write_text(json.dumps(summary, indent=2) + "\n")
                print(f"[{key}] steps to EMA < {cfg.target_loss}: {row['steps_to_target']}; "
                      f"dev accuracy {row['dev_accuracy']:.3f}; {row['wall_time_s']:.0f} s", flush=True)
    if main_proc:
        plot(summary, metrics_path, cfg.target_loss, out / "ema_loss.png", cfg.ema)
        print(format_table(summary))
        print(f"wrote {summary_path}, {metrics_path}, {out / 'ema_loss.png'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group under torchrun: gloo may abort at exit otherwise
    return 0


if __name__ == "__main__":
    sys.exit(main())
