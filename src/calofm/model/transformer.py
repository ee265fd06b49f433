"""CaloFM: a next-hit transformer over two parallel token streams (voxels and energy bins).

Hidden sequence: ``[I, SOS, t1, ..., tn]`` where I is the embedded incident energy, prepended to
both streams. Block 0 is causal cross-attention (queries from the energy stream, keys/values from
the spatial stream, the spatial stream being the residual stream); the other blocks are causal
self-attention. Every block's FFN is a per-class expert. Two heads predict the next voxel and the
next energy bin from the same hidden state.

Each spatial token also carries its voxel's (layer, x, y) through three learned embeddings, so the
model knows a voxel's depth and transverse position even for voxels it has rarely seen; the
special tokens use an extra index of each table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.model.attention import Attention, RotaryEmbedding
from calofm.model.config import ModelConfig, parse_class
from calofm.model.experts import EmbeddingHook, Experts, RoutedLinear, Routing
from calofm.model.kv_cache import KVCache
from calofm.tokens import TokenizerConfig


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


class CaloFM(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        tokenizer: TokenizerConfig,
        detector: DetectorConfig,
        classes: list[str],
    ):
        super().__init__()
        if tokenizer.n_voxels != detector.n_voxels:
            raise CalofmError(
                f"model: tokenizer has {tokenizer.n_voxels} voxels, detector {detector.n_voxels}"
            )
        if not classes or len(set(classes)) != len(classes):
            raise CalofmError(f"model: need at least one class and no duplicates, got {classes}")
        for name in classes:
            parse_class(name)
        self.config, self.tokenizer, self.detector = config, tokenizer, detector
        self.classes = list(classes)
        d = config.d_model

        self.spatial_embed = nn.Embedding(tokenizer.spatial_vocab, d)
        self.energy_embed = nn.Embedding(tokenizer.energy_vocab, d)
        self.incident_embed = nn.Linear(1, d)
        self.layer_embed = nn.Embedding(detector.n_layers + 1, d)
        self.x_embed = nn.Embedding(detector.nx + 1, d)
        self.y_embed = nn.Embedding(detector.ny + 1, d)
        self.register_buffer("geometry", self._geometry_table(), persistent=False)
        self.embed_hook = EmbeddingHook()  # adapters replace it (per-row embedding adapters)
        self.rope = RotaryEmbedding(config)
        self.blocks = nn.ModuleList(
            Block(config, len(classes), cross=(i == 0)) for i in range(config.n_blocks)
        )
        self.ln_f = nn.LayerNorm(d)
        self.spatial_head = RoutedLinear(d, tokenizer.spatial_vocab)
        self.energy_head = RoutedLinear(d, tokenizer.energy_vocab)
        self.apply(self._init_weights)

    def _geometry_table(self) -> torch.Tensor:
        """(spatial_vocab, 3) of (layer, x, y) per spatial id; special ids get (L, nx, ny)."""
        det, tok = self.detector, self.tokenizer
        layer, x, y = det.voxel_to_lxy(torch.arange(det.n_voxels).numpy())
        table = torch.tensor([det.n_layers, det.nx, det.ny]).repeat(tok.spatial_vocab, 1)
        table[: det.n_voxels] = torch.stack(
            [torch.from_numpy(layer), torch.from_numpy(x), torch.from_numpy(y)], dim=1
        )
        return table

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        # Residual projections scaled down with depth (GPT-2).
        for name in ("wo", "fc2"):
            layer = getattr(module, name, None)
            if isinstance(layer, nn.Linear):
                nn.init.normal_(layer.weight, std=std / math.sqrt(2 * self.config.n_blocks))

    # ---- classes -------------------------------------------------------------------------------

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise CalofmError(
                f"model has no class {name!r}; its classes: {', '.join(self.classes)}"
            )
        return self.classes.index(name)

    def add_class(self, name: str, init_from: str | None = None) -> list[nn.Parameter]:
        """Add one expert per block for a new class; returns the new parameters.

        The experts are copies of ``init_from``'s (a known class) or freshly initialised.
        """
        parse_class(name)
        if name in self.classes:
            raise CalofmError(f"model already has class {name!r}")
        src = None if init_from is None else self.class_index(init_from)
        params: list[nn.Parameter] = []
        for block in self.blocks:
            expert = block.experts.add(src)
            if src is None:
                expert.apply(self._init_weights)
            params.extend(expert.parameters())
        self.classes.append(name)
        return params

    def routing(self, class_id: torch.Tensor) -> Routing:
        return Routing(class_id, self.classes)

    # ---- forward -------------------------------------------------------------------------------

    def _embed(
        self,
        spatial: torch.Tensor,
        energy: torch.Tensor,
        incident: torch.Tensor | None,
        routing: Routing,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.geometry[spatial]
        xs = (
            self.spatial_embed(spatial)
            + self.layer_embed(g[..., 0])
            + self.x_embed(g[..., 1])
            + self.y_embed(g[..., 2])
        )
        xe = self.energy_embed(energy)
        xi = None
        if incident is not None:
            xi = self.incident_embed(incident.to(xs.dtype)[:, None])[:, None, :]
        xs, xe, xi = self.embed_hook(xs, xe, xi, spatial, routing)
        if xi is not None:
            xs, xe = torch.cat([xi, xs], dim=1), torch.cat([xi, xe], dim=1)
        return xs, xe

    def hidden_states(
        self,
        spatial: torch.Tensor,
        energy: torch.Tensor,
        incident: torch.Tensor | None,
        routing: Routing,
        start: int | None = None,
    ) -> list[torch.Tensor]:
        """Every block's output (B, t, d) at the positions of the t given tokens.

        ``start=None``: a full causal pass over tokens 0..t-1 (SOS first), incident prepended.
        ``start=j``: tokens j..j+t-1 against the KV cache (which holds tokens before j);
        for ``j == 0`` the incident energy is prepended and written to the cache too.
        """
        first = start is None or start == 0
        if first and incident is None:
            raise CalofmError("model: the first step needs the incident energies")
        xs, xe = self._embed(spatial, energy, incident if first else None, routing)
        pos0 = 0 if first else start + 1  # hidden position of the first input
        rope = self.rope(torch.arange(pos0, pos0 + xs.shape[1], device=xs.device))
        cache_pos = None if start is None else pos0
        out = []
        x = xs
        for i, block in enumerate(self.blocks):
            x = block(x, rope, routing, queries=xe if i == 0 else None, cache_pos=cache_pos)
            out.append(x[:, 1:] if first else x)
        return out

    def logits(self, h: torch.Tensor, routing: Routing) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.ln_f(h)
        return self.spatial_head(h, routing), self.energy_head(h, routing)

    def forward(
        self,
        spatial: torch.Tensor,
        energy: torch.Tensor,
        incident: torch.Tensor,
        class_id: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, Vs), (B, T, Ve); position j predicts token j+1 of each stream."""
        routing = self.routing(class_id)
        return self.logits(self.hidden_states(spatial, energy, incident, routing)[-1], routing)

    def loss(
        self,
        spatial_full: torch.Tensor,
        energy_full: torch.Tensor,
        incident: torch.Tensor,
        class_id: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(total, spatial CE, energy CE) on full (B, T+1) sequences; PAD targets are ignored."""
        tok = self.tokenizer
        ls, le = self(spatial_full[:, :-1], energy_full[:, :-1], incident, class_id)
        ce_s = F.cross_entropy(
            ls.flatten(0, 1), spatial_full[:, 1:].flatten(), ignore_index=tok.spatial_pad
        )
        ce_e = F.cross_entropy(
            le.flatten(0, 1), energy_full[:, 1:].flatten(), ignore_index=tok.energy_pad
        )
        return ce_s + ce_e, ce_s, ce_e

    # ---- KV-cache decoding ---------------------------------------------------------------------

    def setup_cache(
        self,
        batch_size: int,
        max_tokens: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> int:
        """Allocate a cache for ``max_tokens`` stream tokens (SOS included) plus the incident slot.

        Block 0's cache holds the spatial stream's keys/values, the others their own stream's.
        Returns the cache size in bytes.
        """
        ref = self.spatial_head.weight
        c = self.config
        for block in self.blocks:
            block.attn.kv_cache = KVCache(
                batch_size,
                c.n_heads,
                max_tokens + 1,
                c.head_dim,
                dtype=dtype or ref.dtype,
                device=device or ref.device,
            )
        return self.cache_bytes()

    def cache_bytes(self) -> int:
        return sum(b.attn.kv_cache.nbytes for b in self.blocks if b.attn.kv_cache is not None)

    def clear_cache(self) -> None:
        for block in self.blocks:
            block.attn.kv_cache = None

    def forward_step(
        self,
        spatial: torch.Tensor,
        energy: torch.Tensor,
        start: int,
        routing: Routing,
        incident: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits for tokens ``start .. start+t-1`` (B, t) given the cached earlier tokens.

        ``start=0`` begins a sequence (SOS first) and needs ``incident``.
        """
        h = self.hidden_states(spatial, energy, incident, routing, start=start)[-1]
        return self.logits(h, routing)

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
