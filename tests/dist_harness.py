"""Run named scenarios of ``dist_scenarios`` in W gloo processes and collect per-rank verdicts.

One spawn runs many scenarios (starting processes dominates the cost on a 2-core machine).
A scenario that fails on a rank reports its traceback; the collectives of later scenarios
still line up because every scenario runs its collectives before it asserts anything.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from pathlib import Path

import torch.multiprocessing as mp

TIMEOUT_S = 600


def _entry(rank: int, world: int, workdir: str, names: list[str], module: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # what torchrun would set; DeepSpeed reads them
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import faulthandler
    import importlib

    import torch
    import torch.distributed as dist

    if os.environ.get("BREGTOP_HANG_DUMP_S"):  # debugging a hang: every rank's stack after that many seconds
        faulthandler.dump_traceback_later(float(os.environ["BREGTOP_HANG_DUMP_S"]), exit=True)

    scenarios = importlib.import_module(module)

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=world)
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    results: dict[str, str] = {}
    for name in names:
        try:
            scenarios.SCENARIOS[name](rank, world, singles[rank], Path(workdir))
            results[name] = "ok"
        except Exception:  # reported to the test, which fails with this text
            results[name] = traceback.format_exc()
    Path(workdir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()


def run_scenarios(
    world: int, names: list[str], workdir: Path, module: str = "dist_scenarios", timeout_s: float = TIMEOUT_S
) -> dict[str, list[str]]:
    """Per scenario of ``module``'s SCENARIOS, the verdict of every rank ("ok" or a traceback);
    a TimeoutError (the processes killed) when they have not all finished within ``timeout_s``."""
    workdir.mkdir(parents=True, exist_ok=True)
    ctx = mp.start_processes(_entry, args=(world, str(workdir), names, module), nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise TimeoutError(f"{names} did not finish on {world} ranks within {timeout_s} s")
    per_rank = [json.loads(Path(workdir, f"rank{r}.json").read_text()) for r in range(world)]
    return {name: [res[name] for res in per_rank] for name in names}
