"""``report.md`` of scripts/gpu_check.sh: each step's exit status, seconds and key figures.

Reads what the steps left in the result folder (env.txt, kernels.json, syncs.json,
launches.json, precision.json, lm_metrics.jsonl) and the steps' logs; a missing or unreadable input becomes
"no figures" in its row, never an error, so that a report is written whatever failed.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Step:
    """One line of the steps file: name, exit status ("skipped" when the budget ran out),
    seconds taken, and the time limit it ran under."""

    name: str
    rc: str
    seconds: str
    limit: str


def read_steps(path: Path) -> list[Step]:
    """The tab-separated steps file gpu_check.sh appends to, in order."""
    if not path.is_file():
        return []
    return [Step(*line.split("\t")[:4]) for line in path.read_text().splitlines() if line.count("\t") >= 3]


def read_json(path: Path) -> Any:
    """Parsed JSON, or None when the file is missing or broken."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def env_facts(out: Path) -> dict[str, str]:
    """``key: value`` lines of env.txt."""
    facts: dict[str, str] = {}
    path = out / "env.txt"
    for line in path.read_text().splitlines() if path.is_file() else []:
        key, sep, value = line.partition(": ")
        if sep and key.strip() and key not in facts:
            facts[key.strip()] = value.strip()
    return facts


def env_figures(out: Path, logs: Path) -> str:
    f = env_facts(out)
    if not f:
        return "no figures"
    keys = ("device 0", "torch", "torch cuda build", "triton", "triton launcher", "C compiler", "Python.h", "pytest")
    return "; ".join(f"{k}: {f[k]}" for k in keys if k in f)


def test_figures(out: Path, logs: Path) -> str:
    """pytest's summary line (``80 passed in 51.2s``) of the kernel tests."""
    path = logs / "kernel_tests.log"
    lines = path.read_text(errors="replace").splitlines() if path.is_file() else []
    summary = [ln.strip("= ") for ln in lines if re.search(r"\d+ (passed|failed|error)", ln)]
    mode = "interpreted (TRITON_INTERPRET=1)" if env_facts(out).get("TRITON_INTERPRET") == "1" else "compiled"
    return f"{summary[-1]} ({mode})" if summary else "no summary line"


def kernels_figures(out: Path, logs: Path) -> str:
    k = read_json(out / "kernels.json")
    if not k:
        return "no figures"
    parts = []
    for r in k.get("precondition", []):
        shape = "x".join(str(d) for d in r["shape"])
        if "triton_precondition_s" in r:
            parts.append(f"{shape}: kernel {r['bandwidth_vs_copy']:.2f}x copy bandwidth, precondition "
                         f"{r['speedup_vs_torch']:.2f}x torch (masked scaling alone {r['apply_speedup_vs_torch']:.2f}x)")
        else:
            parts.append(f"{shape}: torch {r['torch_precondition_s'] * 1e3:.2f} ms (Triton skipped)")
    t = k.get("training_step", {})
    if t:
        parts.append(f"bregtop-vn-v2 step {t['bregtop_step_mean_s'] * 1e3:.1f} ms mean vs AdamW "
                     f"{t['adamw_step_s'] * 1e3:.2f} ms, fwd+bwd ({t['model']['autocast']}) "
                     f"{t['forward_backward_s'] * 1e3:.1f} ms: BregTop adds "
                     f"{100 * t['bregtop_added_to_training_step']:.1f}%")
    return "; ".join(parts)


def syncs_figures(out: Path, logs: Path) -> str:
    s = read_json(out / "syncs.json")
    if not s:
        return "no figures"
    where = s["syncs_by_line"] if s["sync_debug_mode"] else s["scalar_reads_by_line"]
    top = ", ".join(f"{line} x{n}" for line, n in list(where.items())[:4]) or "none"
    head = (f"{s['syncs_total']} syncs in {s['steps']} steps ({s['syncs_per_step']:.1f}/step)" if s["sync_debug_mode"]
            else "no sync count (not CUDA)")
    return (f"{head}; {s['scalar_reads_per_step']:.1f} scalar reads/step; step {s['step_ms_median']:.1f} ms median "
            f"on {s['model']['matrices']} matrices; where: {top}")


def lm_figures(method: str) -> Callable[[Path, Path], str]:
    """Figures of one launch.lm run: its last logged row."""

    def figures(out: Path, logs: Path) -> str:
        path = out / "lm_metrics.jsonl"
        rows = []
        for line in path.read_text().splitlines() if path.is_file() else []:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("method") == method:
                rows.append(row)
        if not rows:
            return "no figures"
        last = rows[-1]
        return (f"step {last['step']}: train loss {last['train_loss']:.3f}, val loss {last['val_loss']:.3f}, "
                f"{last['ms_per_step']:.0f} ms/step (training only, over the last logged interval)")

    return figures


