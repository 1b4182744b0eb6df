"""The Table 4 report on synthetic runs: thresholds, the mean and spread over seeds, the
paper's claims judged with the seed spread, two runs side by side, and the one-seed runs and
reports written before seeds."""

from __future__ import annotations

import gzip
import json
import statistics
from pathlib import Path

import pytest

from launch.sst2 import PAPER_TABLE4
from launch.table4 import FAILS, HOLDS, WITHIN, claims, faster, main, spread

ROOT = Path(__file__).resolve().parent.parent


def first(rate: float) -> int:
    """The first step whose EMA 0.6 - rate * step is below 0.05."""
    return next(s for s in range(1, 10_000) if 0.6 - rate * s < 0.05)


def _fake_run(path: Path, speed: dict[str, float | list[float]], init: str = "kl-methods", legacy: bool = False,
              cap: int = 400) -> None:
    """EMA curves falling at ``speed[m]`` per step from 0.6 (a list: one rate per seed 0, 1, ...),
    stopped at EMA < 0.05 or ``cap`` steps. ``legacy`` writes the one-seed format from before
    seeds: summary keyed by method, no seed in the rows or the metrics lines."""
    summary, lines = {}, []
    for m, rates in speed.items():
        for seed, rate in enumerate(rates if isinstance(rates, list) else [rates]):
            curve = [(s, 0.6 - rate * s) for s in range(1, cap + 1)]
            reached = next((s for s, e in curve if e < 0.05), None)
            curve = curve[: reached or cap]
            tag = {} if legacy else {"seed": seed}
            lines += [json.dumps({"method": m, **tag, "step": s, "loss": e, "ema": e}) for s, e in curve]
            settings = {"target_loss": "0.05", "seed": str(seed), "eig_floor": "0.0"}
            if not legacy:
                settings["init"] = init
            row = {"steps_to_target": reached, "final_step": curve[-1][0], "final_ema_loss": curve[-1][1],
                   "dev_accuracy": 0.8, "wall_time_s": 1.0, "settings": settings}
            summary[m if legacy else f"{m}/seed{seed}"] = row if legacy else {"method": m, **tag, **row}
    path.mkdir()
    (path / "summary.json").write_text(json.dumps(summary))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def _report(tmp_path: Path, *args: str) -> tuple[dict, str]:
    assert main([*args, "--out", str(tmp_path / "docs")]) == 0
    return (json.loads((tmp_path / "docs/table4.json").read_text()),
            (tmp_path / "docs/table4-measured.md").read_text())


# ------------------------------------------------------------------------------ one seed
def test_paper_ordering_holds_in_the_paper():
    assert all(verdict == HOLDS for _, verdict in claims(dict(PAPER_TABLE4), {m: 0.0 for m in PAPER_TABLE4}))


def test_report_uses_a_common_threshold_when_rows_miss_the_target(tmp_path):
    speed = {m: 1e-3 for m in PAPER_TABLE4}
    speed.update({"bregtop-vn-v2": 2e-3, "f-v1": 5e-4, "f-v2": 6e-4, "vn-v1": 1.2e-3})
    _fake_run(tmp_path / "run", speed)
    data, text = _report(tmp_path, str(tmp_path / "run"))
    assert data["steps_to_target"]["bregtop-vn-v2"] == first(2e-3) and data["steps_to_target"]["kl"] is None
    assert data["common_threshold"] == pytest.approx(0.4)  # f-v1 ends at 0.6 - 0.2 = 0.4
    common = data["claims"]["at the common threshold 0.400"]
    assert common["bregtop-vn-v2 is the fastest row"] == HOLDS
    assert common["f-v1 and f-v2 are the two slowest rows"] == HOLDS
    assert common["bregtop-vn-v1 faster than vn-v1"] == FAILS
    assert f"| bregtop-vn-v2 | 1003 | {first(2e-3)} |" in text
    assert "| kl | 1092 | not reached |" in text


def test_missing_run_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "run launch.sst2 first" in err and "\n" not in err


