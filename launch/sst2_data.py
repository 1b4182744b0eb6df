"""SST-2 for the paper's experiment: sentences and labels through ``datasets`` from the
shipped TSV files (or any local files / Hub dataset given), a WordPiece tokenizer trained on
the training sentences and cached, and padded batches.

Nothing here downloads: the defaults are the files under ``data/sst2``, and a Hub name is
only used when the user passes one.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "sst2"
DEFAULT_TRAIN = DATA_DIR / "train.tsv"
DEFAULT_DEV = DATA_DIR / "dev.tsv"
# WordPiece vocabularies the shipped results were measured with (see wordpiece())
SHIPPED_VOCABULARIES = DATA_DIR.parent / "tokenizers" / "wordpiece"
SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]")
PAD_ID = 0


class DataError(ValueError):
    """A data file or dataset that cannot be used; the message says what to do."""


@dataclass(frozen=True)
class Split:
    sentences: list[str]
    labels: list[int]


def load_sst2(train: Path, dev: Path, hub_name: str | None = None) -> tuple[Split, Split]:
    """(train, dev) with columns ``sentence`` and ``label`` (0/1)."""
    from datasets import load_dataset

    if hub_name:
        ds = load_dataset(hub_name)
        dev_key = "validation" if "validation" in ds else "dev"
        return _split(ds["train"], hub_name), _split(ds[dev_key], hub_name)
    for path in (train, dev):
        if not Path(path).is_file():
            raise DataError(f"SST-2 file {str(path)!r} does not exist; pass --train-file/--dev-file or --dataset NAME")
    ds = load_dataset(
        "csv", data_files={"train": str(train), "dev": str(dev)}, delimiter="\t", quoting=csv.QUOTE_NONE
    )
    return _split(ds["train"], str(train)), _split(ds["dev"], str(dev))


def _split(table, where: str) -> Split:  # type: ignore[no-untyped-def]
    missing = {"sentence", "label"} - set(table.column_names)
    if missing:
        raise DataError(f"{where}: needs columns 'sentence' and 'label', missing {sorted(missing)}")
    return Split([str(s) for s in table["sentence"]], [int(v) for v in table["label"]])


def wordpiece(sentences: list[str], vocab_size: int, cache_dir: Path):  # type: ignore[no-untyped-def]
    """A lowercasing BERT-style WordPiece tokenizer trained on ``sentences``, named by a digest
    of the sentences and the vocabulary size. It is read from ``data/tokenizers/wordpiece``
    when shipped there, else from ``cache_dir``, else trained and saved to ``cache_dir``.

    The ``tokenizers`` WordPiece trainer is not deterministic (two trainings on the same
    sentences differ in a few dozen tokens and in most ids), so the shipped files pin the
    vocabularies that the results under ``docs/results`` were measured with."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    digest = hashlib.sha256("\n".join(sentences).encode()).hexdigest()[:12]
    name = f"wordpiece-{vocab_size}-{digest}.json"
    cached = Path(cache_dir) / name
    for path in (SHIPPED_VOCABULARIES / name, cached):
        if path.is_file():
            return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(sentences, trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS)))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    cached.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(cached))
    return tok


class Encoded(Dataset):
    """Token ids (truncated to ``max_len``) and labels of one split."""

    def __init__(self, split: Split, tokenizer, max_len: int) -> None:  # type: ignore[no-untyped-def]
        self.ids = [enc.ids[:max_len] for enc in tokenizer.encode_batch(split.sentences)]
        self.labels = split.labels

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> tuple[list[int], int]:
        return self.ids[i], self.labels[i]


def collate(batch: list[tuple[list[int], int]]) -> dict[str, Tensor]:
    """Right-padded ids, the mask of real tokens, and labels."""
    width = max(len(ids) for ids, _ in batch)
    ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    for row, (seq, _) in enumerate(batch):
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return {"ids": ids, "mask": ids != PAD_ID, "labels": torch.tensor([y for _, y in batch], dtype=torch.long)}
