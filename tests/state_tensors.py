"""Test helper: an optimizer state dict's tensors by path, to compare whole states."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def state_tensors(state_dict: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """``{"<param>/<key>[/<block index>/<field>]": tensor}`` for every tensor in ``state_dict["state"]``."""
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif isinstance(value, torch.Tensor):
            out[prefix.lstrip("/")] = value

    walk("", state_dict["state"])
    return out


def kron_blocks(state_dict: Mapping[str, Any]) -> dict[tuple[Any, str], dict[str, torch.Tensor]]:
    """``{(param key, block index): block fields}`` of every Kronecker block in the state dict."""
    return {
        (pid, index): dict(block)
        for pid, entry in state_dict["state"].items() for index, block in entry.get("kron", {}).items()
    }