def test_report_reads_gzipped_metrics_as_docs_results_ships_them(tmp_path):
    speed = {m: 1e-3 * (1 + i / 10) for i, m in enumerate(PAPER_TABLE4)}
    _fake_run(tmp_path / "run", speed, cap=700)
    for where in ("plain", "packed"):
        (tmp_path / where).mkdir()
    plain, _ = _report(tmp_path / "plain", str(tmp_path / "run"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    (tmp_path / "run" / "metrics.jsonl.gz").write_bytes(gzip.compress(metrics.read_bytes()))
    metrics.unlink()
    packed, _ = _report(tmp_path / "packed", str(tmp_path / "run"))
    assert packed["per_seed"] == plain["per_seed"] and packed["common_threshold"] == plain["common_threshold"]
    assert packed["steps_to_target"]["kl"] == first(speed["kl"])


def test_budget_judges_every_row_on_its_first_steps(tmp_path):
    speed = {m: 1e-3 for m in PAPER_TABLE4}
    speed["bregtop-vn-v2"] = 2e-3
    _fake_run(tmp_path / "run", speed)
    data, _ = _report(tmp_path, str(tmp_path / "run"), "--steps", "100")
    assert data["budget"] == 100 and data["steps_to_target"]["bregtop-vn-v2"] is None
    assert data["common_threshold"] == pytest.approx(0.5)  # the slow rows end at 0.6 - 0.1
    assert data["final_ema"]["kl"] == pytest.approx(0.5)


# ---------------------------------------------------------------------- seeds and spread
def test_mean_spread_and_distance_from_the_paper_over_seeds(tmp_path):
    speed: dict[str, float | list[float]] = {m: [2e-3, 2e-3, 2e-3] for m in PAPER_TABLE4}
    speed["kl"] = [1.5e-3, 2e-3, 4e-3]
    _fake_run(tmp_path / "run", speed)
    data, text = _report(tmp_path, str(tmp_path / "run"))
    steps = [first(r) for r in (1.5e-3, 2e-3, 4e-3)]
    stats = data["stats"]["kl"]["steps_to_target"]
    assert (stats["n"], stats["reached"], stats["low"], stats["high"]) == (3, 3, min(steps), max(steps))
    assert stats["mean"] == pytest.approx(statistics.fmean(steps))
    assert stats["std"] == pytest.approx(statistics.stdev(steps))  # over seeds, n - 1
    assert data["stats"]["kl"]["vs_paper_pct"] == pytest.approx(100 * (statistics.fmean(steps) / 1092 - 1))
    assert data["seeds"] == [0, 1, 2] and [r["seed"] for r in data["per_seed"]["kl"]] == [0, 1, 2]
    assert data["steps_to_target"]["kl"] == pytest.approx(statistics.fmean(steps))
    assert "seeds 0, 1, 2" in text and "| kl | " + " | ".join(map(str, steps)) + " |" in text  # per seed
    row = next(line for line in text.splitlines() if line.startswith("| kl | 1092 |"))
    assert f"| {statistics.fmean(steps):.0f} | {min(steps)}-{max(steps)} | {statistics.stdev(steps):.0f} |" in row
    assert f"| {100 * (statistics.fmean(steps) / 1092 - 1):+.1f}% | no |" in row  # far from the paper's 1092


def test_a_row_that_misses_at_some_seeds_has_no_mean(tmp_path):
    speed: dict[str, float | list[float]] = {m: [2e-3, 2e-3] for m in PAPER_TABLE4}
    speed["shampoo"] = [2e-3, 1e-4]  # seed 1 ends at 0.56
    _fake_run(tmp_path / "run", speed)
    data, text = _report(tmp_path, str(tmp_path / "run"))
    stats = data["stats"]["shampoo"]["steps_to_target"]
    assert stats["mean"] is None and stats["reached"] == 1 and data["steps_to_target"]["shampoo"] is None
    assert f"| shampoo | 1119 | not reached at 1/2 seeds | {first(2e-3)} (1/2 seeds) |" in text


def test_claims_use_the_seed_spread_as_the_yardstick():
    final = [0.04, 0.04, 0.04]
    assert faster([100, 110, 120], [200, 210, 220], final, final) == HOLDS
    assert faster([200, 210, 220], [100, 110, 120], final, final) == FAILS
    # means 110 and 130, ranges 20 and 40: a gap of 20 is within the larger range
    assert faster([100, 110, 120], [110, 120, 160], final, final) == WITHIN
    assert faster([110, 120, 160], [100, 110, 120], final, final) == WITHIN
    # one seed each: no spread, the smaller count wins; a tie goes to the lower EMA
    assert faster([100], [101], [0.04], [0.04]) == HOLDS
    assert faster([100], [100], [0.04], [0.03]) == FAILS
    # a row that reached the threshold at more seeds is ahead; none reached: the lower EMA
    assert faster([300, 300], [100, None], final[:2], final[:2]) == HOLDS
    assert faster([None, None], [None, None], [0.10, 0.12], [0.20, 0.21]) == HOLDS
    assert faster([None, None], [None, None], [0.10, 0.30], [0.20, 0.21]) == WITHIN
    assert spread([5, None, 9]) == spread([9, None, 5])


def test_the_whole_table_claims_combine_their_comparisons():
    steps = {m: [1500, 1510, 1520] for m in PAPER_TABLE4}
    steps.update({"f-v1": [1700, 1710, 1720], "f-v2": [1700, 1720, 1740], "bregtop-vn-v2": [1000, 1010, 1020],
                  "bregtop-vn-v1": [1000, 1100, 1300], "bregtop-f-v1": [1690, 1700, 1710]})
    final = {m: [0.04] * 3 for m in PAPER_TABLE4}
    verdicts = dict(claims(steps, final))
    assert verdicts["bregtop-vn-v1 faster than vn-v1"] == HOLDS  # 1133 vs 1510: a gap above the range 300
    assert verdicts["bregtop-f-v1 faster than f-v1"] == WITHIN  # 1700 vs 1710 within the range 20
    assert verdicts["bregtop-vn-v2 is the fastest row"] == WITHIN  # 1010 vs 1133, within bregtop-vn-v1's 300
    assert verdicts["f-v1 and f-v2 are the two slowest rows"] == WITHIN  # bregtop-f-v1 overlaps them
    steps["bregtop-f-v1"] = [1800, 1800, 1800]
    assert dict(claims(steps, final))["f-v1 and f-v2 are the two slowest rows"] == FAILS


# -------------------------------------------------------------------------- two runs
def test_compare_reports_two_runs_side_by_side(tmp_path):
    base = {m: [1e-3, 1.1e-3] for m in PAPER_TABLE4}
    _fake_run(tmp_path / "kl", {**base, "bregtop-vn-v2": [3e-3, 3.1e-3]}, init="kl-methods")
    _fake_run(tmp_path / "fg", {**base, "vn-v2": [3e-3, 3.1e-3]}, init="first-gradient")
    data, text = _report(tmp_path, str(tmp_path / "kl"), "--compare", str(tmp_path / "fg"))
    assert data["label"] == "init kl-methods" and data["compare"]["label"] == "init first-gradient"
    assert data["claims"]["at EMA < 0.05"]["bregtop-vn-v2 faster than vn-v2"] == HOLDS
    assert data["compare"]["claims"]["at EMA < 0.05"]["bregtop-vn-v2 faster than vn-v2"] == FAILS
    assert "| claim (EMA < 0.05 / 0.05) | init kl-methods | init first-gradient | paper |" in text
    assert "| bregtop-vn-v2 faster than vn-v2 | holds | does not hold | holds |" in text
    fast = [first(3e-3), first(3.1e-3)]
    assert f"| bregtop-vn-v2 | 1003 | {statistics.fmean(fast):.0f} | {min(fast)}-{max(fast)} |" in text
    assert text.count("Claims in the paper:") == 1

    # same labels are told apart by their paths; --label names them
    _fake_run(tmp_path / "kl2", base, init="kl-methods")
    data, text = _report(tmp_path, str(tmp_path / "kl"), "--compare", str(tmp_path / "kl2"))
    assert data["label"] == f"init kl-methods ({tmp_path / 'kl'})" != data["compare"]["label"]
    data, _ = _report(tmp_path, str(tmp_path / "kl"), "--compare", str(tmp_path / "fg"), "--label", "A",
                      "--compare-label", "B")
    assert (data["label"], data["compare"]["label"]) == ("A", "B")


def test_compare_pairs_the_seeds_both_runs_have(tmp_path):
    fused = {"vn-v2": [1e-3, 1.1e-3, 1.2e-3], "bregtop-vn-v2": [0.9e-3, 1.0e-3, 1.3e-3], "kl": [1e-3],
             "vn-v1": [0.5e-3]}
    split = {"vn-v2": [1.05e-3, 1.1e-3], "bregtop-vn-v2": [1.2e-3, 0.95e-3], "vn-v1": [1e-3]}
    _fake_run(tmp_path / "fused", fused, cap=700)
    _fake_run(tmp_path / "split", split, cap=700)
    _, text = _report(tmp_path, str(tmp_path / "fused"), "--compare", str(tmp_path / "split"),
                      "--label", "fused", "--compare-label", "split")
    table = text[text.index("Per seed, where both have it"):text.index("Claims in the paper")]
    # vn-v1 misses the target in 700 steps fused (0.6 - 0.5e-3 * 700 = 0.25)
    assert f"| vn-v1 | 0 | not reached | {first(1e-3)} | - |" in table
    for m in ("vn-v2", "bregtop-vn-v2"):
        for seed in (0, 1):
            a, b = first(fused[m][seed]), first(split[m][seed])
            assert f"| {m} | {seed} | {a} | {b} | {b - a:+d} |" in table
        assert f"| {m} | 2 |" not in table  # only the fused run has seed 2
    assert "| kl |" not in table
    for seed in (0, 1):
        gap_a = first(fused["bregtop-vn-v2"][seed]) - first(fused["vn-v2"][seed])
        gap_b = first(split["bregtop-vn-v2"][seed]) - first(split["vn-v2"][seed])
        assert f"| bregtop-vn-v2 - vn-v2 | {seed} | {gap_a:+d} | {gap_b:+d} |" in table
    assert "bregtop-vn-v1 - vn-v1" not in table
    # EMA at step 500 (every curve is there: 0.6 - rate * 500), none at 1000 (all stopped), dev accuracy
    rate_a, rate_b = fused["vn-v2"][1], split["vn-v2"][1]
    assert f"| {0.6 - rate_a * 500:.4f} | {0.6 - rate_b * 500:.4f} | - | - | 0.800 | 0.800 |" in table


def _crossing_metrics(path: Path, cross: dict[int, int]) -> None:
    """Rewrite ``path``'s metrics: vn-v2 falls as 0.6 - 1e-3 * step; bregtop-vn-v2 is 0.01 below
    it up to step ``cross[seed]`` and 0.01 above after (never below when ``cross`` is 0)."""
    lines = []
    for seed, at in cross.items():
        for s in range(1, 601):
            base = 0.6 - 1e-3 * s
            lines.append(json.dumps({"method": "vn-v2", "seed": seed, "step": s, "ema": base}))
            lines.append(json.dumps({"method": "bregtop-vn-v2", "seed": seed, "step": s,
                                     "ema": base - 0.01 if s <= at else base + 0.01}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")


def test_compare_names_the_last_step_a_bregtop_row_is_ahead(tmp_path):
    speed = {"vn-v2": [1e-3, 1e-3], "bregtop-vn-v2": [1e-3, 1e-3]}
    _fake_run(tmp_path / "fused", speed, cap=700)
    _fake_run(tmp_path / "split", speed, cap=700)
    _crossing_metrics(tmp_path / "fused", {0: 250, 1: 0})
    _crossing_metrics(tmp_path / "split", {0: 480, 1: 600})
    _, text = _report(tmp_path, str(tmp_path / "fused"), "--compare", str(tmp_path / "split"))
    table = text[text.index("| BregTop row minus its baseline"):text.index("Claims in the paper")]
    # 0.01 above vn-v2 at the target (step 551) costs bregtop-vn-v2 10 steps; 0.01 below gains 10
    assert "| bregtop-vn-v2 - vn-v2 | 0 | +10 | +10 | 250 | 480 |" in table
    assert "| bregtop-vn-v2 - vn-v2 | 1 | +10 | -10 | never | 600 |" in table


def test_a_report_json_is_read_back(tmp_path):
    _fake_run(tmp_path / "run", {m: [1e-3, 2e-3] for m in PAPER_TABLE4})
    data, _ = _report(tmp_path, str(tmp_path / "run"))
    (tmp_path / "saved.json").write_text(json.dumps(data))
    again, _ = _report(tmp_path, str(tmp_path / "saved.json"))
    assert again["stats"] == data["stats"] and again["claims"] == data["claims"]


# ------------------------------------------------------------- before seeds: one-seed files
def test_one_seed_runs_written_before_seeds_still_report(tmp_path):
    speed = {m: 1e-3 for m in PAPER_TABLE4}
    speed["bregtop-vn-v2"] = 2e-3
    _fake_run(tmp_path / "run", speed, legacy=True)
    data, text = _report(tmp_path, str(tmp_path / "run"))
    assert data["label"] == "init first-gradient" and data["seeds"] == [0]
    assert data["steps_to_target"]["bregtop-vn-v2"] == first(2e-3)
    assert f"| bregtop-vn-v2 | 1003 | {first(2e-3)} | {first(2e-3)} | - |" in text
    assert "per seed" not in text


def test_the_shipped_one_seed_report_is_read_with_the_same_verdicts(tmp_path, capsys):
    shipped = ROOT / "docs/results/table4.json"
    old = json.loads(shipped.read_text())
    data, text = _report(tmp_path, str(shipped), "--steps", "2000")
    assert data["steps_to_target"] == old["steps_to_target"] and data["common_threshold"] == old["common_threshold"]
    for title, checks in old["claims"].items():
        assert data["claims"][title] == {name: HOLDS if ok else FAILS for name, ok in checks.items()}
    assert data["label"] == "init first-gradient, eig_floor 0.001"
    assert "| kl | 1092 | 1114 | 1114 | - | +2.0% | yes |" in text

    # beside a run; it cannot be re-judged on other steps
    _fake_run(tmp_path / "run", {m: [1e-3, 2e-3] for m in PAPER_TABLE4})
    data, _ = _report(tmp_path, str(tmp_path / "run"), "--compare", str(shipped))
    assert data["compare"]["per_seed"]["kl"][0]["steps_to_target"] == 1114
    assert main([str(tmp_path / "run"), "--compare", str(shipped), "--steps", "1000",
                 "--out", str(tmp_path / "docs")]) == 2
    err = capsys.readouterr().err.strip()
    assert "cannot be re-judged on --steps 1000" in err and "\n" not in err


@pytest.mark.parametrize("init, prefix", [("first-gradient", "fg"), ("kl-methods", "klm")])
def test_table4_split_page_is_what_the_shipped_runs_give(tmp_path, init, prefix):
    """docs/results/table4-split.md's per-seed tables are launch.table4's output on the shipped
    runs, as the page's commands regenerate them: a figure edited by hand, or a run shipped
    without updating the page, fails here."""
    from launch.merge_runs import main as merge_main

    shipped = sorted((ROOT / "docs/results/table4-split").glob(f"{prefix}-s*"))
    assert shipped, f"no shipped {prefix}-* split runs"
    assert merge_main([str(tmp_path / "split"), *map(str, shipped)]) == 0
    _, text = _report(tmp_path, str(ROOT / "docs/results/issue12" / init), "--compare", str(tmp_path / "split"),
                      "--steps", "2000", "--label", "fused", "--compare-label", "split")
    page = (ROOT / "docs/results/table4-split.md").read_text()
    section = page[page.index(f"## {init}"):]
    section = section[:section.index("\n## ")]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| method")
            and not line.startswith("| BregTop row")]
    start = text.index("Per seed, where both have it")
    expected = [line for line in text[start:text.index("Claims in the paper")].splitlines()
                if line.startswith("| ") and not line.startswith(("| method", "| BregTop row"))]
    assert expected == rows
