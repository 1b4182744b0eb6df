"""A short demo run: a small character-level language model on Tiny Shakespeare, trained by
AdamW and by BregTop methods from the same initialisation, printing a loss table.

    python -m launch.demo                      # AdamW, kl, vn-v2, bregtop-vn-v2; 300 steps
    python -m launch.demo --methods adamw bregtop-f-v2 --steps 100

The model reads a window of characters (embedding -> 2-layer MLP -> head). Embeddings, biases,
norms and the head run on BregTop's AdamW side (``param_groups``), as in the paper.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bregtop_dist import METHODS, BregTop, param_groups

DATA = Path(__file__).resolve().parent.parent / "data" / "lm" / "tinyshakespeare" / "input.txt"


class CharMLP(nn.Module):
    """Next-character model over a fixed window: embed, flatten, MLP, head."""

    def __init__(self, vocab: int, window: int, dim: int = 32, hidden: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mlp = nn.Sequential(
            nn.Linear(window * dim, hidden), nn.GELU(), nn.LayerNorm(hidden), nn.Linear(hidden, hidden), nn.GELU()
        )
        self.head = nn.Linear(hidden, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.mlp(self.embed(idx).flatten(1)))


def load_text(path: Path) -> tuple[torch.Tensor, int]:
    if not path.is_file():
        sys.exit(f"error: data file {path} not found; run from a checkout that has data/ (see README)")
    text = path.read_text(encoding="utf-8")
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    return torch.tensor([lookup[c] for c in text], dtype=torch.int64), len(chars)


def batch(data: torch.Tensor, window: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, len(data) - window - 1, (size,), generator=gen)
    x = torch.stack([data[s : s + window] for s in starts.tolist()])
    y = data[starts + window]
    return x, y


def make_optimizer(name: str, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    return BregTop(param_groups(model), lr=lr, method=name)


def train(name: str, args: argparse.Namespace, train_data: torch.Tensor, val_data: torch.Tensor, vocab: int) -> dict:
    torch.manual_seed(args.seed)  # same initialisation and batches for every method
    model = CharMLP(vocab, args.window)
    opt = make_optimizer(name, model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    losses: list[float] = []
    start = time.perf_counter()
    for _ in range(args.steps):
        x, y = batch(train_data, args.window, args.batch_size, gen)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - start
    with torch.no_grad():
        x, y = batch(val_data, args.window, 4096, torch.Generator().manual_seed(1))
        val = nn.functional.cross_entropy(model(x), y).item()
    return {"method": name, "losses": losses, "val_loss": val, "seconds": seconds}


def print_table(results: list[dict], every: int) -> None:
    names = [r["method"] for r in results]
    width = max(12, *(len(n) + 2 for n in names))
    print("train loss (mean over the last", every, "steps)")
    print("step".rjust(6) + "".join(n.rjust(width) for n in names))
    steps = len(results[0]["losses"])
    for end in range(every, steps + 1, every):
        row = [sum(r["losses"][end - every : end]) / every for r in results]
        print(str(end).rjust(6) + "".join(f"{v:.4f}".rjust(width) for v in row))
    print("val".rjust(6) + "".join(f"{r['val_loss']:.4f}".rjust(width) for r in results))
    print("sec".rjust(6) + "".join(f"{r['seconds']:.1f}".rjust(width) for r in results))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=["adamw", "kl", "vn-v2", "bregtop-vn-v2"],
                        choices=["adamw", *METHODS], metavar="METHOD",
                        help=f"adamw or any of: {', '.join(METHODS)}")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps={args.steps} must be >= 1")

    data, vocab = load_text(args.data)
    split = int(0.9 * len(data))
    results = [train(name, args, data[:split], data[split:], vocab) for name in args.methods]
    print_table(results, every=max(1, args.steps // 10))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
