"""LoRA per particle on the attention projections: ``W x + b + s * B(A x)`` on that particle's rows.

``s = alpha / sqrt(rank)`` (rank-stabilised LoRA, as the reference). ``B`` starts at zero, so a
new LoRA leaves the projection unchanged. The base output is computed for the whole batch and the
LoRA term added to its own rows only, so rows of other particles stay bit-identical to the base
model's. In the KV-cache decode path the adapted keys and values are what gets cached.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from calofm.adapters.rows import Sites, active, add_rows, take
from calofm.errors import CalofmError
from calofm.model.experts import Routing, RowRouted
from calofm.model.linear import Linear
from calofm.model.transformer import CaloFM

PROJECTIONS = ("wq", "wk", "wv", "wo")


class LoRA(nn.Module):
    def __init__(
        self,
        d_in: int,
        d_out: int,
        rank: int,
        alpha: float,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5), generator=generator)  # as nn.Linear
        self.scale = alpha / math.sqrt(rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.A), self.B) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """``s * B A``: the update folded into the base weight when merging."""
        return (self.B @ self.A) * self.scale


class LoRALinear(nn.Module, RowRouted):
    """A base projection (the same parameters) plus one LoRA per particle.

    Not a ``Linear`` itself: its product is never the prepacked one, so ``prepacked`` leaves its
    weight alone."""

    def __init__(self, base: Linear, off: set[str]):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora = nn.ModuleDict()
        self.off = off

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if not len(self.lora):
            return y
        for particle, rows in active(routing.by_particle, self.lora, self.off):
            y = add_rows(y, rows, self.lora[particle](take(x, rows)))
        return y

    def merged(self, particle: str) -> Linear:
        """A plain projection with ``particle``'s LoRA folded into its weight (for every row)."""
        out = Linear(self.in_features, self.out_features).to(self.weight)
        with torch.no_grad():
            out.weight.copy_(self.weight + self.lora[particle].delta_weight())
            out.bias.copy_(self.bias)
        return out


def add_lora(
    model: CaloFM,
    sites: Sites,
    particle: str,
    rank: int,
    alpha: float,
    generator: torch.Generator | None = None,
) -> dict[str, nn.Module]:
    """One LoRA per attention projection of every block for ``particle``; returns them by name."""
    out: dict[str, nn.Module] = {}
    for i, block in enumerate(model.blocks):
        for name in PROJECTIONS:
            proj = sites.routed(block.attn, name, LoRALinear, lambda b: LoRALinear(b, sites.off))
            if particle in proj.lora:
                raise CalofmError(f"model already has a LoRA for particle {particle}")
            lora = LoRA(proj.in_features, proj.out_features, rank, alpha, generator)
            proj.lora[particle] = lora.to(proj.weight)
            out[f"blocks.{i}.attn.{name}.lora"] = proj.lora[particle]
    return out


def remove_lora(model: CaloFM, particle: str) -> None:
    for block in model.blocks:
        for name in PROJECTIONS:
            proj = getattr(block.attn, name)
            if isinstance(proj, LoRALinear) and particle in proj.lora:
                del proj.lora[particle]
