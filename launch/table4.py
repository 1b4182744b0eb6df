"""``python -m launch.table4 RUN``: the measured Table 4 beside the paper's, as Markdown.

Reads a ``launch.sst2`` run (``summary.json``, ``metrics.jsonl``, ``ema_loss.png``) and
writes ``table4-measured.md``, ``table4.json`` and the plot (``--out``, docs/results). For each
method it reports, over the run's seeds, the mean, the min-max and the standard deviation of
the steps to the run's target, and of the steps to a common threshold: the lowest EMA level
(rounded up to 0.005) that every row reached, a comparison that still works when some rows
never reach the target. Beside them: the paper's count and how far the mean is from it.

Then it judges the paper's claims on the means (each BregTop row beats its VN/F baseline, the
two F baselines are the slowest, BregTop-VN-v2 is the fastest), with the seed spread as the
yardstick: "A faster than B" holds when A's mean is below B's, does not hold when it is above,
and is "within the seed spread" when the two means differ by less than the larger of the two
min-max ranges. A row that misses the threshold at some seed ranks behind every row that
reached it at more seeds; rows that reached it at equally few seeds are compared on their mean
EMA at the last step compared.

``--compare RUN2`` reports a second run (e.g. the other ``init``, or q/k/v split) the same way,
side by side, and seed by seed where both have the seed. RUN and RUN2 may each also be a
``table4.json`` this tool wrote, including the one-seed reports written before seeds (they
cannot be re-judged on fewer steps).
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from launch.cli import OneLineParser
from launch.sst2 import PAPER_TABLE4, ema_curves, row_method, row_seed

PAIRS = [("bregtop-vn-v1", "vn-v1"), ("bregtop-vn-v2", "vn-v2"), ("bregtop-f-v1", "f-v1"), ("bregtop-f-v2", "f-v2")]
HOLDS, FAILS, WITHIN = "holds", "does not hold", "within the seed spread"
PAPER_TOLERANCE = 0.15  # the mean is "within" the paper's count when |mean / paper - 1| <= 15%
EMA_CHECKPOINTS = (500, 1000)  # the per-seed comparison shows each row's EMA at these steps


class ReportError(ValueError):
    """An input the report cannot use; the message says what to do."""


# --------------------------------------------------------------------------- per-seed data
@dataclass
class Measured:
    """One run: for each method, one record per seed (``steps_to_target``, ``steps_to_common``,
    ``final_ema`` and ``final_step`` on the steps compared, ``dev_accuracy``, ``wall_time_s``,
    ``diverged_at``; None where the input does not have it), and, read from a run directory (not
    from a table4.json), each row's EMA curve on the steps compared."""

    label: str
    target: float
    budget: int | None
    common: float
    settings: dict[str, str]
    per_seed: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    curves: dict[tuple[str, int], dict[int, float]] = field(default_factory=dict)  # (method, seed): {step: EMA}

    def values(self, name: str) -> dict[str, list[Any]]:
        return {m: [r[name] for r in rows] for m, rows in self.per_seed.items()}

    @property
    def seeds(self) -> list[int]:
        return sorted({r["seed"] for rows in self.per_seed.values() for r in rows})


def steps_below(curve: list[tuple[int, float]], level: float) -> int | None:
    return next((step for step, ema in curve if ema < level), None)


def _label(settings: dict[str, str]) -> str:
    """init (runs before the setting had first-gradient, the only one) and any eig_floor."""
    text = f"init {settings.get('init', 'first-gradient')}"
    floor = float(settings.get("eig_floor", 0.0))
    return text + (f", eig_floor {floor:g}" if floor else "")


def load_run(run: Path, budget: int | None) -> Measured:
    """A ``launch.sst2`` output directory, every row judged on its first ``budget`` steps
    (all when None; the curves are deterministic, so this is what a run capped there gives)."""
    summary = json.loads((run / "summary.json").read_text())
    rows = [(key, row) for key, row in summary.items() if row_method(key, row) in PAPER_TABLE4]
    if not rows:
        raise ReportError(f"{str(run / 'summary.json')!r} has no Table 4 row")
    order = list(PAPER_TABLE4)
    rows.sort(key=lambda kr: (order.index(row_method(*kr)), row_seed(kr[1])))
    curves = {k: [(s, v) for s, v in c if budget is None or s <= budget]
              for k, c in ema_curves(run / "metrics.jsonl", [k for k, _ in rows]).items()}
    settings = {k: v for k, v in rows[0][1]["settings"].items() if k != "seed"}
    target = float(settings["target_loss"])
    lows = [min(v for _, v in c if math.isfinite(v)) for c in curves.values() if any(math.isfinite(v) for _, v in c)]
    common = math.ceil(max(lows) / 0.005) * 0.005 if lows else target
    measured = Measured(_label(settings), target, budget, common, settings)
    for key, row in rows:
        curve = curves.get(key, [])
        measured.curves[(row_method(key, row), row_seed(row))] = dict(curve)
        measured.per_seed.setdefault(row_method(key, row), []).append({
            "seed": row_seed(row),
            "steps_to_target": steps_below(curve, target),
            "steps_to_common": steps_below(curve, common),
            "final_ema": curve[-1][1] if curve else row["final_ema_loss"],
            "final_step": curve[-1][0] if curve else row["final_step"],
            "dev_accuracy": row["dev_accuracy"], "dev_step": row["final_step"], "wall_time_s": row["wall_time_s"],
            "diverged_at": row.get("diverged_at"),
        })
    return measured


