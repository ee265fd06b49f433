"""Acting on some rows of a batch only: the shared steps of every routed adapter module."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from calofm.model.experts import RowGroups


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
    groups: RowGroups, table: nn.ModuleDict, names: Sequence[str] | None = None
) -> list[tuple[str, torch.Tensor | None]]:
    """(name, rows) of every row group whose key has an enabled module in ``table``.

    ``names`` maps the group keys to the table's keys (class ids to class names).
    """
    out = []
    for key in groups.keys:
        name = key if names is None else names[key]
        if name in table and table[name].enabled:
            out.append((name, groups.rows_of(key)))
    return out
