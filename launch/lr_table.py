"""``python -m launch.lr_table RUN [RUN ...]``: final validation loss against learning rate,
over the seeds of several ``launch.lm_compare`` runs.

Each RUN is an ``lm_compare`` output folder whose sweep trained every (method, lr) for the
full number of steps (``--sweep-steps`` equal to ``--steps``), one seed per folder. The table
gives, per method and lr, the mean final validation loss over the seeds and its range, and
per method the lr with the lowest mean; a run that diverged counts as such, not as a number.
This is how sensitive a method is to its learning rate, and whether AdamW's best lr carries
over to it (issue 28's grafting question).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Cell:
    """One (method, lr) over the seeds: final validation losses of the runs that finished,
    and how many diverged."""

    losses: tuple[float, ...]
    diverged: int

    def text(self) -> str:
        if not self.losses:
            return f"diverged ({self.diverged})"
        mean = sum(self.losses) / len(self.losses)
        out = f"{mean:.3f}"
        if len(self.losses) > 1:
            out += f" ({min(self.losses):.3f}-{max(self.losses):.3f})"
        return out + (f", {self.diverged} diverged" if self.diverged else "")

    @property
    def mean(self) -> float:
        """The mean loss; infinite when any seed diverged (such an lr is never the best)."""
        return sum(self.losses) / len(self.losses) if self.losses and not self.diverged else float("inf")


def read_runs(folders: list[Path]) -> tuple[list[dict[str, Any]], list[int]]:
    """The results.json of each folder and its seed; a ValueError names a folder whose sweep
    was shorter than its final runs (its sweep losses are not final losses)."""
    results, seeds = [], []
    for folder in folders:
        res = json.loads((folder / "results.json").read_text())
        settings = res["settings"]
        if settings["sweep_steps"] != settings["steps"]:
            raise ValueError(f"{str(folder)!r}: sweep_steps={settings['sweep_steps']} but steps={settings['steps']}; "
                             "run lm_compare with --sweep-steps equal to --steps")
        results.append(res)
        seeds.append(int(settings["seed"]))
    return results, seeds


def table(results: list[dict[str, Any]]) -> tuple[list[str], list[float], dict[tuple[str, float], Cell]]:
    """Methods (in run order), lrs (ascending) and the cell of every (method, lr) measured."""
    runs: dict[tuple[str, float], list[dict[str, Any]]] = {}
    methods: list[str] = []
    for res in results:
        for run in res["sweep"]:
            runs.setdefault((run["method"], run["lr"]), []).append(run)
            if run["method"] not in methods:
                methods.append(run["method"])
    lrs = sorted({lr for _, lr in runs})
    cells = {
        key: Cell(tuple(r["final_val_loss"] for r in rs if not r["diverged"] and r["final_val_loss"] is not None),
                  sum(1 for r in rs if r["diverged"] or r["final_val_loss"] is None))
        for key, rs in runs.items()
    }
    return methods, lrs, cells


def markdown(results: list[dict[str, Any]], seeds: list[int]) -> str:
    methods, lrs, cells = table(results)
    steps = results[0]["settings"]["steps"]
    lines = [
        f"Final validation loss after {steps} steps, mean over seeds {', '.join(map(str, seeds))} (range); "
        "**bold**: the method's best lr.",
        "",
        "| method | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |",
        "|---|" + "---|" * (len(lrs) + 1),
    ]
    for m in methods:
        row = {lr: cells.get((m, lr)) for lr in lrs}
        best = min((lr for lr in lrs if row[lr] is not None), key=lambda lr: row[lr].mean)  # type: ignore[union-attr]
        texts = []
        for lr in lrs:
            cell = row[lr]
            text = "-" if cell is None else cell.text()
            texts.append(f"**{text}**" if lr == best and cell is not None and cell.mean < float("inf") else text)
        lines.append(f"| {m} | " + " | ".join(texts) + f" | {best:g} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.lr_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="lm_compare output folders, one seed each")
    args = parser.parse_args(argv)
    try:
        results, seeds = read_runs(args.runs)
    except (OSError, ValueError, KeyError) as err:
        print(f"python -m launch.lr_table: error: {err}", file=sys.stderr)
        return 2
    print(markdown(results, seeds), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
