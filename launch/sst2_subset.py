"""The SST-2-1k setup of the paper's appendix C, shared by the alignment and spectra jobs:
the first N training sentences, a WordPiece vocabulary trained on them, the two-layer
ProbeClassifier, SGD on the MSE loss up to chosen checkpoint steps, mini-batch gradients of
chosen parameter blocks, and the loss on the whole subset as a function of one block."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

from launch.jobconfig import check_positive
from launch.models import ProbeClassifier
from launch.sst2_data import DEFAULT_TRAIN, DataError, Encoded, Split, collate, load_sst2, wordpiece

BLOCKS = ("q", "k", "v")


@dataclass(frozen=True)
class ProbeSettings:
    """The model, data and SGD settings of the appendix-C setup (both jobs take these)."""

    samples: int = 1000  # the first N sentences of the training file
    vocab_size: int = 4000
    max_len: int = 64
    dim: int = 64
    layers: int = 2
    heads: int = 8
    ff: int = 256
    batch_size: int = 32  # SGD and the mini-batch gradients
    lr: float = 0.3
    seed: int = 0
    train_file: Path = DEFAULT_TRAIN
    cache_dir: Path = Path("runs/cache")

    def __post_init__(self) -> None:
        check_positive(self, ("samples", "vocab_size", "max_len", "dim", "layers", "heads", "ff", "batch_size"))
        if self.dim % self.heads:
            raise ValueError(f"dim={self.dim} must be a multiple of heads={self.heads}")
        if self.batch_size > self.samples:
            raise ValueError(f"batch_size={self.batch_size} must be at most samples={self.samples}")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r} must be > 0")


class Subset:
    """Token ids and labels of the first N sentences, batched on demand."""

    def __init__(self, encoded: Encoded) -> None:
        self.ids = encoded.ids
        self.labels = encoded.labels

    def __len__(self) -> int:
        return len(self.ids)

    def batch(self, index: list[int]) -> dict[str, Tensor]:
        return collate([(self.ids[i], self.labels[i]) for i in index])

    def length_buckets(self, size: int = 100) -> list[dict[str, Tensor]]:
        """All samples in batches of similar length (little padding), for whole-subset losses."""
        order = sorted(range(len(self)), key=lambda i: len(self.ids[i]))
        return [self.batch(order[s : s + size]) for s in range(0, len(order), size)]


def load_subset(cfg: ProbeSettings) -> tuple[Subset, int]:
    """The first ``cfg.samples`` training sentences and the vocabulary size."""
    train, _ = load_sst2(cfg.train_file, cfg.train_file)
    if len(train.sentences) < cfg.samples:
        raise DataError(f"{cfg.train_file} has {len(train.sentences)} sentences; samples={cfg.samples} needs more")
    split = Split(train.sentences[: cfg.samples], train.labels[: cfg.samples])
    tokenizer = wordpiece(split.sentences, cfg.vocab_size, cfg.cache_dir)
    return Subset(Encoded(split, tokenizer, cfg.max_len)), tokenizer.get_vocab_size()


def build_model(cfg: ProbeSettings, vocab: int) -> ProbeClassifier:
    torch.manual_seed(cfg.seed)
    return ProbeClassifier(vocab, cfg.dim, cfg.layers, cfg.heads, cfg.ff, cfg.max_len)


def mse(scores: Tensor, labels: Tensor) -> Tensor:
    """Mean squared error against one-hot targets, over batch and classes."""
    return nn.functional.mse_loss(scores, nn.functional.one_hot(labels, scores.shape[-1]).to(scores.dtype))


def block_name(layer: int, block: str) -> str:
    return f"layers.{layer}.{block}.weight"


def sgd_checkpoints(model: nn.Module, data: Subset, cfg: ProbeSettings, steps: tuple[int, ...],
                    losses: list[float]) -> Iterator[int]:
    """Train with plain SGD on shuffled mini-batches (reshuffled each epoch) and yield at each
    checkpoint step with the model holding that step's weights; ``losses`` gets every step's
    mini-batch loss."""
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    per_epoch = len(data) // cfg.batch_size
    order: list[int] = []
    step = 0
    for target in sorted(steps):
        while step < target:
            if step % per_epoch == 0:
                order = torch.randperm(len(data), generator=gen).tolist()
            s = (step % per_epoch) * cfg.batch_size
            batch = data.batch(order[s : s + cfg.batch_size])
            loss = mse(model(batch["ids"], batch["mask"]), batch["labels"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            step += 1
        yield step


def minibatch_gradients(model: nn.Module, data: Subset, names: list[str], count: int, batch_size: int,
                        seed: int) -> dict[str, Tensor]:
    """``count`` batch-averaged gradients (count, numel) of each named parameter, each batch
    drawn uniformly without replacement from the subset; the model is not changed."""
    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    out = {name: torch.empty(count, params[name].numel(), dtype=torch.float64) for name in names}
    for b in range(count):
        batch = data.batch(torch.randperm(len(data), generator=gen)[:batch_size].tolist())
        loss = mse(model(batch["ids"], batch["mask"]), batch["labels"])
        grads = torch.autograd.grad(loss, [params[n] for n in names])
        for name, g in zip(names, grads, strict=True):
            out[name][b] = g.reshape(-1).to(torch.float64)
    return out


def subset_loss(model: nn.Module, buckets: list[dict[str, Tensor]], name: str) -> Callable[[Tensor], Tensor]:
    """W -> the MSE over the whole subset with parameter ``name`` replaced by W."""
    total = sum(int(b["labels"].numel()) for b in buckets)

    def loss(W: Tensor) -> Tensor:
        out = W.new_zeros(())
        for b in buckets:
            scores = functional_call(model, {name: W}, (b["ids"], b["mask"]))
            out = out + mse(scores, b["labels"]) * b["labels"].numel()
        return out / total

    return loss
