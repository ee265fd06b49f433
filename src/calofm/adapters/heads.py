"""Output heads with per-particle replacements and per-class biases of the voxel logits by layer.

A particle head is a full copy of the base head (for a factorised voxel head: of all its sub-heads),
trained for that particle's rows (the heads are what tells voxels and energy bins apart, and a new
particle fills them differently). Rows of particles without their own head use the base head; a
batch without any adapted row takes the plain base path, bit-identical to the base model.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from calofm.adapters.rows import Sites, active
from calofm.errors import CalofmError
from calofm.model.experts import Routing, RowRouted
from calofm.model.heads import VoxelHead
from calofm.model.linear import Linear
from calofm.model.transformer import CaloFM


class ParticleHead(nn.Linear):
    """A particle's own energy head, initialised as a copy of the base head."""

    def __init__(self, base: nn.Linear):
        nn.Module.__init__(self)  # no random init: the weights are the base head's
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach().clone())
        self.bias = nn.Parameter(base.bias.detach().clone())

    def merged(self) -> Linear:
        """A plain energy head with this head's weights (for every row)."""
        out = Linear(self.in_features, self.out_features).to(self.weight)
        out.load_state_dict(self.state_dict())
        return out


def particle_voxel_head(base: VoxelHead) -> VoxelHead:
    """A particle's own voxel head: a copy of the base head with its own parameters."""
    head = copy.deepcopy(base)
    for p in head.parameters():
        p.data = p.data.clone()
    return head


class LayerLogitBias(nn.Module):
    """One class's bias of the voxel logits, one value per layer (zero to start).

    It moves the class's hits between layers directly; the special tokens get no bias.
    """

    def __init__(self, n_layers: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(n_layers))


