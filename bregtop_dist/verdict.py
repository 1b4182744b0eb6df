"""The step's verdict and its errors: a NaN/inf gradient, a gradient too large for the AdamW
side, or a Kronecker step that would leave float32 is raised on every rank alike, before
anything changes; a failed eigenbasis is warned about once.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from bregtop_dist.distributed.checks import StepVerdict, step_verdict
from bregtop_dist.distributed.layout import Piece
from bregtop_dist.kron_side import PendingKron, basis_failures, first_non_finite, step_extremes

if TYPE_CHECKING:  # step_work reads this module's limit
    from bregtop_dist.step_work import StepWork

ADAMW_GRAD_LIMIT = math.sqrt(torch.finfo(torch.float32).max)
"""Largest |g| the AdamW side takes: its second moment holds g^2 in float32."""
UNCHANGED = "no parameter or optimizer state was changed by this step"


class NonFiniteGradientError(RuntimeError):
    """A gradient holds NaN or inf; raised on every rank before any state or parameter changes."""


class NonFiniteStepError(ArithmeticError):
    """Finite gradients that would make the optimizer state or an update leave the float32
    range (a gradient far outside the range the statistics have seen); raised on every rank
    before any state or parameter changes."""


def judge(work: StepWork, basis_warning: BasisWarning) -> None:
    """Read the step's verdict (gradients finite and within their side's range, the computed
    Kronecker states and updates finite) on every rank alike: raise the same error everywhere
    before anything changes, or let the step through (warning once about a failed eigenbasis)."""
    pending = work.pending
    extremes = step_extremes(pending, work.grad_max.device)
    verdict = step_verdict(work.grad_max, *extremes, work.limits, work.pg, work.rank, work.world)
    raise_if_refused(verdict, work.pieces, pending, work.rank)
    if verdict.basis_failed:
        basis_warning.maybe_warn(pending)


def raise_if_refused(verdict: StepVerdict, pieces: Sequence[Piece], pending: list[PendingKron], rank: int) -> None:
    """The error every rank raises for a refused step, naming the first culprit."""
    if verdict.non_finite is not None:
        raise NonFiniteGradientError(f"the gradient of {pieces[verdict.non_finite].name} contains NaN or inf; {UNCHANGED}")
    if verdict.too_large is not None:
        raise NonFiniteStepError(
            f"the gradient of {pieces[verdict.too_large].name} has entries up to "
            f"{verdict.largest[verdict.too_large]:.3g}; its AdamW second moment (the squared gradient) "
            f"leaves the float32 range above {ADAMW_GRAD_LIMIT:.3g} (scale the loss down or clip "
            f"gradients); {UNCHANGED}"
        )
    if not any(verdict.step_bad):
        return
    if not verdict.step_bad[rank]:
        raise NonFiniteStepError(f"the step went non-finite on rank {verdict.step_bad.index(True)} (see its error); {UNCHANGED}")
    found = first_non_finite(pending)
    if found is None:
        raise NonFiniteStepError(f"the step went non-finite on rank {rank}; {UNCHANGED}")
    name, (m, n), largest = found
    raise NonFiniteStepError(
        f"the step would make the optimizer state or the update of {name} (a {m}x{n} Kronecker block) "
        f"non-finite in float32: its gradient (largest entry {largest:.3g}) is out of the range its "
        f"statistics can represent next to their current values (scale the loss down or clip gradients); {UNCHANGED}"
    )


class BasisWarning:
    """The RuntimeWarning for failed eigenbasis computations, given once per optimizer."""

    def __init__(self) -> None:
        self.given = False

    def maybe_warn(self, pending: list[PendingKron]) -> None:
        if self.given:
            return
        count = basis_failures(pending)
        if count == 0:
            return
        self.given = True
        warnings.warn(
            f"BregTop: eigenbasis computation failed in float32 and float64 for "
            f"{count} block(s); they keep their previous basis (warned once)",
            RuntimeWarning,
            stacklevel=6,  # maybe_warn, judge, step, no_grad, torch.optim's hooks wrapper, the caller
        )
