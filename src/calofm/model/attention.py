"""One causal attention module for both block kinds, with partial rotary positions.

Cross-attention (block 0) takes queries from the energy stream and keys/values from the spatial
stream; self-attention passes the same stream twice. Both streams share positions, so one rotary
table serves both. Only the first ``rope_dim`` dimensions of each head are rotated; there is no
absolute position table, so any sequence length works.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calofm.model.config import ModelConfig
from calofm.model.experts import Routing, routing_for
from calofm.model.kv_cache import KVCache
from calofm.model.linear import Linear


class RotaryEmbedding(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        r = config.rope_dim
        inv_freq = 1.0 / config.rope_base ** (
            torch.arange(0, r, 2, dtype=torch.float32) / max(r, 1)
        )
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin, (L, rope_dim/2) each, for integer positions (L,); always in fp32.

        A decoder computes them once for every position and gathers rows per step (fp32 too)."""
        angles = positions.to(torch.float32)[:, None] * self.inv_freq[None, :]
        return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first 2*cos.shape[-1] dimensions of x (B, H, L, Dh) in pairs (i, i + half);
    in fp32 (an fp32 result) whatever x's type: rotations in bf16 drift on long sequences."""
    x = x.float()
    half = cos.shape[-1]
    if half == 0:
        return x
    x1, x2, rest = x[..., :half], x[..., half : 2 * half], x[..., 2 * half :]
    cos, sin = cos.float(), sin.float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, **kwargs: object) -> torch.Tensor:
    """``scaled_dot_product_attention`` with the scores and their softmax in fp32, also under a
    reduced-precision autocast (which would run them in bf16 or fp16); fp32 out."""
    if not torch.is_autocast_enabled(q.device.type):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    with torch.autocast(q.device.type, enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), **kwargs)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        d = config.d_model
        self.n_heads, self.head_dim = config.n_heads, config.head_dim
        self.wq = Linear(d, d)
        self.wk = Linear(d, d)
        self.wv = Linear(d, d)
        self.wo = Linear(d, d)
        self.kv_cache: KVCache | None = None

    @staticmethod
    def _project(layer: nn.Module, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        """A projection of ``x``; a row-routed one (an adapter's LoRA) is handed the routing."""
        return layer(x, **routing_for(layer, routing))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        x_q: torch.Tensor,
        x_kv: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        routing: Routing,
        cache_pos: int | None = None,
    ) -> torch.Tensor:
        """Causal attention of ``x_q`` (B, L, d) over ``x_kv`` (B, L, d).

        With ``cache_pos`` the L inputs sit at positions ``cache_pos ..``: their keys and values are
        written to the cache and the queries attend over every position written so far.
        """
        b, t, d = x_q.shape
        cos, sin = rope
        q = apply_rope(self._heads(self._project(self.wq, x_q, routing)), cos, sin)
        k = apply_rope(self._heads(self._project(self.wk, x_kv, routing)), cos, sin)
        v = self._heads(self._project(self.wv, x_kv, routing))
        start = 0
        if cache_pos is not None:
            assert self.kv_cache is not None, "call setup_cache before decoding with a cache"
            k, v = self.kv_cache.update(cache_pos, k, v)
            start = cache_pos
        if start == 0:
            y = attend(q, k, v, is_causal=True)
        elif t == 1:  # one new position attends over everything written so far
            y = attend(q, k, v)
        else:
            keys = torch.arange(start + t, device=q.device)
            queries = torch.arange(start, start + t, device=q.device)
            mask = keys[None, :] <= queries[:, None]
            y = attend(q, k, v, attn_mask=mask)
        return self._project(self.wo, y.transpose(1, 2).reshape(b, t, d), routing)

    def step(
        self,
        x_q: torch.Tensor,
        x_kv: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        routing: Routing,
        pos: torch.Tensor,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """One new position per row (B, 1, d), row i at position ``pos[i]``: static shapes.

        ``rope``: cos and sin (B, 1, 1, rope_dim/2) of each row's position; ``mask`` (B, 1, 1, W)
        says which of the first W cached positions each row sees (those up to its own).
        """
        b, _, d = x_q.shape
        cos, sin = rope
        q = apply_rope(self._heads(self._project(self.wq, x_q, routing)), cos, sin)
        k = apply_rope(self._heads(self._project(self.wk, x_kv, routing)), cos, sin)
        v = self._heads(self._project(self.wv, x_kv, routing))
        assert self.kv_cache is not None, "call setup_cache before decoding with a cache"
        keys, values = self.kv_cache.write_rows(pos, k, v, mask.shape[-1])
        y = attend(q, keys, values, attn_mask=mask)
        return self._project(self.wo, y.transpose(1, 2).reshape(b, 1, d), routing)
