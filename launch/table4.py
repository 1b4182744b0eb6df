"""``python -m launch.table4 RUN_DIR``: the measured Table 4 beside the paper's, as Markdown.

Reads a ``launch.sst2`` run (``summary.json``, ``metrics.jsonl``, ``ema_loss.png``) and
writes ``docs/results/table4.md`` plus the plot. Besides steps to the run's target it reports
steps to a common threshold, the lowest EMA level (rounded up to 0.005) that every row
reached. This comparison still works when some rows never reach the target within
``max_steps``. Then it checks the paper's three claims: each BregTop row beats its VN/F
baseline, the two F baselines are the slowest, and BregTop-VN-v2 is the fastest.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path
from typing import Any

from launch.cli import OneLineParser
from launch.sst2 import PAPER_TABLE4, ema_curves

PAIRS = [("bregtop-vn-v1", "vn-v1"), ("bregtop-vn-v2", "vn-v2"), ("bregtop-f-v1", "f-v1"), ("bregtop-f-v2", "f-v2")]


def steps_below(curve: list[tuple[int, float]], level: float) -> int | None:
    return next((step for step, ema in curve if ema < level), None)


def _rank_key(steps: int | None, final: float) -> tuple[float, float]:
    return (math.inf if steps is None else steps, final)


def claims(steps: dict[str, int | None], final: dict[str, float]) -> list[tuple[str, bool | None]]:
    """The paper's orderings, judged on ``steps`` (None = not reached; ties broken by final EMA)."""
    key = {m: _rank_key(steps.get(m), final[m]) for m in final}
    out: list[tuple[str, bool | None]] = []
    for b, base in PAIRS:
        if b in key and base in key:
            out.append((f"{b} faster than {base}", key[b] < key[base]))
    if len(key) == 10:
        slowest = sorted(key, key=key.__getitem__)[-2:]
        out.append(("f-v1 and f-v2 are the two slowest rows", set(slowest) == {"f-v1", "f-v2"}))
        out.append(("bregtop-vn-v2 is the fastest row", min(key, key=key.__getitem__) == "bregtop-vn-v2"))
    return out


def report(run: Path, budget: int | None = None) -> tuple[str, dict[str, Any]]:
    """The table and the claims; with ``budget``, every row judged on its first ``budget``
    steps only (the curves are deterministic, so this is what a run capped there gives)."""
    summary = json.loads((run / "summary.json").read_text())
    methods = [m for m in PAPER_TABLE4 if m in summary]
    ema = {m: [(s, v) for s, v in c if budget is None or s <= budget]
           for m, c in ema_curves(run / "metrics.jsonl", methods).items()}
    final = {m: ema[m][-1][1] for m in methods}
    target = float(next(iter(summary.values()))["settings"]["target_loss"])
    common = math.ceil(max(min(v for _, v in ema[m]) for m in methods) / 0.005) * 0.005
    at_target = {m: steps_below(ema[m], target) for m in methods}
    at_common = {m: steps_below(ema[m], common) for m in methods}
    settings = next(iter(summary.values()))["settings"]

    lines = [
        "| method | paper: steps to EMA < 0.05 | measured: steps to EMA < "
        f"{target:g} | steps to EMA < {common:.3f} (common) | EMA at the last step compared (step) | "
        "dev accuracy (after step) | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for m in methods:
        s = summary[m]
        missed = f"diverged at step {s['diverged_at']}" if s.get("diverged_at") else "not reached"
        lines.append(
            f"| {m} | {PAPER_TABLE4[m]} | {at_target[m] if at_target[m] is not None else missed} | "
            f"{at_common[m]} | {final[m]:.4f} ({ema[m][-1][0]}) | {s['dev_accuracy']:.3f} ({s['final_step']}) | "
            f"{s['wall_time_s']:.0f} |"
        )
    verdicts = [
        (f"at EMA < {target:g}", claims(at_target, final)),
        (f"at the common threshold {common:.3f}", claims(at_common, final)),
        ("in the paper", claims(dict(PAPER_TABLE4), {m: 0.0 for m in PAPER_TABLE4})),
    ]
    text = ["\n".join(lines), ""]
    for title, checks in verdicts:
        text.append(f"Claims {title}:")
        text.extend(f"- {name}: {'holds' if ok else 'does not hold'}" for name, ok in checks)
        text.append("")
    data = {"budget": budget, "target": target, "common_threshold": common, "steps_to_target": at_target, "steps_to_common": at_common,
            "final_ema": final, "settings": settings,
            "claims": {title: dict(checks) for title, checks in verdicts}}
    return "\n".join(text), data


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m launch.table4", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a launch.sst2 output directory")
    parser.add_argument("--out", type=Path, default=Path("docs/results"), help="where table4.md/.json and the plot go")
    parser.add_argument("--steps", type=int, help="judge every row on its first STEPS steps only")
    args = parser.parse_args(argv)
    if not (args.run / "summary.json").is_file():
        print(f"python -m launch.table4: error: {str(args.run / 'summary.json')!r} does not exist; run launch.sst2 first",
              file=sys.stderr)
        return 2
    table, data = report(args.run, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table4-measured.md").write_text(table + "\n")
    (args.out / "table4.json").write_text(json.dumps(data, indent=2) + "\n")
    if (args.run / "ema_loss.png").is_file():
        shutil.copy(args.run / "ema_loss.png", args.out / "table4_ema_loss.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