def load_report(path: Path, budget: int | None) -> Measured:
    """A ``table4.json`` this tool wrote: with ``per_seed`` records, or the one-seed format
    written before seeds (one number per method, the seed in its settings)."""
    data = json.loads(path.read_text())
    if budget is not None and budget != data.get("budget"):
        raise ReportError(f"{str(path)!r} was judged on {data.get('budget') or 'all'} steps and cannot be "
                          f"re-judged on --steps {budget}; pass its run directory instead")
    settings = {k: v for k, v in data["settings"].items() if k != "seed"}
    measured = Measured(data.get("label") or _label(settings), float(data["target"]), data.get("budget"),
                        float(data["common_threshold"]), settings)
    if "per_seed" in data:
        measured.per_seed = {m: list(rows) for m, rows in data["per_seed"].items()}
        return measured
    seed = int(data["settings"].get("seed", 0))
    for m in PAPER_TABLE4:
        if m in data["steps_to_target"]:
            measured.per_seed[m] = [{
                "seed": seed, "steps_to_target": data["steps_to_target"][m],
                "steps_to_common": data["steps_to_common"][m], "final_ema": data["final_ema"][m],
                "final_step": None, "dev_accuracy": None, "dev_step": None, "wall_time_s": None, "diverged_at": None,
            }]
    return measured


def load(path: Path, budget: int | None) -> Measured:
    if path.is_file() and path.suffix == ".json":
        return load_report(path, budget)
    if not (path / "summary.json").is_file():
        raise ReportError(f"{str(path / 'summary.json')!r} does not exist; run launch.sst2 first")
    return load_run(path, budget)


# ------------------------------------------------------------------------------ statistics
@dataclass(frozen=True)
class Spread:
    """Steps to a threshold over seeds: the mean and standard deviation (n - 1) when every seed
    reached it, else None; min and max over the seeds that reached it."""

    n: int
    reached: int
    mean: float | None
    low: int | None
    high: int | None
    std: float | None

    @property
    def range(self) -> float:
        return 0.0 if self.low is None or self.high is None else float(self.high - self.low)


def spread(values: list[int | None]) -> Spread:
    got = [v for v in values if v is not None]
    complete = bool(got) and len(got) == len(values)
    return Spread(
        n=len(values), reached=len(got), mean=statistics.fmean(got) if complete else None,
        low=min(got) if got else None, high=max(got) if got else None,
        std=(statistics.stdev(got) if len(got) > 1 else 0.0) if complete else None,
    )


def vs_paper(mean: float | None, paper: int) -> float | None:
    """(mean - paper) / paper in percent."""
    return None if mean is None else 100.0 * (mean - paper) / paper


