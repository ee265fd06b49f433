"""What a shower is conditioned on, as one object passed through the model.

Today that is the incident energy (scaled to [-1, 1] over the tokenizer's range). Incident angle
and position will join it: a new condition then changes this class (its fields and ``features``),
the data that fills it and nothing in between.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Conditions:
    """Per-shower conditions; every tensor has one row per shower."""

    incident: torch.Tensor  # (B,) scaled incident energy

    N_FEATURES = 2

    @classmethod
    def of(cls, value: Conditions | torch.Tensor) -> Conditions:
        """``value`` itself, or the conditions made of a bare (B,) scaled incident-energy tensor."""
        return value if isinstance(value, Conditions) else cls(incident=value)

    def __len__(self) -> int:
        return len(self.incident)

    def features(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, N_FEATURES): the scaled energy and its square (the response is not linear in it)."""
        e = self.incident.to(dtype)
        return torch.stack([e, e * e], dim=-1)

    def select(self, rows: torch.Tensor | None) -> Conditions:
        return self if rows is None else Conditions(self.incident.index_select(0, rows))
