"""Adapters on the embedded inputs: per-particle bottlenecks and per-class layer-embedding shifts.

They replace the model's ``embed_hook`` (an identity in the base model) and act on their own rows
only. Both start at zero: a bottleneck's up-projection is zero, a shift table is zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from calofm.adapters.rows import active, add_rows, take
from calofm.errors import CalofmError
from calofm.model.experts import EmbeddingHook, Routing
from calofm.model.transformer import CaloFM


class Bottleneck(nn.Module):
    """``up(gelu(down(x)))``, added to the input; ``up`` starts at zero."""

    def __init__(self, d: int, width: int, generator: torch.Generator | None = None):
        super().__init__()
        self.down = nn.Parameter(torch.empty(width, d))
        self.down_bias = nn.Parameter(torch.zeros(width))
        self.up = nn.Parameter(torch.zeros(d, width))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5), generator=generator)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.gelu(F.linear(x, self.down, self.down_bias)), self.up)


class StreamBottlenecks(nn.Module):
    """One particle's bottlenecks on the spatial, energy and incident-energy embeddings."""

    def __init__(self, d: int, width: int, generator: torch.Generator | None = None):
        super().__init__()
        self.spatial = Bottleneck(d, width, generator)
        self.energy = Bottleneck(d, width, generator)
        self.incident = Bottleneck(d, width, generator)
        self.enabled = True


class LayerEmbedShift(nn.Module):
    """One class's shift of the layer embedding (special tokens' row included), zero to start."""

    def __init__(self, n_layers: int, d: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(n_layers + 1, d))
        self.enabled = True


class EmbeddingAdapters(EmbeddingHook):
    def __init__(self, layer_of_token: torch.Tensor):
        super().__init__()
        self.particle = nn.ModuleDict()
        self.layer_shift = nn.ModuleDict()
        self.register_buffer("layer_of_token", layer_of_token, persistent=False)

    def forward(
        self,
        xs: torch.Tensor,
        xe: torch.Tensor,
        xi: torch.Tensor | None,
        spatial: torch.Tensor,
        routing: Routing,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        for particle, rows in active(routing.by_particle, self.particle):
            b = self.particle[particle]
            xs = add_rows(xs, rows, b.spatial(take(xs, rows)))
            xe = add_rows(xe, rows, b.energy(take(xe, rows)))
            if xi is not None:
                xi = add_rows(xi, rows, b.incident(take(xi, rows)))
        for name, rows in active(routing.by_class, self.layer_shift, routing.classes):
            layers = self.layer_of_token[take(spatial, rows)]
            xs = add_rows(xs, rows, self.layer_shift[name].table[layers].to(xs.dtype))
        return xs, xe, xi


def embedding_adapters(model: CaloFM) -> EmbeddingAdapters:
    """The model's embedding hook, replaced by an EmbeddingAdapters on first use."""
    if not isinstance(model.embed_hook, EmbeddingAdapters):
        model.embed_hook = EmbeddingAdapters(model.geometry[:, 0].clone())
    return model.embed_hook


def add_bottlenecks(
    model: CaloFM, particle: str, width: int, generator: torch.Generator | None = None
) -> nn.Module:
    hook = embedding_adapters(model)
    if particle in hook.particle:
        raise CalofmError(f"model already has embedding bottlenecks for particle {particle}")
    ref = model.spatial_embed.weight
    hook.particle[particle] = StreamBottlenecks(model.config.d_model, width, generator).to(ref)
    return hook.particle[particle]


def add_layer_shift(model: CaloFM, class_name: str) -> nn.Module:
    hook = embedding_adapters(model)
    if class_name in hook.layer_shift:
        raise CalofmError(f"model already has a layer-embedding shift for class {class_name}")
    shift = LayerEmbedShift(model.detector.n_layers, model.config.d_model)
    hook.layer_shift[class_name] = shift.to(model.spatial_embed.weight)
    return hook.layer_shift[class_name]


def remove_embedding_adapters(model: CaloFM, particle: str | None, class_name: str | None) -> None:
    hook = model.embed_hook
    if not isinstance(hook, EmbeddingAdapters):
        return
    if particle is not None and particle in hook.particle:
        del hook.particle[particle]
    if class_name is not None and class_name in hook.layer_shift:
        del hook.layer_shift[class_name]
