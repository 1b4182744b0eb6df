"""Refusing a state dict on every rank alike: what ``BregTop.load_state_dict`` found wrong,
and the one collective by which the ranks agree on it.

Each rank reads its own part of a state dict (the Kronecker blocks it owns, its share of the
AdamW-side state) and notes the first problem it finds, or the exception it did not foresee.
Every rank then learns every rank's problem and raises the same error, the first problem in
an order all ranks share, so that no rank loads while another refuses, and no rank waits in
a collective that another left by raising.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from bregtop_dist.core.validate import ArgumentTypeError

UNFORESEEN = (-1, 0)
"""The position of a failure no check foresaw: it comes before every problem found."""

SAVER_HINT = (
    ". A state dict holds the Kronecker blocks of the ranks that wrote it: a file written by rank 0 alone "
    "(Accelerate's save_state, the Trainer) holds every block only if consolidate_state_dict() ran on every "
    "rank first (see the README's checkpoint section)"
)


@dataclass(frozen=True)
class LoadProblem:
    """One thing wrong with a state dict, as every rank will report it.

    ``position`` orders the problems the same way on every rank (the dict's layout and param
    groups first, then the Kronecker blocks plan by plan, then the AdamW side; a failure no
    check foresaw before all of them). ``where`` names the parameter or block ("" for the dict
    as a whole); ``detail`` says what is wrong: the value found and what is allowed."""

    position: tuple[int, int]
    where: str
    detail: str
    wrong_type: bool = False  # a setting of the wrong type: ArgumentTypeError, as the constructor raises
    missing_block: bool = False  # the message then says how a rank-0 saver keeps every block

    def message(self) -> str:
        place = f"{self.where}: " if self.where else ""
        tail = SAVER_HINT if self.missing_block else ""
        return f"cannot load the optimizer state: {place}{self.detail}; nothing was loaded{tail}"

    def error(self) -> ValueError:
        """The error to raise (an ArgumentTypeError, which is a ValueError, for a setting of
        the wrong type)."""
        return (ArgumentTypeError if self.wrong_type else ValueError)(self.message())


def unforeseen(err: BaseException, rank: int, world: int) -> LoadProblem:
    """A failure while reading that no check foresaw, naming the rank it happened on."""
    who = f"rank {rank} of {world} failed while reading it" if world > 1 else "reading it failed"
    return LoadProblem(UNFORESEEN, who, f"{type(err).__name__}: {err}")


def first_on_every_rank(
    problem: LoadProblem | None, group: dist.ProcessGroup | None, world: int
) -> LoadProblem | None:
    """The first problem any rank found (lowest position, then lowest rank), the same on every
    rank, or None when no rank found one. One all_gather_object under a process group: every
    rank must call it, whatever it found; a single process (``world == 1``) calls none."""
    if world == 1:
        return problem
    gathered: list[LoadProblem | None] = [None] * world
    dist.all_gather_object(gathered, problem, group=group)
    found = [p for p in gathered if p is not None]
    return min(found, key=lambda p: p.position) if found else None
