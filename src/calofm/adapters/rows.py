"""Acting on some rows of a batch only, and the base modules an adapted model routes.

Every routed adapter module gathers its rows, runs, and adds its output back to those rows only, so
rows of every other group stay bit-identical to the base model's. ``Sites`` puts the routed
wrappers in place of the base modules they wrap (the attention projections, the heads, the
embedding seam) and puts the base modules back when the adapted model is unloaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

from calofm.model.experts import RowGroups

M = TypeVar("M", bound=nn.Module)


def take(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The given rows of ``x`` (all of them for None)."""
    return x if rows is None else x.index_select(0, rows)


def add_rows(y: torch.Tensor, rows: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """``y`` with ``delta`` added to the given rows; the other rows are left bit-identical.

    ``delta`` takes ``y``'s dtype (under autocast an adapter's output may be bfloat16).
    """
    delta = delta.to(y.dtype)
    return y + delta if rows is None else y.index_add(0, rows, delta)


def active(
    groups: RowGroups,
    table: nn.ModuleDict,
    off: set[str],
    names: Sequence[str] | None = None,
) -> list[tuple[str, torch.Tensor | None]]:
    """(name, rows) of every row group with a module in ``table`` that is not switched ``off``.

    ``names`` maps the group keys to the table's keys (class ids to class names).
    """
    out = []
    for key in groups.keys:
        name = key if names is None else names[key]
        if name in table and name not in off:
            out.append((name, groups.rows_of(key)))
    return out


class Sites:
    """The base modules replaced by routed wrappers, and the switched-off adapter keys.

    ``off`` holds particles and classes whose adapter modules are switched off; every wrapper
    shares this one set, so switching an adapter is one update the next forward pass sees.
    """

    def __init__(self) -> None:
        self.off: set[str] = set()
        self.replaced: list[tuple[nn.Module, str, nn.Module | None]] = []

    def routed(self, parent: nn.Module, name: str, kind: type[M], wrap: Callable[..., M]) -> M:
        """The ``kind`` wrapper at ``parent.name``; on first use ``wrap(base module)`` goes there."""
        current = getattr(parent, name)
        if isinstance(current, kind):
            return current
        wrapper = wrap(current)
        self.replaced.append((parent, name, current))
        setattr(parent, name, wrapper)
        return wrapper

    def restore(self) -> None:
        """Put every replaced base module back, the last replaced first."""
        for parent, name, module in reversed(self.replaced):
            setattr(parent, name, module)
        self.replaced.clear()
