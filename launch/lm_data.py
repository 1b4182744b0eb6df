"""Text for the language-model job: GPT-2 BPE from the shipped files, token ids cached, and
batches chosen by step number (so a resumed run reads exactly what the uninterrupted one
would have read)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent / "data"
DEFAULT_TEXT = ROOT / "lm" / "tinyshakespeare" / "input.txt"
GPT2_DIR = ROOT / "tokenizers" / "gpt2"


class DataError(ValueError):
    """A text file or dataset that cannot be used; the message says what to do."""


def gpt2_tokenizer(directory: Path = GPT2_DIR):  # type: ignore[no-untyped-def]
    """GPT-2's byte-level BPE from ``encoder.json`` and ``vocab.bpe`` (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = Path(directory) / "encoder.json", Path(directory) / "vocab.bpe"
    for f in (vocab, merges):
        if not f.is_file():
            raise DataError(f"GPT-2 tokenizer file {str(f)!r} does not exist; pass --tokenizer-dir DIR")
    tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def load_text(path: Path | None, hub_name: str | None) -> str:
    """The training text: a local file, or the ``text`` column of a Hub dataset's train split."""
    if hub_name:
        from datasets import load_dataset

        return "\n".join(load_dataset(hub_name, split="train")["text"])
    if path is None or not Path(path).is_file():
        raise DataError(f"text file {str(path)!r} does not exist; pass --data FILE or --dataset NAME")
    return Path(path).read_text(encoding="utf-8")


def token_ids(text: str, tokenizer, cache_dir: Path) -> Tensor:  # type: ignore[no-untyped-def]
    """int64 token ids of ``text``, cached by content. The cache is read with torch's
    ``weights_only`` loader and used only if it holds a 1-D int64 tensor (else rebuilt)."""
    path = Path(cache_dir) / f"gpt2-ids-{hashlib.sha256(text.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # noqa: BLE001 - a damaged cache is rebuilt
            cached = None
        if isinstance(cached, Tensor) and type(cached) is Tensor and cached.dtype == torch.int64 and cached.ndim == 1:
            return cached
    ids = torch.tensor(tokenizer.encode(text).ids, dtype=torch.int64)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ids, path)
    return ids


def batch_at(ids: Tensor, step: int, batch: int, block: int, seed: int, rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor]:
    """The (inputs, targets) of ``step``: the same on every run, each rank its own rows of a
    global batch of ``batch * world`` windows."""
    if ids.numel() <= block + 1:
        raise DataError(f"the text has {ids.numel()} tokens, fewer than block_size + 2 = {block + 2}")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, ids.numel() - block - 1, (batch * world,), generator=gen)[rank * batch : (rank + 1) * batch]
    x = torch.stack([ids[s : s + block] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + block] for s in starts.tolist()])
    return x, y
