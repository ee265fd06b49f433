"""What a shower is conditioned on, as one object passed through the model.

The physical conditions are the incident energy (scaled to [-1, 1] over the tokenizer's range);
incident angle and position will join it: a new condition then changes this class (its fields and
``features``), the data that fills it and nothing in between. A model with shower totals
(``ModelConfig.totals``) is also conditioned on the hit count and visible energy the shower is to
have: taken from the tokens in training, drawn by the totals model in generation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

# Scales of log1p(hits) and log1p(visible MeV), so that both are of order one over the showers of
# a 30-layer ECAL (up to ~1800 hits, ~2.5 GeV visible). The shower state uses the same scales.
LOG_HITS_SCALE, LOG_MEV_SCALE = 7.5, 8.0


@dataclass(frozen=True)
class Conditions:
    """Per-shower conditions; every tensor has one row per shower."""

    incident: torch.Tensor  # (B,) scaled incident energy
    n_hits: torch.Tensor | None = None  # (B,) long: hits the shower is to have
    visible: torch.Tensor | None = None  # (B,) float: visible MeV the shower is to have

    N_FEATURES = 2  # of the physical conditions
    N_TOTALS = 2

    @classmethod
    def of(cls, value: Conditions | torch.Tensor) -> Conditions:
        """``value`` itself, or the conditions made of a bare (B,) scaled incident-energy tensor."""
        return value if isinstance(value, Conditions) else cls(incident=value)

    def __len__(self) -> int:
        return len(self.incident)

    @property
    def has_totals(self) -> bool:
        return self.n_hits is not None and self.visible is not None

    def with_totals(self, n_hits: torch.Tensor, visible: torch.Tensor) -> Conditions:
        return replace(self, n_hits=n_hits, visible=visible)

    def features(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, N_FEATURES): the scaled energy and its square (the response is not linear in it)."""
        e = self.incident.to(dtype)
        return torch.stack([e, e * e], dim=-1)

    def totals_features(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, N_TOTALS): log1p of the hits and of the visible MeV, scaled to order one."""
        if not self.has_totals:
            raise ValueError("conditions: these conditions carry no shower totals")
        hits = torch.log1p(self.n_hits.to(dtype)) / LOG_HITS_SCALE
        return torch.stack([hits, torch.log1p(self.visible.to(dtype)) / LOG_MEV_SCALE], -1)

    def __getitem__(self, rows: int | slice | torch.Tensor) -> Conditions:
        """The conditions of some rows (an index, slice or index tensor), totals included."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1)
        n_hits = None if self.n_hits is None else self.n_hits[rows]
        visible = None if self.visible is None else self.visible[rows]
        return Conditions(self.incident[rows], n_hits, visible)
