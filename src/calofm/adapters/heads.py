"""Output heads with per-particle replacements and per-class biases of the spatial logits by layer.

A particle head is a full copy of the base head, trained for that particle's rows (the heads are
what tells voxels and energy bins apart, and a new particle fills them differently). Rows of
particles without their own head use the base head; a batch without any adapted row takes the
plain base path, bit-identical to the base model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calofm.adapters.rows import active, add_rows
from calofm.errors import CalofmError
from calofm.model.experts import RoutedLinear, Routing
from calofm.model.transformer import CaloFM

HEADS = ("spatial_head", "energy_head")


class ParticleHead(nn.Linear):
    """A particle's own head, initialised as a copy of the base head."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)  # no random init: the weights are the base head's
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach().clone())
        self.bias = nn.Parameter(base.bias.detach().clone())
        self.enabled = True


class LayerLogitBias(nn.Module):
    """One class's bias of the spatial logits, one value per layer (zero to start).

    It moves the class's hits between layers directly; the special tokens get no bias.
    """

    def __init__(self, n_layers: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n_layers))
        self.enabled = True

    def forward(self, layer_of_token: torch.Tensor) -> torch.Tensor:
        """(V,) bias per spatial token; ``layer_of_token`` is n_layers for the special tokens."""
        return F.pad(self.bias, (0, 1))[layer_of_token]


class RoutedHead(RoutedLinear):
    """The base head (the same parameters) plus particle heads and per-class layer biases."""

    def __init__(self, base: RoutedLinear, layer_of_token: torch.Tensor | None):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.particle = nn.ModuleDict()
        self.layer_bias = nn.ModuleDict()
        self.register_buffer("layer_of_token", layer_of_token, persistent=False)

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        if routing is None:
            return self._base(x)
        heads = dict(active(routing.by_particle, self.particle))
        if heads:
            y = routing.by_particle.apply(
                x, lambda p, xr: self.particle[p](xr) if p in heads else self._base(xr)
            )
        else:
            y = self._base(x)
        for name, rows in active(routing.by_class, self.layer_bias, routing.classes):
            bias = self.layer_bias[name](self.layer_of_token).to(y.dtype)
            n = len(y) if rows is None else len(rows)
            y = add_rows(y, rows, bias.expand(n, *y.shape[1:]))
        return y


def routed_head(model: CaloFM, name: str) -> RoutedHead:
    """The model's head ``name``, wrapped in a RoutedHead on first use."""
    head = getattr(model, name)
    if not isinstance(head, RoutedHead):
        layers = model.geometry[:, 0].clone() if name == "spatial_head" else None
        head = RoutedHead(head, layers)
        setattr(model, name, head)
    return head


def add_particle_heads(model: CaloFM, particle: str) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    for name in HEADS:
        head = routed_head(model, name)
        if particle in head.particle:
            raise CalofmError(f"model already has heads for particle {particle}")
        head.particle[particle] = ParticleHead(head)
        out[name] = head.particle[particle]
    return out


def remove_particle_heads(model: CaloFM, particle: str) -> None:
    for name in HEADS:
        head = getattr(model, name)
        if isinstance(head, RoutedHead) and particle in head.particle:
            del head.particle[particle]


def add_layer_logit_bias(model: CaloFM, class_name: str) -> nn.Module:
    head = routed_head(model, "spatial_head")
    if class_name in head.layer_bias:
        raise CalofmError(f"model already has a layer bias for class {class_name}")
    head.layer_bias[class_name] = LayerLogitBias(model.detector.n_layers).to(head.weight)
    return head.layer_bias[class_name]


def remove_layer_logit_bias(model: CaloFM, class_name: str) -> None:
    head = model.spatial_head
    if isinstance(head, RoutedHead) and class_name in head.layer_bias:
        del head.layer_bias[class_name]