class RoutedHead(nn.Module, RowRouted):
    """The base energy head (the same parameters) plus particle heads.

    Not a ``Linear`` itself: its product is never the prepacked one, so ``prepacked`` leaves its
    weight alone."""

    def __init__(self, base: Linear, off: set[str]):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.particle = nn.ModuleDict()
        self.off = off

    def _base(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        heads = dict(active(routing.by_particle, self.particle, self.off))
        if not heads:
            return self._base(x)
        return routing.by_particle.apply(
            x, lambda p, xr: self.particle[p](xr) if p in heads else self._base(xr)
        )


class RoutedVoxelHead(nn.Module, RowRouted):
    """The base voxel head plus particle heads and per-class layer biases, rows routed to each.

    The base head's parameters and sub-modules are registered here under their own names, so the
    model's base tensors keep their names (and their hash) when the head is wrapped.
    """

    def __init__(self, base: VoxelHead, n_layers: int, off: set[str]):
        super().__init__()
        self._base = (base,)  # a tuple: not a sub-module, its tensors are registered below
        for name, param in base.named_parameters(recurse=False):
            self.register_parameter(name, param)
        for name, module in base.named_children():
            self.add_module(name, module)
        self.n_layers = n_layers
        self.particle = nn.ModuleDict()
        self.layer_bias = nn.ModuleDict()
        self.off = off

    @property
    def base(self) -> VoxelHead:
        return self._base[0]

    def _layer_bias(self, routing: Routing) -> torch.Tensor | None:
        """(B, layers) bias of each row's class, or None when no class of the batch has one."""
        found = active(routing.by_class, self.layer_bias, self.off, routing.classes)
        if not found:
            return None
        ref = next(iter(self.layer_bias.values())).bias
        bias = torch.zeros(len(routing), self.n_layers, dtype=ref.dtype, device=ref.device)
        for name, rows in found:
            if rows is None:
                bias = bias + self.layer_bias[name].bias
            else:
                bias = bias.index_copy(0, rows, self.layer_bias[name].bias.expand(len(rows), -1))
        return bias

    def _routed(
        self,
        routing: Routing,
        fn: Callable[..., torch.Tensor],
        *tensors: torch.Tensor | None,
    ) -> torch.Tensor:
        """``fn(head, *rows of tensors)`` with each particle's rows on its head."""
        heads = dict(active(routing.by_particle, self.particle, self.off))
        if not heads:
            return fn(self.base, *tensors)
        return routing.by_particle.apply_many(
            lambda p, *parts: fn(self.particle[p] if p in heads else self.base, *parts), *tensors
        )

    def scores(
        self,
        h: torch.Tensor,
        *,
        routing: Routing,
        used: torch.Tensor | None = None,
        energy: torch.Tensor | None = None,
        centre: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if used is None:
            return self._routed(
                routing, lambda head, h, bias: head.scores(h, bias), h, self._layer_bias(routing)
            )
        return self._routed(
            routing,
            lambda head, h, bias, used, e, c: head.scores(h, bias, used=used, **_extra(e, c)),
            h,
            self._layer_bias(routing),
            used,
            energy,
            centre,
        )

    def log_prob(
        self,
        h: torch.Tensor,
        target: torch.Tensor,
        history: torch.Tensor | None = None,
        *,
        routing: Routing,
        energy: torch.Tensor | None = None,
        centre: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._routed(
            routing,
            lambda head, h, t, hist, bias, e, c: head.log_prob(h, t, hist, bias, **_extra(e, c)),
            h,
            target,
            history,
            self._layer_bias(routing),
            energy,
            centre,
        )

    def sample(
        self,
        h: torch.Tensor,
        u: torch.Tensor | None,
        used: torch.Tensor | None,
        temperature: float | torch.Tensor,
        top_k: int | None = None,
        top_p: float | None = None,
        *,
        routing: Routing,
        can_end: torch.Tensor | None = None,
        energy: torch.Tensor | None = None,
        centre: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self._routed(
            routing,
            lambda head, h, u, used, bias, end, e, c: head.sample(
                h, u, used, temperature, top_k, top_p, bias, can_end=end, **_extra(e, c)
            ),
            h,
            u,
            used,
            self._layer_bias(routing),
            can_end,
            energy,
            centre,
        )

    def never_end(self) -> None:
        self.base.never_end()


def _extra(energy: torch.Tensor | None, centre: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The layer energy features and the shower's centre as the keywords a factorised head takes
    (none given: no keyword, as the flat and layered heads take none)."""
    given = {"energy": energy, "centre": centre}
    return {k: v for k, v in given.items() if v is not None}


def routed_energy_head(model: CaloFM, sites: Sites) -> RoutedHead:
    return sites.routed(model, "energy_head", RoutedHead, lambda b: RoutedHead(b, sites.off))


def routed_voxel_head(model: CaloFM, sites: Sites) -> RoutedVoxelHead:
    n_layers = model.detector.n_layers
    return sites.routed(
        model, "spatial_head", RoutedVoxelHead, lambda b: RoutedVoxelHead(b, n_layers, sites.off)
    )


def add_particle_heads(model: CaloFM, sites: Sites, particle: str) -> dict[str, nn.Module]:
    spatial, energy = routed_voxel_head(model, sites), routed_energy_head(model, sites)
    if particle in spatial.particle or particle in energy.particle:
        raise CalofmError(f"model already has heads for particle {particle}")
    spatial.particle[particle] = particle_voxel_head(spatial.base)
    energy.particle[particle] = ParticleHead(energy)
    return {"spatial_head": spatial.particle[particle], "energy_head": energy.particle[particle]}


def remove_particle_heads(model: CaloFM, particle: str) -> None:
    for head in (model.spatial_head, model.energy_head):
        if isinstance(head, RoutedHead | RoutedVoxelHead) and particle in head.particle:
            del head.particle[particle]


def add_layer_logit_bias(model: CaloFM, sites: Sites, class_name: str) -> nn.Module:
    head = routed_voxel_head(model, sites)
    if class_name in head.layer_bias:
        raise CalofmError(f"model already has a layer bias for class {class_name}")
    ref = model.energy_head.weight
    head.layer_bias[class_name] = LayerLogitBias(model.detector.n_layers).to(ref)
    return head.layer_bias[class_name]


def remove_layer_logit_bias(model: CaloFM, class_name: str) -> None:
    head = model.spatial_head
    if isinstance(head, RoutedVoxelHead) and class_name in head.layer_bias:
        del head.layer_bias[class_name]
