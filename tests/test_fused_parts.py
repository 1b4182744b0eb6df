"""Fused q/k/v projections preconditioned as their three parts (``parts``), as the paper's
Appendix C treats Q, K and V: the fused parameter follows the separate layers' trajectory."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bregtop_dist import METHODS, BregTop, param_groups
from bregtop_dist.core.blocking import block_slices
from bregtop_dist.grouping import fused_projections

D = 12  # model width; max_precond_dim 8 also cuts each part into blocks


class Fused(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "linear":
            self.qkv = nn.Linear(D, 3 * D, bias=False)
        elif kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            self.c_attn = Conv1D(3 * D, D)  # weight (D, 3D): stored transposed
        else:
            self.attn = nn.MultiheadAttention(D, 2, bias=False)
        self.out = nn.Linear(D, D, bias=False)


class Separate(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        if kind == "conv1d":
            from transformers.pytorch_utils import Conv1D

            self.q, self.k, self.v = (Conv1D(D, D) for _ in range(3))
        else:
            self.q, self.k, self.v = (nn.Linear(D, D, bias=False) for _ in range(3))
        self.out = nn.Linear(D, D, bias=False)


def _fused_weight(model: Fused) -> nn.Parameter:
    return next(p for n, p in model.named_parameters() if not n.startswith("out"))


def _split(fused: torch.Tensor, kind: str) -> list[torch.Tensor]:
    return list(fused.chunk(3, dim=1 if kind == "conv1d" else 0))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "multihead"])
@pytest.mark.parametrize("method", METHODS)
def test_a_fused_projection_follows_the_separate_layers(gen, kind, method):
    """The same gradients fed to a fused projection and to three separate layers (and a
    neighbouring matrix) for 12 steps, four refreshes: the fused parameter's parts stay within
    1e-5 of the separate layers (and the neighbour too). Refreshes on the paper's schedule:
    staggered phases are spread over each param group's blocks, and the fused parameter has a
    group of its own, so staggering would refresh the same blocks at other steps."""
    fused, separate = Fused(kind), Separate(kind)
    with torch.no_grad():
        w = torch.randn(_fused_weight(fused).shape, generator=gen) * 0.3
        _fused_weight(fused).copy_(w)
        for p, part in zip((separate.q.weight, separate.k.weight, separate.v.weight), _split(w, kind)):
            p.copy_(part)
        separate.out.weight.copy_(fused.out.weight)
    settings = dict(lr=0.01, method=method, max_precond_dim=8, precondition_frequency=3, weight_decay=0.01,
                    stagger_refresh=False)
    opt_fused = BregTop(param_groups(fused), **settings)
    opt_separate = BregTop(param_groups(separate), **settings)
    for _ in range(12):
        g = torch.randn(w.shape, generator=gen) * float(torch.rand((), generator=gen) * 2)
        g_out = torch.randn(D, D, generator=gen)
        _fused_weight(fused).grad = g.clone()
        fused.out.weight.grad = g_out.clone()
        for p, part in zip((separate.q.weight, separate.k.weight, separate.v.weight), _split(g, kind)):
            p.grad = part.clone()
        separate.out.weight.grad = g_out.clone()
        opt_fused.step()
        opt_separate.step()
    got = _split(_fused_weight(fused).detach(), kind) + [fused.out.weight.detach()]
    want = [separate.q.weight, separate.k.weight, separate.v.weight, separate.out.weight]
    for a, b in zip(got, want):
        rel = float((a - b.detach()).abs().max() / b.detach().abs().max())
        assert rel <= 1e-5, (kind, method, rel)


def test_param_groups_recognises_the_fused_projections():
    from transformers.pytorch_utils import Conv1D

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(D, 2)
            self.qkv = nn.Linear(D, 3 * D)
            self.c_attn = Conv1D(3 * D, D)
            self.query_key_value = nn.Linear(D, 3 * D)  # GPT-NeoX interleaves per head: not three parts
            self.Wqkv = nn.Linear(D, 2 * D + 1)  # not divisible by 3: not recognised
            self.mlp = nn.Linear(D, 3 * D)

    model = Model()
    groups = param_groups(model)
    split = {(g["parts"], g["parts_dim"]): g["param_names"] for g in groups if g.get("parts", 1) > 1}
    assert split == {(3, 0): ["attn.in_proj_weight", "qkv.weight"], (3, 1): ["c_attn.weight"]}
    assert {"query_key_value.weight", "Wqkv.weight", "mlp.weight", "attn.out_proj.weight"} <= set(groups[0]["param_names"])
    assert not fused_projections(model.mlp)
    whole = param_groups(model, split_fused=False)
    assert len(whole) == 2 and all(g.get("parts", 1) == 1 for g in whole)


def test_parts_cut_before_max_precond_dim():
    assert [b.shape for b in block_slices(36, 12, 8, 3, 0)] == [(6, 6)] * 12  # 3 parts of 12 rows, each 2 x 2 blocks
    assert [b.shape for b in block_slices(12, 36, 1024, 3, 1)] == [(12, 12)] * 3
    assert block_slices(30, 8, 16) == block_slices(30, 8, 16, 1, 0)  # parts=1: the blocking as before


def test_parts_that_do_not_divide_a_matrix_are_refused_naming_it():
    with pytest.raises(ValueError, match=r"w \(shape \(10, 4\)\) cannot be cut into parts=3 equal parts along "
                                         r"parts_dim=0 \(rows: 10\)"):
        BregTop([{"params": [nn.Parameter(torch.randn(10, 4))], "param_names": ["w"], "parts": 3}])
    with pytest.raises(ValueError, match=r"parts_dim=2 is not allowed: it must be 0 \(rows\) or 1 \(columns\)"):
        BregTop([nn.Parameter(torch.randn(9, 4))], parts=3, parts_dim=2)
