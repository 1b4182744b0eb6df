"""A 2-rank run (DDP, FSDP2) saved through the paths users take and continued on 1, 2 and 4
ranks equals the uninterrupted single-process run (see ckpt_scenarios)."""

from __future__ import annotations

import pytest
from ckpt_scenarios import CKPT_RESUME, CKPT_SAVE

from dist_harness import run_scenarios

SAVED_AT = 2
RESUMED_AT = (1, 2, 4)


def _failures(world: int, results: dict[str, list[str]], name: str) -> list[str]:
    return [f"{name} on {world} ranks, rank {r}:\n{v}" for r, v in enumerate(results[name]) if v != "ok"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    base = tmp_path_factory.mktemp("checkpoints")
    return base, run_scenarios(SAVED_AT, list(CKPT_SAVE), base / f"save-world{SAVED_AT}", "ckpt_scenarios")


@pytest.fixture(scope="module", params=RESUMED_AT, ids=lambda w: f"world{w}")
def resumed(request, saved):
    base, save_results = saved
    failed = [f for name in CKPT_SAVE for f in _failures(SAVED_AT, save_results, name)]
    assert not failed, "\n".join(failed)
    world = request.param
    return world, run_scenarios(world, list(CKPT_RESUME), base / f"resume-world{world}", "ckpt_scenarios")


@pytest.mark.parametrize("scenario", list(CKPT_RESUME))
def test_resume(resumed, scenario):
    world, results = resumed
    failures = _failures(world, results, scenario)
    assert not failures, "\n".join(failures)