def launches_figures(name: str) -> Callable[[Path, Path], str]:
    """Figures of one launch.bench launches run (``name``.json): the bregtop-vn-v2 rows."""

    def figures(out: Path, logs: Path) -> str:
        d = read_json(out / f"{name}.json")
        if not d:
            return "no figures"
        rows = [r for r in d.get("rows", []) if r["method"] == "bregtop-vn-v2"] or d.get("rows", [])[:3]
        device = d.get("layout", {}).get("device", "cpu")
        return f"on {device}: " + "; ".join(
            f"{r['method']} {'accel' if r['accelerator_paths'] else 'cpu'} paths, backend {r.get('backend', '?')}: "
            f"{r['ops_per_step']:.0f} ops, {r['triton_launches_per_step']:.1f} launches, "
            f"{r['scalar_reads_per_step']:.1f} reads per step" for r in rows)

    return figures


def precision_figures(out: Path, logs: Path) -> str:
    """Figures of launch.bench precision: each precision's error against fp32."""
    d = read_json(out / "precision.json")
    if not d:
        return "no figures"
    return "; ".join(
        f"{r['precision']}{' (emulated)' if r['emulated'] else ''}: one step {r['one_step_rel_error_median']:.2e}, "
        f"{r['run_steps']}-step run {r['run_rel_distance']:.2e} (loss {r['final_loss']:.4g} vs {r['final_loss_fp32']:.4g})"
        for r in d.get("rows", []))


FIGURES: dict[str, Callable[[Path, Path], str]] = {
    "env": env_figures,
    "kernel_tests": test_figures,
    "kernels": kernels_figures,
    "syncs": syncs_figures,
    "lm_bregtop": lm_figures("bregtop-vn-v2"),
    "lm_adamw": lm_figures("adamw"),
    "launches": launches_figures("launches"),
    "precision": precision_figures,
}
"""Step name -> the function that reads its key figures."""


def safe_figures(name: str, out: Path, logs: Path) -> str:
    """A step's figures; a reader that fails says so instead of stopping the report."""
    reader = FIGURES.get(name)
    if reader is None:
        return ""
    try:
        return reader(out, logs)
    except Exception as err:  # noqa: BLE001 - a broken input must not cost the report
        return f"figures unreadable ({type(err).__name__}: {err})"


def targets_table(out: Path) -> list[str]:
    """The GPU targets from kernels.json, one row per figure and stack."""
    k = read_json(out / "kernels.json")
    if not k or "targets" not in k:
        return []
    lines = ["", "## Targets (issue 14; benchmarks, not tests)", "", "| figure | stack | value | target | verdict |",
             "|---|---|---:|---|---|"]
    for g in k["targets"]:
        value = "-" if g["value"] is None else f"{g['value']:.3f}"
        shape = "x".join(str(d) for d in g["shape"]) if g["shape"] else "training step"
        lines.append(f"| {g['figure']} | {shape} | {value} | {g['target']} | {verdict(g)} |")
    return lines


def verdict(target: dict[str, Any]) -> str:
    """A target row's verdict: met, not met, not judged (measured off a GPU), not measured."""
    if target["value"] is None:
        return "not measured"
    return {True: "met", False: "not met", None: "not judged (no GPU)"}[target["met"]]


def failure_tails(steps: list[Step], logs: Path, n: int = 15) -> list[str]:
    """The last ``n`` log lines of every step that did not exit 0."""
    lines: list[str] = []
    for s in steps:
        if s.rc == "0":
            continue
        path = logs / f"{s.name}.log"
        tail = path.read_text(errors="replace").splitlines()[-n:] if path.is_file() else ["(no log)"]
        why = "timed out" if s.rc in ("124", "137") else "skipped: the time budget ran out" if s.rc == "skipped" else ""
        lines += ["", f"### {s.name}: rc={s.rc} {why}".rstrip(), "", "```", *tail, "```"]
    return lines


def report(out: Path, steps: list[Step], logs: Path, mode: str, commit: str) -> str:
    facts = env_facts(out)
    device = facts.get("device 0", "no CUDA device")
    total = sum(int(s.seconds) for s in steps if s.seconds.isdigit())
    lines = [f"# GPU check: {device}", "",
             f"{facts.get('date_utc', '?')}, commit {commit}, mode {mode}, {total} s in all steps."]
    if mode != "gpu":
        lines.append("CPU smoke run: tiny sizes; its figures check the wiring and are not GPU measurements.")
    lines += ["", "| step | rc | seconds (limit) | key figures |", "|---|---|---|---|"]
    for s in steps:
        figures = safe_figures(s.name, out, logs).replace("|", "/")
        lines.append(f"| {s.name} | {s.rc} | {s.seconds} ({s.limit}) | {figures} |")
    lines += targets_table(out)
    lines += failure_tails(steps, logs)
    lines += ["", "Files: env.txt (machine), logs.txt (every step's output), kernels.json, syncs.json, "
              "launches.json, precision.json, lm_metrics.jsonl."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the result folder (report.md is written there)")
    parser.add_argument("--steps", type=Path, required=True, help="the tab-separated steps file")
    parser.add_argument("--logs", type=Path, required=True, help="folder of <step>.log files")
    parser.add_argument("--mode", default="gpu", help="gpu or cpu-smoke")
    parser.add_argument("--commit", default="unknown")
    args = parser.parse_args(argv)
    text = report(args.out, read_steps(args.steps), args.logs, args.mode, args.commit)
    (args.out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
