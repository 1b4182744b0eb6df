"""BregTop on 2-D device meshes (HSDP, FSDP2 x tensor parallel: 4 gloo ranks; a 3-D one) and
under tensor parallelism alone (2 ranks), against the one-process run (see mesh_scenarios)."""

from __future__ import annotations

import json

import pytest
from mesh_scenarios import FOUR_RANKS, MESH_SAVE, TWO_RANKS

from dist_harness import run_scenarios

CASES = [(4, name) for name in FOUR_RANKS] + [(2, name) for name in TWO_RANKS]


@pytest.fixture(scope="module")
def verdicts(tmp_path_factory):
    out = {}
    for world, names in ((4, list(FOUR_RANKS)), (2, list(TWO_RANKS))):
        workdir = tmp_path_factory.mktemp(f"mesh{world}")
        out[world] = (workdir, run_scenarios(world, names, workdir, "mesh_scenarios"))
    return out


@pytest.mark.parametrize("world, scenario", CASES, ids=[f"world{w}-{n}" for w, n in CASES])
def test_mesh_scenario(verdicts, world, scenario):
    workdir, results = verdicts[world]
    for figures in sorted(workdir.glob("*.json")):
        if not figures.name.startswith("rank"):
            print(figures.stem, json.loads(figures.read_text()))  # relative differences, in the report
    failures = [f"rank {r}:\n{v}" for r, v in enumerate(results[scenario]) if v != "ok"]
    assert not failures, f"{scenario} on {world} ranks\n" + "\n".join(failures)


@pytest.fixture(scope="module")
def mesh_checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("mesh-ckpt")
    return base, run_scenarios(4, list(MESH_SAVE), base / "save", "mesh_scenarios")


@pytest.mark.parametrize("saved, world", [("hsdp", 4), ("fsdp_tp", 1)],
                         ids=["hsdp-as-fsdp2-on-4", "fsdp_tp-in-one-process"])
def test_a_mesh_checkpoint_resumes_on_another_layout(mesh_checkpoints, saved, world):
    """DCP get_state_dict/set_state_dict: saved on a 2 x 2 mesh (HSDP, FSDP2 x TP), loaded as
    1-D FSDP2 on 4 ranks or in one process (each target once, each source once: the suite's
    time), training on equal to the uninterrupted run."""
    base, saves = mesh_checkpoints
    failed = [f"rank {r}: {v}" for r, v in enumerate(saves[f"save_{saved}"]) if v != "ok"]
    assert not failed, "\n".join(failed)
    workdir = base / f"resume-{saved}-{world}"
    results = run_scenarios(world, [f"resume_{saved}"], workdir, "mesh_scenarios")
    for figures in workdir.glob("resume_*.json"):
        print(figures.stem, json.loads(figures.read_text()))  # relative differences, in the report
    failures = [f"rank {r}:\n{v}" for r, v in enumerate(results[f"resume_{saved}"]) if v != "ok"]
    assert not failures, "\n".join(failures)
