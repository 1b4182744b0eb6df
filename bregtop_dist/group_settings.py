"""Each param group's settings, resolved once: its validated :class:`BregTopConfig` and the
:class:`BlockHyper` derived from it, rebuilt only when the group's settings change. A
scheduler that writes ``lr`` costs one check of ``lr``, not a rebuild.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import Tensor

from bregtop_dist.config import BregTopConfig, lr_value
from bregtop_dist.core.block_step import BlockHyper

_FIELDS = BregTopConfig.field_names()


@dataclasses.dataclass(frozen=True)
class Resolved:
    """A group's settings as the step reads them."""

    config: BregTopConfig
    hyper: BlockHyper


class GroupSettings:
    """The resolved settings of every param group, keyed by the group dict itself."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[dict[str, Any], Resolved]] = {}

    def of(self, group: dict[str, Any]) -> Resolved:
        """``group``'s resolved settings; a ValueError (or ArgumentTypeError) naming a bad value,
        as the constructor raises it."""
        settings = {k: group[k] for k in _FIELDS if k in group and k != "lr"}
        known = self._known.get(id(group))
        if known is not None and _same(known[0], settings):
            resolved = known[1]
            lr = lr_value(group.get("lr", resolved.config.lr))
            if isinstance(lr, float) and lr == resolved.config.lr:
                return resolved
            resolved = Resolved(resolved.config.with_lr(lr), resolved.hyper)
        else:
            config = BregTopConfig.from_group(group)
            resolved = Resolved(config, config.block_hyper())
        if not any(isinstance(v, Tensor) for v in settings.values()):
            self._known[id(group)] = (settings, resolved)
        return resolved

    def forget(self) -> None:
        """Drop every resolved record (after a load replaced the groups' settings)."""
        self._known.clear()


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(type(a[k]) is type(b[k]) and a[k] == b[k] for k in a)
