"""scripts/gpu_check.sh, checked without a GPU: its syntax, shellcheck, a CPU smoke run of
every step at tiny sizes (the wiring a GPU session would otherwise find broken), a budget that
runs out, and a report written from missing or broken inputs."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
STEPS = ["env", "kernel_tests", "kernels", "syncs", "lm_bregtop", "lm_adamw", "launches", "precision"]
FILES = {"report.md", "env.txt", "logs.txt", "kernels.json", "syncs.json", "launches.json", "precision.json",
         "lm_metrics.jsonl"}


def _run(out: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The script from outside the checkout, with this interpreter as its Python."""
    full_env = {**os.environ, "OUT": str(out), "PY": sys.executable, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=out.parent, env=full_env, capture_output=True,
                          text=True, timeout=400)


def _report_module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """scripts/gpu_report.py imported from its path (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location("gpu_report", ROOT / "scripts" / "gpu_report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_report", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_script_parses_and_is_shellcheck_clean():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    done = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout


def test_cpu_smoke_runs_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    done = _run(out, "--cpu-smoke")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    report = (out / "report.md").read_text()
    for step in STEPS:
        assert re.search(rf"^\| {step} \| 0 \| \d+ \(\d+\) \| .+ \|$", report, re.M), (step, report)
    assert "no figures" not in report and "unreadable" not in report
    assert "CPU smoke run" in report and "## Targets" in report
    assert {p.name for p in out.iterdir()} == FILES and all(p.is_file() for p in out.iterdir())

    kernels = json.loads((out / "kernels.json").read_text())
    assert kernels["settings"]["stacks"] == [[4, 48, 48], [3, 48, 64], [3, 64, 48]]
    assert kernels["precondition"][0]["max_rel_diff"] <= 1e-6  # the Triton rows ran, interpreted
    syncs = json.loads((out / "syncs.json").read_text())
    assert syncs["model"]["matrices"] == 48 and syncs["accelerator_paths"] is True and syncs["steps"] == 10
    methods = {json.loads(line)["method"] for line in (out / "lm_metrics.jsonl").read_text().splitlines()}
    assert methods == {"bregtop-vn-v2", "adamw"}
    logs = (out / "logs.txt").read_text()
    assert all(f"===== {step}: rc=0" in logs for step in STEPS)


def test_a_spent_budget_skips_steps_but_still_reports(tmp_path):
    out = tmp_path / "out"
    done = _run(out, "--cpu-smoke", BUDGET_S="12")
    assert done.returncode == 1
    report = (out / "report.md").read_text()
    for step in STEPS:
        assert re.search(rf"^\| {step} \| skipped \|", report, re.M), report
    assert "the time budget ran out" in report


def test_unknown_argument_is_refused(tmp_path):
    done = _run(tmp_path / "out", "--frobnicate")
    assert done.returncode == 2 and "--frobnicate" in done.stderr


def test_report_from_missing_and_broken_inputs(tmp_path, monkeypatch):
    """A failed step's log tail is shown; a missing JSON is "no figures"; a broken one is
    named, and the report is written anyway."""
    report_module = _report_module(monkeypatch)
    out, logs = tmp_path / "out", tmp_path / "logs"
    out.mkdir()
    logs.mkdir()
    (out / "kernels.json").write_text('{"precondition": [{"shape": [1, 2, 3]}]}')  # keys missing
    (logs / "syncs.log").write_text("Traceback (most recent call last):\nRuntimeError: boom\n")
    steps = tmp_path / "steps.tsv"
    steps.write_text("kernels\t0\t5\t180\nsyncs\t1\t3\t120\nlm_adamw\t124\t100\t100\n")
    assert report_module.main(["--out", str(out), "--steps", str(steps), "--logs", str(logs), "--mode", "gpu"]) == 0
    report = (out / "report.md").read_text()
    assert "| kernels | 0 | 5 (180) | figures unreadable (KeyError" in report
    assert "| syncs | 1 | 3 (120) | no figures |" in report
    assert "### syncs: rc=1" in report and "RuntimeError: boom" in report
    assert "### lm_adamw: rc=124 timed out" in report
