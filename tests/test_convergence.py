"""BregTop against a tuned AdamW on a stochastic, ill-conditioned Kronecker-structured regression.

Loss 0.5 |B^1/2 (W X - Y)|^2 / batch with inputs X ~ N(0, A): the Hessian is A (x) B, both
factors with condition number 1e3, the regime Kronecker preconditioners are built for.
Fixed seeds: this is a behavioural check, not a numerical identity.
"""

from __future__ import annotations

import torch

from bregtop_dist import BregTop
from launch.kron_regression import LRS, final_loss


def _final_loss(make_opt, seed, loss_scale=1.0):
    return final_loss(lambda params, _lr: make_opt(params), 0.0, seed, loss_scale)


def test_bregtop_beats_tuned_adamw_on_kronecker_regression():
    """Each at its best lr; the margin (measured 0.35-0.73 of AdamW's loss on these seeds) is
    asserted at 0.8. Then the loss's units: the same lr on the loss times 1e-2 or 1e2 (a sum
    instead of a mean, say) reaches about the same loss, as with AdamW. An earlier first state
    taken at unit scale, each at its best lr, was 4-10x worse at loss x1e2 (1.0-4.8x at x1e-2)."""
    for seed in (0, 1):
        adamw = min(_final_loss(lambda p, lr=lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.0), seed) for lr in LRS)
        for method in ("bregtop-vn-v2", "kl"):
            losses = {lr: _final_loss(lambda p, lr=lr, m=method: BregTop(p, lr=lr, method=m), seed) for lr in LRS}
            best_lr = min(losses, key=losses.get)
            assert losses[best_lr] < 0.8 * adamw, (seed, method, losses[best_lr], adamw)
            for loss_scale in (1e-2, 1e2):
                scaled = _final_loss(lambda p, lr=best_lr, m=method: BregTop(p, lr=lr, method=m), seed, loss_scale=loss_scale)
                assert scaled < 1.25 * losses[best_lr], (seed, method, loss_scale, scaled, losses[best_lr])
