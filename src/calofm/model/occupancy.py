"""What the factorised voxel head's sub-heads see of the voxels a shower already has.

The same features come from two sources: in training from the history of every position (one-hot
sums, never a (B, T, voxels) tensor), in generation from the decoder's used-voxel mask. Tests check
that both give the same distribution (tests/test_occupancy.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.model.voxel_parts import causal_history, split_voxels

# Inner rings around the beam axis whose occupancy per layer the layer head sees (ring_occupancy):
# the core (the 2 x 2 central cells), the 8 cells around it, the next ring.
RINGS = 3
# Central columns whose taken cells per x row the x head sees (centre_occupancy): the core's two
# and one on each side.
CENTRE = 4
# Per-layer energy features of the layer head (layer_energy): log(1 + the layer's energy so far over
# the last hit's), and the same times the fraction of the layer's core taken.
LAYER_ENERGY = 2


class Occupancy(NamedTuple):
    """What each sub-head sees of the voxels a shower already has.

    ``layers`` (..., L): log(1 + hits) per layer (with ``ring_occupancy``, followed by each
    layer's fraction of taken cells in the inner rings, with ``full_rings`` their full flags and,
    with ``layer_energy``, its energy features, (..., L * per_layer)); ``rows`` (..., X):
    log(1 + hits) per x row of the chosen layer (with ``centre_occupancy``, followed by the taken
    flags of each row's central columns, (..., X * per_row)); ``column`` (..., Y): 1 where the
    chosen (layer, x) row's y is taken. From a used-voxel mask, ``rows`` and ``column`` hold every
    layer's and row's (indexed by the choice).
    """

    layers: torch.Tensor
    rows: torch.Tensor
    column: torch.Tensor


class OccupancyFeatures(nn.Module):
    """The occupancy features of one detector geometry; buffers only, no parameters."""

    def __init__(
        self,
        detector: DetectorConfig,
        rings: bool = False,
        centre: bool = False,
        layer_energy: bool = False,
        full_rings: bool = False,
    ):
        super().__init__()
        self.n_layers, self.nx, self.ny = detector.n_layers, detector.nx, detector.ny
        self.n_voxels = self.n_layers * self.nx * self.ny
        self.rings, self.centre = rings, centre
        self.layer_energy, self.full_rings = layer_energy, full_rings
        if (layer_energy or full_rings) and not rings:
            raise CalofmError("voxel head: layer energy and full rings need ring occupancy")
        self.register_buffer("ones_y", torch.ones(self.ny, 1), persistent=False)
        if rings:  # which ring around the beam axis each (x, y) cell is in; the rest is RINGS
            x, y = torch.meshgrid(torch.arange(self.nx), torch.arange(self.ny), indexing="ij")
            r = torch.hypot(x - (self.nx - 1) / 2, y - (self.ny - 1) / 2).floor().long()
            member = F.one_hot(r.flatten().clamp(max=RINGS), RINGS + 1)[:, :RINGS].float()
            self.register_buffer("ring_member", member, persistent=False)  # (cells, RINGS)
            inner = member.sum(-1).nonzero()[:, 0]  # the few cells in a ring: sampling reads these
            self.register_buffer("ring_cells", inner, persistent=False)
            self.register_buffer("ring_cells_member", member[inner], persistent=False)
        if centre:  # the central columns, the first of them at centre_start
            if self.ny < CENTRE:
                raise CalofmError(f"voxel head: centre occupancy needs at least {CENTRE} columns")
            self.centre_start = (self.ny - CENTRE) // 2

    @property
    def per_layer(self) -> int:
        """Features of each layer: hits, ring fractions, full flags, energy."""
        return 1 + RINGS * self.rings + RINGS * self.full_rings + LAYER_ENERGY * self.layer_energy

    @property
    def per_row(self) -> int:
        """Features of each x row: hits, central columns taken."""
        return 1 + CENTRE * self.centre

    def from_history(
        self,
        history: torch.Tensor,
        layer: torch.Tensor,
        x: torch.Tensor,
        dtype: torch.dtype,
        energy: torch.Tensor | None = None,
    ) -> Occupancy:
        """Occupancy at every position of ``history`` (B, T) (position j has inputs 1..j) for the
        chosen ``layer`` and ``x`` (B, T): counts from one-hot sums, no (B, T, voxels) tensor.
        ``energy`` (B, T, L): the layer energy features (``TokenScoring._layer_energy``)."""
        h_layer, h_x, h_y = split_voxels(history, self.n_layers, self.nx, self.ny)
        regular = history < self.n_voxels
        causal = causal_history(history.shape[1], history.device)[None] & regular[:, None, :]
        in_layers = F.one_hot(h_layer, self.n_layers).to(dtype) * regular[..., None]  # (B, T, L)
        layers = in_layers.cumsum(1)
        in_layer = causal & (h_layer[:, None, :] == layer[:, :, None])
        in_rows = F.one_hot(h_x, self.nx).to(dtype)
        in_columns = F.one_hot(h_y, self.ny).to(dtype)
        if self.centre:  # each hit's row, then its (row, central column) cell, in one matmul
            central = in_columns[..., self.centre_start : self.centre_start + CENTRE]
            cells = (in_rows[..., None] * central[..., None, :]).flatten(-2)  # (B, T, X * CENTRE)
            counts = in_layer.to(dtype) @ torch.cat([in_rows, cells], dim=-1)
            rows = torch.cat([torch.log1p(counts[..., : self.nx]), counts[..., self.nx :]], -1)
        else:
            rows = torch.log1p(in_layer.to(dtype) @ in_rows)
        in_row = in_layer & (h_x[:, None, :] == x[:, :, None])
        column = in_row.to(dtype) @ in_columns
        per_layer = torch.log1p(layers)
        if self.rings:  # hits per (layer, ring) so far
            member = self.ring_member[h_x * self.ny + h_y].to(dtype)  # (B, T, RINGS)
            hits = in_layers[..., None] * member[:, :, None]
            per_layer = self._with_rings(per_layer, hits.cumsum(1), energy)
        return Occupancy(per_layer, rows, column.clamp(max=1))

    def from_used(
        self, used: torch.Tensor, dtype: torch.dtype, energy: torch.Tensor | None = None
    ) -> tuple[Occupancy, torch.Tensor]:
        """Occupancy of every layer, row and column from a (..., voxels) mask: ``layers``
        (..., L), ``rows`` (..., L, X) and ``column`` (..., L, X, Y) (the mask itself, boolean),
        indexed by the choice; and the hits per row (..., L, X), which sampling masks full rows
        and layers with. The mask is read, never copied whole: at every decode step a float copy
        of it cost more than the three attention blocks of the small preset."""
        grid = used.unflatten(-1, (self.n_layers, self.nx, self.ny))
        per_row = row_counts(grid, self.ones_y.to(dtype))
        per_layer = torch.log1p(per_row.sum(-1))
        if self.rings:
            inner = grid.flatten(-2)[..., self.ring_cells].to(dtype)  # (..., L, ring cells)
            ring_hits = inner @ self.ring_cells_member.to(dtype)  # (..., L, RINGS)
            per_layer = self._with_rings(per_layer, ring_hits, energy)
        rows = torch.log1p(per_row)
        if self.centre:
            central = grid[..., self.centre_start : self.centre_start + CENTRE].to(dtype)
            rows = torch.cat([rows, central.flatten(-2)], dim=-1)
        return Occupancy(per_layer, rows, grid), per_row

    def _with_rings(
        self, per_layer: torch.Tensor, ring_hits: torch.Tensor, energy: torch.Tensor | None
    ) -> torch.Tensor:
        """The layer head's occupancy: log(1 + hits) per layer and, per layer, the fraction of
        each inner ring's cells taken (..., L, RINGS): whether a layer's core is full, which its
        hit count cannot say. With ``full_rings`` each ring's flag of being full follows (a
        step, where the fraction is a slope). With ``layer_energy``, ``energy`` (..., L) follows,
        alone and times its core's fraction: whether a hit as hot as the last fits the first
        ring of a layer with a full core."""
        size = self.ring_member.sum(0).to(ring_hits.dtype)
        full = ring_hits / size
        if self.full_rings:
            full = torch.cat([full, (ring_hits >= size).to(full.dtype)], dim=-1)
        if self.layer_energy:
            if energy is None:
                raise CalofmError("voxel head: layer energy needs the layer energy features")
            e = energy.to(full.dtype)[..., None]
            full = torch.cat([full, e, e * full[..., :1]], dim=-1)
        return torch.cat([per_layer, full.flatten(-2)], dim=-1)


@torch.library.custom_op("calofm::row_counts", mutates_args=())
def row_counts(grid: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """Hits per row (..., L, X) of a boolean grid (..., L, X, Y), in ``ones.dtype`` (``ones``:
    (Y, 1)). A byte view, a float copy and a matmul: 2x faster on a CPU than a boolean sum. An
    opaque operator to ``torch.compile``, whose code for the byte view of a boolean ran 30x slower
    than this (16 against 0.5 ms per decode step at batch 64)."""
    return (grid.view(torch.uint8).to(ones.dtype) @ ones)[..., 0]


@row_counts.register_fake
def _row_counts_shape(grid: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    return grid.new_empty(grid.shape[:-1], dtype=ones.dtype)
