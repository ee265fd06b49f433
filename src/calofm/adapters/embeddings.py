"""Adapters on the embedded inputs: per-particle bottlenecks and per-class layer-embedding shifts.

They sit at the base model's embedding seam (``CaloFM.embed_adapters``, None in a base model) and
act on their own rows only. Both start at zero: a bottleneck's up-projection is zero, a shift table is zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from calofm.adapters.rows import Sites, active, add_rows, take
from calofm.errors import CalofmError
from calofm.model.experts import Routing, RowRouted
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


class LayerEmbedShift(nn.Module):
    """One class's shift of the layer embedding (special tokens' row included), zero to start."""

    def __init__(self, n_layers: int, d: int):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(n_layers + 1, d))


class EmbeddingAdapters(nn.Module, RowRouted):
    """Per-particle bottlenecks and per-class layer shifts of the embedded streams.

    Gets the spatial and energy streams (B, t, d), the incident embedding (B, 1, d) (None on decode
    steps after the first) and the spatial ids (B, t), before the incident is prepended.
    """

    def __init__(self, layer_of_token: torch.Tensor, off: set[str]):
        super().__init__()
        self.particle = nn.ModuleDict()
        self.layer_shift = nn.ModuleDict()
        self.off = off
        self.register_buffer("layer_of_token", layer_of_token, persistent=False)

    def forward(
        self,
        xs: torch.Tensor,
        xe: torch.Tensor,
        xi: torch.Tensor | None,
        spatial: torch.Tensor,
        routing: Routing,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        for particle, rows in active(routing.by_particle, self.particle, self.off):
            b = self.particle[particle]
            xs = add_rows(xs, rows, b.spatial(take(xs, rows)))
            xe = add_rows(xe, rows, b.energy(take(xe, rows)))
            if xi is not None:
                xi = add_rows(xi, rows, b.incident(take(xi, rows)))
        for name, rows in active(routing.by_class, self.layer_shift, self.off, routing.classes):
            layers = self.layer_of_token[take(spatial, rows)]
            xs = add_rows(xs, rows, self.layer_shift[name].table[layers].to(xs.dtype))
        return xs, xe, xi


def embedding_adapters(model: CaloFM, sites: Sites) -> EmbeddingAdapters:
    """The adapters at the model's embedding seam, put there on first use."""
    layers = model.geometry[:, 0].clone()
    return sites.routed(
        model, "embed_adapters", EmbeddingAdapters, lambda _: EmbeddingAdapters(layers, sites.off)
    )


def add_bottlenecks(
    model: CaloFM,
    sites: Sites,
    particle: str,
    width: int,
    generator: torch.Generator | None = None,
) -> nn.Module:
    hook = embedding_adapters(model, sites)
    if particle in hook.particle:
        raise CalofmError(f"model already has embedding bottlenecks for particle {particle}")
    ref = model.spatial_embed.weight
    hook.particle[particle] = StreamBottlenecks(model.config.d_model, width, generator).to(ref)
    return hook.particle[particle]


def add_layer_shift(model: CaloFM, sites: Sites, class_name: str) -> nn.Module:
    hook = embedding_adapters(model, sites)
    if class_name in hook.layer_shift:
        raise CalofmError(f"model already has a layer-embedding shift for class {class_name}")
    shift = LayerEmbedShift(model.detector.n_layers, model.config.d_model)
    hook.layer_shift[class_name] = shift.to(model.spatial_embed.weight)
    return hook.layer_shift[class_name]


def remove_embedding_adapters(model: CaloFM, particle: str | None, class_name: str | None) -> None:
    hook = model.embed_adapters
    if not isinstance(hook, EmbeddingAdapters):
        return
    if particle is not None and particle in hook.particle:
        del hook.particle[particle]
    if class_name is not None and class_name in hook.layer_shift:
        del hook.layer_shift[class_name]
