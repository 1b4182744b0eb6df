"""The paper's parameter grouping: Kronecker blocks for the matrix weights, AdamW for
embeddings, biases, normalisation parameters and the output head (appendix D)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from torch import nn

DEFAULT_HEAD_PATTERN = r"(^|\.)(lm_head|head|classifier|score|output_layer)(\.|$)"
"""Module names treated as the output head when ``head_names`` is not given."""

EMBEDDING_NAME_PATTERN = r"(^|\.)(\w*embed\w*|wte|wpe)(\.|$)"
"""Parameter names taken for embeddings when parameters arrive without the grouping."""

VOCABULARY_ROWS = 8192
"""A matrix with a side this long, four times its other side, is taken for an embedding or
an output head when it arrives unnamed without the grouping (vocabularies are this large;
hidden sizes and their MLP expansions are not that lopsided)."""

_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.modules.batchnorm._NormBase, nn.RMSNorm)


def param_groups(
    model: nn.Module,
    head_names: Sequence[str] | None = None,
    split_fused: bool = True,
    **adamw_group_settings: Any,
) -> list[dict[str, Any]]:
    """Param groups for :class:`~bregtop_dist.BregTop`: matrices, fused q/k/v projections split
    into their three parts (``parts=3``, a group per side: :func:`fused_projections`), and the
    AdamW side.

    The AdamW side (``bregtop=False``) holds every parameter of an ``nn.Embedding``, of a
    normalisation layer, of a head module (``head_names``, or names matching
    :data:`DEFAULT_HEAD_PATTERN`), every bias and every 1-D tensor. A parameter shared by
    several modules (tied embeddings) is listed once, on the AdamW side if any owner puts
    it there. ``adamw_group_settings`` (for example ``lr=3e-4``) go into the AdamW group.
    ``split_fused=False`` keeps fused projections whole, one Kronecker matrix each (how the
    jobs' published tables were measured). Every group carries ``param_names`` for error
    messages. To split a fused projection this does not recognise, give it a group of its own
    with ``parts`` (and ``parts_dim``).
    """
    heads = set(head_names) if head_names is not None else None
    adam_ids: set[int] = set()
    for mod_name, module in model.named_modules():
        is_head = (mod_name in heads) if heads is not None else bool(re.search(DEFAULT_HEAD_PATTERN, mod_name))
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag, *_NORMS)) or (is_head and mod_name):
            adam_ids.update(id(p) for p in module.parameters())
    if heads is not None:
        known = {name for name, _ in model.named_modules()}
        missing = sorted(heads - known)
        if missing:
            raise ValueError(f"head_names {missing} are not modules of the model; known: {sorted(known)[:20]}")

    fused = fused_projections(model) if split_fused else {}
    kron: dict[str, list[Any]] = {"params": [], "param_names": []}
    by_parts: dict[int, dict[str, list[Any]]] = {0: {"params": [], "param_names": []}, 1: {"params": [], "param_names": []}}
    adam: dict[str, list[Any]] = {"params": [], "param_names": []}
    for name, p in model.named_parameters():  # shared parameters appear once
        if not p.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        side = adam if (id(p) in adam_ids or p.ndim < 2 or leaf == "bias") else kron
        if side is kron and id(p) in fused:
            side = by_parts[fused[id(p)]]
        side["params"].append(p)
        side["param_names"].append(name)
    groups: list[dict[str, Any]] = []
    if kron["params"]:
        groups.append({**kron, "bregtop": True})
    for dim, group in by_parts.items():
        if group["params"]:
            groups.append({**group, "bregtop": True, "parts": 3, "parts_dim": dim})
    if adam["params"]:
        groups.append({**adam, "bregtop": False, **adamw_group_settings})
    return groups


FUSED_NAMES = ("qkv", "c_attn", "in_proj", "Wqkv")
"""Linear layers whose weight is q, k and v stacked (output features in three equal parts)."""


def fused_projections(model: nn.Module) -> dict[int, int]:
    """id(weight) -> the side (0 rows, 1 columns of its 2-D view) of every fused q/k/v projection
    ``param_groups`` recognises: ``nn.MultiheadAttention.in_proj_weight``, a transformers
    ``Conv1D`` named ``c_attn`` (stored transposed: columns), and ``nn.Linear`` layers named as in
    :data:`FUSED_NAMES` whose output features divide by 3. GPT-NeoX's ``query_key_value``
    interleaves q, k and v per head, and grouped-query projections have parts of unequal
    sizes: neither is three equal parts, so neither is split."""
    out: dict[int, int] = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
            out[id(module.in_proj_weight)] = 0
        elif type(module).__name__ == "Conv1D" and leaf == "c_attn" and getattr(module, "weight", None) is not None:
            if module.weight.ndim == 2 and module.weight.shape[1] % 3 == 0:
                out[id(module.weight)] = 1
        elif isinstance(module, nn.Linear) and leaf in FUSED_NAMES and module.out_features % 3 == 0:
            out[id(module.weight)] = 0
    return out


def embedding_or_head_like(name: str | None, shape: Sequence[int]) -> bool:
    """Whether a matrix given to BregTop without :func:`param_groups` looks like an embedding
    or an output head, which the paper trains with AdamW: by its name when it has one (the
    head pattern of :func:`param_groups` and :data:`EMBEDDING_NAME_PATTERN`), else by a
    vocabulary-sized shape. A heuristic for a warning, never for a decision."""
    if len(shape) != 2:
        return False
    if name is not None:
        module = name.rsplit(".", 1)[0] if "." in name else ""
        return bool(re.search(EMBEDDING_NAME_PATTERN, name) or re.search(DEFAULT_HEAD_PATTERN, module))
    return max(shape) >= VOCABULARY_ROWS and max(shape) >= 4 * min(shape)
