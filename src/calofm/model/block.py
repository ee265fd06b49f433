"""A transformer block: attention (block 0 cross-attends from the energy stream to the spatial
stream), then the row's class expert; one module for the full pass and the decode step."""

from __future__ import annotations

import torch
from torch import nn

from calofm.model.attention import Attention
from calofm.model.config import ModelConfig
from calofm.model.experts import Experts, Routing


class Block(nn.Module):
    """Pre-LayerNorm block: attention then the row's class expert, each added to the residual."""

    def __init__(self, config: ModelConfig, n_classes: int, cross: bool):
        super().__init__()
        d = config.d_model
        self.cross = cross
        self.ln_attn = nn.LayerNorm(d)
        self.ln_kv = nn.LayerNorm(d) if cross else None  # the spatial stream's own norm
        self.attn = Attention(config)
        self.ln_ffn = nn.LayerNorm(d)
        self.experts = Experts(d, config.ffn_dim, n_classes)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        routing: Routing,
        queries: torch.Tensor | None = None,
        cache_pos: int | None = None,
    ) -> torch.Tensor:
        if self.cross:
            x = x + self.attn(self.ln_attn(queries), self.ln_kv(x), rope, routing, cache_pos)
        else:
            h = self.ln_attn(x)
            x = x + self.attn(h, h, rope, routing, cache_pos)
        return x + self.experts(self.ln_ffn(x), routing)

    def step(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        routing: Routing,
        pos: torch.Tensor,
        mask: torch.Tensor,
        queries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``forward`` for one new position per row at per-row positions (``Attention.step``)."""
        if self.cross:
            x = x + self.attn.step(self.ln_attn(queries), self.ln_kv(x), rope, routing, pos, mask)
        else:
            h = self.ln_attn(x)
            x = x + self.attn.step(h, h, rope, routing, pos, mask)
        return x + self.experts(self.ln_ffn(x), routing)
