"""Fixed routing: which rows of a batch belong to which class, and the per-class FFN experts.

Every module that acts differently per row group receives one ``Routing`` object, built once per
forward pass (or once per generation run), as an argument: one decode step serves the rows of
every class side by side, so the routing cannot be state that two decoders would share. Experts
run only on their own rows (gather, run, scatter back), so the cost per token does not grow with
the number of classes. A module that takes the routing says so by being a ``RowRouted`` (the
experts; an adapted model's LoRA projections and particle heads); the blocks and the scoring hand
it only to those (``routing_for``), so no module takes an argument it does not use.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calofm.errors import CalofmError
from calofm.model.config import parse_class


@dataclass
class RowGroups:
    """Rows of a batch grouped by a key. ``rows is None`` means one group holding every row."""

    keys: list[Hashable]
    rows: list[torch.Tensor] | None
    inverse: torch.Tensor | None  # puts the concatenated group outputs back in row order

    @classmethod
    def build(cls, keys_per_row: Sequence[Hashable], device: torch.device) -> RowGroups:
        keys = list(dict.fromkeys(keys_per_row))
        if len(keys) == 1:
            return cls(keys, None, None)
        rows = [
            torch.tensor([i for i, k in enumerate(keys_per_row) if k == key], device=device)
            for key in keys
        ]
        inverse = torch.argsort(torch.cat(rows))
        return cls(keys, rows, inverse)

    def apply(
        self, x: torch.Tensor, fn: Callable[[Hashable, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``fn(key, rows of x)`` for every group; results back in the row order of ``x``."""
        return self.apply_many(fn, x)

    def apply_many(
        self, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor | None
    ) -> torch.Tensor:
        """``fn(key, rows of each tensor...)`` for every group (None stays None); results back in
        row order."""
        if self.rows is None:
            return fn(self.keys[0], *tensors)
        parts = [
            fn(key, *(None if t is None else t.index_select(0, rows) for t in tensors))
            for key, rows in zip(self.keys, self.rows, strict=True)
        ]
        return torch.cat(parts).index_select(0, self.inverse)

    def rows_of(self, key: Hashable) -> torch.Tensor | None:
        """Row indices of one group; None when that group is the whole batch.

        Raises KeyError when no row has this key.
        """
        if key not in self.keys:
            raise KeyError(key)
        i = self.keys.index(key)
        return None if self.rows is None else self.rows[i]


class Routing:
    """The batch's class ids, grouped by class (for experts) and by particle (for adapters)."""

    def __init__(self, class_id: torch.Tensor, classes: Sequence[str]):
        ids = class_id.tolist()
        bad = sorted({i for i in ids if not 0 <= i < len(classes)})
        if bad:
            raise CalofmError(f"model: class ids {bad} out of range; the model has {len(classes)}")
        if not ids:
            raise CalofmError("model: empty batch")
        self.class_id = class_id
        self.classes = list(classes)
        self.by_class = RowGroups.build(ids, class_id.device)
        self.by_particle = RowGroups.build(
            [parse_class(classes[i])[1] for i in ids], class_id.device
        )

    def __len__(self) -> int:
        return len(self.class_id)


class RowRouted:
    """A module that acts per row group and takes the batch's ``Routing`` as ``routing``."""


def routing_for(module: object, routing: Routing) -> dict[str, Routing]:
    """The keyword arguments that hand ``routing`` to ``module`` if it is a ``RowRouted``."""
    return {"routing": routing} if isinstance(module, RowRouted) else {}


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Experts(nn.Module, RowRouted):
    """One FeedForward per class; each row goes through its class's expert only."""

    def __init__(self, d_model: int, hidden: int, n_classes: int):
        super().__init__()
        self.d_model, self.hidden = d_model, hidden
        self.ffn = nn.ModuleList(FeedForward(d_model, hidden) for _ in range(n_classes))

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return routing.by_class.apply(x, lambda c, rows: self.ffn[c](rows))

    def add(self, init_from: int | None = None) -> FeedForward:
        """Append an expert: a copy of expert ``init_from``, or freshly initialised when None."""
        ref = self.ffn[0].fc1.weight
        expert = FeedForward(self.d_model, self.hidden).to(device=ref.device, dtype=ref.dtype)
        if init_from is not None:
            expert.load_state_dict(self.ffn[init_from].state_dict())
        self.ffn.append(expert)
        return expert
