"""Every engine against the single-process run, on 2 and 4 gloo ranks (see dist_scenarios)."""

from __future__ import annotations

import pytest
from conftest import BASE_SEED

from dist_harness import run_scenarios
from dist_scenarios import SCENARIOS

WORLDS = (2, 4)


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def verdicts(request, tmp_path_factory):
    world = request.param
    workdir = tmp_path_factory.mktemp(f"world{world}")
    (workdir / "seed").write_text(str(BASE_SEED % 2**31))  # the model and method of random_models_equal_single
    return world, run_scenarios(world, list(SCENARIOS), workdir)


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario(verdicts, scenario):
    world, results = verdicts
    failures = [f"rank {r}:\n{v}" for r, v in enumerate(results[scenario]) if v != "ok"]
    assert not failures, f"{scenario} on {world} ranks\n" + "\n".join(failures)
