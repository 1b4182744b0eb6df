"""Accelerate: ``save_state`` under DDP writes the optimizer's ``state_dict()`` from the main
process alone, and BregTop's Kronecker blocks are spread over the ranks. Registering
:func:`consolidate_on_save` gathers them to the main process first:

    model, optimizer = accelerator.prepare(model, optimizer)
    consolidate_on_save(accelerator, optimizer)
    ...
    accelerator.save_state(out)       # every rank calls it, as Accelerate requires
    accelerator.load_state(out)       # at any number of processes

Without it the file holds only the main process's blocks: ``state_dict()`` warns on every
process (:class:`bregtop_dist.IncompleteStateDictWarning`), and ``load_state`` refuses the file
on every rank, naming a missing block. With it no process warns (``save_state`` takes every
process's ``state_dict()`` and writes the main process's).
"""

from __future__ import annotations

from typing import Any

from bregtop_dist.optimizer import BregTop


def find_bregtop(optimizer: Any) -> BregTop:
    """BregTop inside ``optimizer`` (Accelerate's and DeepSpeed's wrappers keep it at ``.optimizer``)."""
    chain = [optimizer]
    while not isinstance(chain[-1], BregTop) and hasattr(chain[-1], "optimizer") and len(chain) < 8:
        chain.append(chain[-1].optimizer)
    if not isinstance(chain[-1], BregTop):
        raise TypeError(f"no BregTop optimizer inside {type(optimizer).__name__} (followed .optimizer {len(chain) - 1} times)")
    return chain[-1]


def consolidate_on_save(accelerator: Any, optimizer: Any) -> Any:
    """Register a ``save_state`` pre-hook (run on every process) that gathers BregTop's state
    to the main process, which writes it. Returns the hook's handle (``.remove()`` undoes it)."""
    bregtop = find_bregtop(optimizer)

    def gather(models: Any, weights: Any, output_dir: Any) -> None:
        bregtop.consolidate_state_dict(to=0)

    return accelerator.register_save_state_pre_hook(gather)
