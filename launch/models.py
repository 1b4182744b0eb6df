"""The models the jobs train: the paper's SST-2 Transformer encoder classifier."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EncoderClassifier(nn.Module):
    """A randomly initialised Transformer encoder (pre-norm, GELU) with learned positions,
    mean pooling over real tokens and a linear head: the paper's SST-2 model (section 6,
    appendix D: 4 layers, hidden 128, 8 heads; about 4.7M parameters with a 30k vocabulary,
    most of them in the embedding)."""

    def __init__(self, vocab_size: int, dim: int = 128, layers: int = 4, heads: int = 8, ff: int = 512,
                 max_len: int = 128, classes: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, ff, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Class scores (batch, classes) for token ids (batch, seq) with ``mask`` True on real tokens."""
        positions = torch.arange(ids.shape[1], device=ids.device)
        h = self.embed(ids) + self.pos(positions)
        h = self.norm(self.encoder(h, src_key_padding_mask=~mask))
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1).clamp_min(1.0))