# ---------------------------------------------------------------------------------- claims
def _seeds(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def faster(steps_a: list[int | None], steps_b: list[int | None], final_a: list[float], final_b: list[float]) -> str:
    """Whether row A is faster than row B over seeds (see the module's docstring)."""
    a, b = spread(steps_a), spread(steps_b)
    if a.reached / a.n != b.reached / b.n:
        return HOLDS if a.reached / a.n > b.reached / b.n else FAILS
    if a.mean is not None and b.mean is not None:
        gap, yardstick = b.mean - a.mean, max(a.range, b.range)
        if gap == 0.0 and yardstick == 0.0:  # a tie on one seed each: the lower EMA is ahead
            return HOLDS if statistics.fmean(final_a) < statistics.fmean(final_b) else FAILS
    else:  # neither reached it at every seed: compare the EMA at the last step compared
        gap = statistics.fmean(final_b) - statistics.fmean(final_a)
        yardstick = max(max(final_a) - min(final_a), max(final_b) - min(final_b))
    if abs(gap) < yardstick:
        return WITHIN
    return HOLDS if gap > 0 else FAILS


def _all(verdicts: list[str]) -> str:
    """A claim made of several comparisons: fails if one fails, else within if one is."""
    return FAILS if FAILS in verdicts else WITHIN if WITHIN in verdicts else HOLDS


def claims(steps: dict[str, Any], final: dict[str, Any]) -> list[tuple[str, str]]:
    """The paper's orderings, judged on the means of ``steps`` (per method: a list over seeds
    or one number; None = not reached) with ``final`` (the EMA at the last step compared,
    likewise) to rank rows that did not reach the threshold."""
    steps = {m: _seeds(v) for m, v in steps.items() if m in final}
    final = {m: _seeds(final[m]) for m in steps}

    def beats(a: str, b: str) -> str:
        return faster(steps[a], steps[b], final[a], final[b])

    out = [(f"{b} faster than {base}", beats(b, base)) for b, base in PAIRS if b in steps and base in steps]
    if len(steps) == len(PAPER_TABLE4):
        slow = ("f-v1", "f-v2")
        out.append(("f-v1 and f-v2 are the two slowest rows",
                    _all([beats(m, f) for f in slow for m in steps if m not in slow])))
        out.append(("bregtop-vn-v2 is the fastest row",
                    _all([beats("bregtop-vn-v2", m) for m in steps if m != "bregtop-vn-v2"])))
    return out


# ---------------------------------------------------------------------------------- report
def _num(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _range(s: Spread) -> str:
    if s.low is None:
        return "-"
    text = f"{s.low}" if s.low == s.high else f"{s.low}-{s.high}"
    return text if s.reached == s.n else f"{text} ({s.reached}/{s.n} seeds)"


def _mean(s: Spread, missed: str = "not reached") -> str:
    if s.mean is not None:
        return f"{s.mean:.0f}"
    return missed if s.reached == 0 else f"{missed} at {s.n - s.reached}/{s.n} seeds"


def _pct(mean: float | None, paper: int) -> tuple[str, str]:
    diff = vs_paper(mean, paper)
    if diff is None:
        return "-", "-"
    return f"{diff:+.1f}%", "yes" if abs(diff) <= 100 * PAPER_TOLERANCE else "no"


def _avg(values: list[Any]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.fmean(got) if got else None


def _steps(record: dict[str, Any]) -> str:
    """One seed's steps to the target, or why there are none."""
    if record["steps_to_target"] is not None:
        return str(record["steps_to_target"])
    return f"diverged at step {record['diverged_at']}" if record.get("diverged_at") else "not reached"


def _missed(rows: list[dict[str, Any]]) -> str:
    diverged = [r["diverged_at"] for r in rows if r.get("diverged_at")]
    return f"diverged at step {diverged[0]}" if len(rows) == 1 and diverged else "not reached"


def section(run: Measured) -> tuple[str, dict[str, Any]]:
    """One run's table, per-seed steps and claims; and the data of table4.json."""
    t, c = run.target, run.common
    methods = list(run.per_seed)
    at_target = {m: spread(v) for m, v in run.values("steps_to_target").items()}
    at_common = {m: spread(v) for m, v in run.values("steps_to_common").items()}
    final = run.values("final_ema")
    seeds = run.seeds
    head = (f"| method | paper: steps to EMA < 0.05 | steps to EMA < {t:g}: mean | min-max | std | mean vs paper | "
            f"within {100 * PAPER_TOLERANCE:.0f}% | steps to EMA < {c:.3f} (common): mean | min-max | std | "
            "EMA at the last step compared | dev accuracy | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for m in methods:
        rows, s, k = run.per_seed[m], at_target[m], at_common[m]
        pct, ok = _pct(s.mean, PAPER_TABLE4[m])
        std = "-" if s.std is None or s.n == 1 else f"{s.std:.0f}"
        cstd = "-" if k.std is None or k.n == 1 else f"{k.std:.0f}"
        last, dev = f"{statistics.fmean(final[m]):.4f}", _num(_avg([r.get("dev_accuracy") for r in rows]), 3)
        if len(rows) == 1 and rows[0].get("final_step") is not None:  # one seed: the steps they are at
            last += f" ({rows[0]['final_step']})"
            dev += f" ({rows[0]['dev_step']})" if rows[0].get("dev_step") is not None else ""
        lines.append(
            f"| {m} | {PAPER_TABLE4[m]} | {_mean(s, _missed(rows))} | {_range(s)} | {std} | {pct} | {ok} | "
            f"{_mean(k)} | {_range(k)} | {cstd} | {last} | {dev} | {_num(_avg([r.get('wall_time_s') for r in rows]))} |"
        )
    budget = f"; every row judged on its first {run.budget} steps" if run.budget else ""
    text = [f"{run.label}; seeds {', '.join(map(str, seeds))}{budget}.", "", "\n".join(lines), ""]
    if len(seeds) > 1:
        text += [f"Steps to EMA < {t:g} per seed:", "",
                 "| method | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---|" * len(seeds)]
        for m in methods:
            by_seed = {r["seed"]: r for r in run.per_seed[m]}
            text.append(f"| {m} | " + " | ".join(_steps(by_seed[s]) if s in by_seed else "" for s in seeds) + " |")
        text.append("")
    verdicts = [
        (f"at EMA < {t:g}", claims(run.values("steps_to_target"), final)),
        (f"at the common threshold {c:.3f}", claims(run.values("steps_to_common"), final)),
    ]
    how = "; on the means, within the seed spread: closer than the larger min-max range" if len(seeds) > 1 else ""
    for title, checks in verdicts:
        text.append(f"Claims {title} ({run.label}{how}):")
        text.extend(f"- {name}: {verdict}" for name, verdict in checks)
        text.append("")
    data = {
        "label": run.label, "budget": run.budget, "target": t, "common_threshold": c, "seeds": seeds,
        "steps_to_target": {m: at_target[m].mean for m in methods},
        "steps_to_common": {m: at_common[m].mean for m in methods},
        "final_ema": {m: statistics.fmean(final[m]) for m in methods},
        "stats": {m: {"paper": PAPER_TABLE4[m], "vs_paper_pct": vs_paper(at_target[m].mean, PAPER_TABLE4[m]),
                      "steps_to_target": vars(at_target[m]), "steps_to_common": vars(at_common[m])}
                  for m in methods},
        "per_seed": run.per_seed, "settings": run.settings,
        "claims": {title: dict(checks) for title, checks in verdicts},
    }
    return "\n".join(text), data


def side_by_side(a: Measured, b: Measured) -> str:
    """Steps to the target of two runs per method, and the claims at the target for both."""
    lines = [f"| method | paper | {a.label}: mean | min-max | vs paper | {b.label}: mean | min-max | vs paper |",
             "|---|---|---|---|---|---|---|---|"]
    sa, sb = ({m: spread(v) for m, v in r.values("steps_to_target").items()} for r in (a, b))
    for m in PAPER_TABLE4:
        cells = []
        for s in (sa.get(m), sb.get(m)):
            cells += ["-", "-", "-"] if s is None else [_mean(s), _range(s), _pct(s.mean, PAPER_TABLE4[m])[0]]
        lines.append(f"| {m} | {PAPER_TABLE4[m]} | " + " | ".join(cells) + " |")
    ca, cb = (dict(claims(r.values("steps_to_target"), r.values("final_ema"))) for r in (a, b))
    paper = dict(claims(dict(PAPER_TABLE4), {m: 0.0 for m in PAPER_TABLE4}))
    lines += ["", f"| claim (EMA < {a.target:g} / {b.target:g}) | {a.label} | {b.label} | paper |", "|---|---|---|---|"]
    for name in paper:
        lines.append(f"| {name} | {ca.get(name, '-')} | {cb.get(name, '-')} | {paper[name]} |")
    return "\n".join(lines) + "\n"


def _by_seed(run: Measured, method: str, name: str = "steps_to_target") -> dict[int, Any]:
    return {r["seed"]: r.get(name) for r in run.per_seed.get(method, [])}


def _gap(x: int | None, y: int | None) -> str:
    return "-" if x is None or y is None else f"{x - y:+d}"


def _reached(steps: int | None) -> str:
    return "not reached" if steps is None else str(steps)


def ema_at(run: Measured, method: str, seed: int, step: int) -> float | None:
    """The row's EMA at ``step``; None when its curve is not at hand or stops before."""
    return run.curves.get((method, seed), {}).get(step)


def last_below(run: Measured, top: str, base: str, seed: int) -> str:
    """The last step, of those both curves have, at which ``top``'s EMA is below ``base``'s
    ("never" if at none); "-" without both curves. From the step after it on, ``top`` trails."""
    a, b = run.curves.get((top, seed)), run.curves.get((base, seed))
    if not a or not b:
        return "-"
    below = [step for step, ema in a.items() if step in b and ema < b[step]]
    return str(below[-1]) if below else "never"


def paired(a: Measured, b: Measured) -> str:
    """The seeds both runs have, seed by seed: each method's steps to the target, its EMA at
    :data:`EMA_CHECKPOINTS` and its dev accuracy in A and in B; and each BregTop row's steps minus
    its baseline's, and the last step its EMA is below the baseline's, in A and in B. Paired on
    the seed (the same initialisation and data order), a change is read against that seed's own
    baseline rather than against the spread over seeds."""
    ema_head = " | ".join(f"EMA at {s}: A | B" for s in EMA_CHECKPOINTS)
    lines = [f"Per seed, where both have it: steps to EMA < {a.target:g}, EMA at steps "
             f"{', '.join(map(str, EMA_CHECKPOINTS))} and dev accuracy (A: {a.label}, B: {b.label})", "",
             f"| method | seed | A: {a.label} | B: {b.label} | B - A | {ema_head} | dev accuracy: A | B |",
             "|---|---|---|---|---|" + "---|---|" * len(EMA_CHECKPOINTS) + "---|---|"]
    for m in PAPER_TABLE4:
        sa, sb = _by_seed(a, m), _by_seed(b, m)
        da, db = _by_seed(a, m, "dev_accuracy"), _by_seed(b, m, "dev_accuracy")
        for seed in sorted(set(sa) & set(sb)):
            emas = " | ".join(f"{_num(ema_at(a, m, seed, s), 4)} | {_num(ema_at(b, m, seed, s), 4)}"
                              for s in EMA_CHECKPOINTS)
            lines.append(f"| {m} | {seed} | {_reached(sa[seed])} | {_reached(sb[seed])} | {_gap(sb[seed], sa[seed])} | "
                         f"{emas} | {_num(da[seed], 3)} | {_num(db[seed], 3)} |")
    lines += ["", "| BregTop row minus its baseline | seed | steps: A | B | "
              "last step its EMA is below the baseline's: A | B |", "|---|---|---|---|---|---|"]
    for top, base in PAIRS:
        ta, tb, ba, bb = _by_seed(a, top), _by_seed(b, top), _by_seed(a, base), _by_seed(b, base)
        for seed in sorted(set(ta) & set(tb) & set(ba) & set(bb)):
            lines.append(f"| {top} - {base} | {seed} | {_gap(ta[seed], ba[seed])} | {_gap(tb[seed], bb[seed])} | "
                         f"{last_below(a, top, base, seed)} | {last_below(b, top, base, seed)} |")
    return "\n".join(lines) + "\n"


def report(run: Path, budget: int | None = None, compare: Path | None = None,
           labels: tuple[str | None, str | None] = (None, None)) -> tuple[str, dict[str, Any]]:
    """The Markdown report and the data of table4.json for ``run`` (and ``compare``)."""
    runs = [load(run, budget)] + ([load(compare, budget)] if compare is not None else [])
    for r, label in zip(runs, labels):
        r.label = label or r.label
    if len(runs) == 2 and runs[0].label == runs[1].label:
        runs[0].label, runs[1].label = f"{runs[0].label} ({run})", f"{runs[1].label} ({compare})"
    text, data = section(runs[0])
    paper = claims(dict(PAPER_TABLE4), {m: 0.0 for m in PAPER_TABLE4})
    tail = ["Claims in the paper:", *(f"- {name}: {verdict}" for name, verdict in paper), ""]
    data["claims"]["in the paper"] = dict(paper)
    if len(runs) == 2:
        other, data["compare"] = section(runs[1])
        return "\n".join([text, other, side_by_side(*runs), paired(*runs), *tail]), data
    return "\n".join([text, *tail]), data


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m launch.table4", description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a launch.sst2 output directory, or a table4.json")
    parser.add_argument("--compare", type=Path, help="a second run (directory or table4.json) to report beside it")
    parser.add_argument("--label", help="the run's name in the report (default: its init and eig_floor)")
    parser.add_argument("--compare-label", help="the second run's name in the report")
    parser.add_argument("--out", type=Path, default=Path("docs/results"),
                        help="where table4-measured.md, table4.json and the plot go")
    parser.add_argument("--steps", type=int, help="judge every row on its first STEPS steps only")
    args = parser.parse_args(argv)
    try:
        table, data = report(args.run, args.steps, args.compare, (args.label, args.compare_label))
    except ReportError as err:
        print(f"python -m launch.table4: error: {err}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "table4-measured.md").write_text(table + "\n")
    (args.out / "table4.json").write_text(json.dumps(data, indent=2) + "\n")
    if args.run.is_dir() and (args.run / "ema_loss.png").is_file():
        shutil.copy(args.run / "ema_loss.png", args.out / "table4_ema_loss.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
