"""``python -m launch.merge_runs OUT RUN [RUN ...]``: several ``launch.sst2`` runs as one.

Table 4's rows are independent, so they can run in several processes (or on several
machines) at once, each with its own ``--out``. This writes one run from them: OUT's
``summary.json`` holds every finished row, and its ``metrics.jsonl`` the lines of each row's
last run, so ``launch.table4 OUT`` reports them together and ``launch.sst2 --out OUT
--resume`` continues where they stopped. A RUN's metrics may be gzipped (``metrics.jsonl.gz``,
as docs/results ships them).

Nothing is written unless every row agrees: rows that ran with other settings than the first
row's (the seed, and the exponent that only the shampoo row uses, aside) and rows that two RUNs
finished with different results are refused, naming the row and the RUNs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from launch.cli import OneLineParser
from launch.sst2 import metrics_lines, row_key

PER_ROW_SETTINGS = ("seed", "exponent")  # settings that differ between the rows of one run


class MergeError(ValueError):
    """Runs that cannot be merged; the message names the row and the runs."""


def _metrics_lines(run: Path) -> list[str]:
    try:
        return metrics_lines(run / "metrics.jsonl")
    except FileNotFoundError:
        raise MergeError(f"{str(run)!r} has neither metrics.jsonl nor metrics.jsonl.gz") from None


def last_runs(lines: list[str]) -> dict[str, list[str]]:
    """Each row's lines from its last start (a row restarts at step 1), keyed like the summary."""
    out: dict[str, list[str]] = {}
    for line in lines:
        record = json.loads(line)
        key = row_key(record["method"], record["seed"])
        if record["step"] == 1:
            out[key] = []
        out.setdefault(key, []).append(line)
    return out


def _shared(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if k not in PER_ROW_SETTINGS}


def merge(runs: list[Path]) -> tuple[dict[str, Any], list[str]]:
    """The merged summary and metrics lines (finished rows only, in the order the RUNs list them)."""
    if not runs:
        raise MergeError("no run to merge: pass one or more launch.sst2 output directories")
    summary: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    lines: list[str] = []
    reference: tuple[Path, str, dict[str, Any]] | None = None
    for run in runs:
        path = run / "summary.json"
        if not path.is_file():
            raise MergeError(f"{str(run)!r} has no summary.json: pass launch.sst2 output directories")
        rows = json.loads(path.read_text())
        if any("method" not in row or "settings" not in row for row in rows.values()):
            raise MergeError(f"{str(path)!r} was written before seeds (rows keyed by method); it cannot be merged")
        metrics = last_runs(_metrics_lines(run))
        for key, row in rows.items():
            shared = _shared(row["settings"])
            if reference is None:
                reference = (run, key, shared)
            elif shared != reference[2]:
                differing = sorted(k for k in shared.keys() | reference[2].keys()
                                   if shared.get(k) != reference[2].get(k))
                raise MergeError(f"row {key!r} of {str(run)!r} ran with other settings than row "
                                 f"{reference[1]!r} of {str(reference[0])!r}: {', '.join(differing)}")
            if key in summary:
                if summary[key] != row:
                    raise MergeError(f"row {key!r} was finished by both {str(origin[key])!r} and {str(run)!r} "
                                     "with different results; merge one of them")
                continue
            if key not in metrics:
                raise MergeError(f"row {key!r} of {str(run)!r} has no lines in its metrics")
            summary[key], origin[key] = row, run
            lines.extend(metrics[key])
    return summary, lines


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m launch.merge_runs", description=__doc__.split("\n\n")[1])
    parser.add_argument("out", type=Path, help="the merged run's directory (created; must not hold a summary.json)")
    parser.add_argument("runs", type=Path, nargs="+", help="launch.sst2 output directories to merge")
    args = parser.parse_args(argv)
    if (args.out / "summary.json").exists():
        parser.error(f"{str(args.out)!r} already holds a summary.json: pass a new directory "
                     "(list the old one among the runs to include its rows)")
    try:
        summary, lines = merge(args.runs)
    except MergeError as exc:
        parser.error(str(exc))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"{len(summary)} rows from {len(args.runs)} runs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
