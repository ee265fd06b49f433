"""The voxel head: P(next voxel | hidden state), flat (the paper's) or factorised by layer, x and y.

A flat head is one linear layer over all 27,003 spatial tokens; on a CPU it is most of a training
step. The factorised head writes the same distribution as P(layer) P(x | layer) P(y | layer, x):
a (layers + EOS)-way layer head, then small sub-heads for x and y fed the embeddings of the parts
already chosen. Its log-likelihood is the sum of its three parts, in nats like the flat head's, so
the losses compare directly; a step costs a fraction of the flat head's.

Both heads offer the same three operations, with routing-aware wrappers (particle copies, per-class
layer biases) in ``calofm.adapters.heads``:

- ``log_prob``: log P(target) per position, in training. With ``history`` given, the voxels the
  shower already has are excluded from the normalisation (the model learns the distribution it is
  sampled from, where a voxel is used once);
- ``scores``: full logits over the spatial vocabulary (for tests and the recompute reference);
- ``sample``: the next voxel per row, in generation, never one in ``used``, and end-of-sequence
  only where ``can_end`` allows it.

``layer_bias`` (B, layers), where given, is added to every voxel's logit by its layer (flat) or to
the layer logits (factorised): the per-class conditioning adapter moves hits between layers. The
base heads ignore ``routing``; the adapters' wrappers use it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.model.experts import Routing
from calofm.model.flat_head import FlatVoxelHead
from calofm.model.layered_head import LayeredVoxelHead
from calofm.model.sampling import sample
from calofm.model.voxel_parts import (
    add_layer_bias,
    causal_history,
    excluded_log_norm,
    with_special_tokens,
)
from calofm.tokens import TokenizerConfig

# Inner rings around the beam axis whose occupancy per layer the layer head sees (ring_occupancy):
# the 2 x 2 core, the 8 cells around it, the next ring.
RINGS = 3
# Central columns whose taken cells per x row the x head sees (centre_occupancy): the core's two
# and one on each side.
CENTRE = 4
# Per-layer energy features of the layer head (layer_energy): log(1 + the layer's energy so far over
# the last hit's), and the same times the fraction of the layer's core taken.
LAYER_ENERGY = 2


class Occupancy(NamedTuple):
    """What each sub-head sees of the voxels a shower already has (``voxel_occupancy``).

    ``layers`` (..., L): log(1 + hits) per layer (with ``ring_occupancy``, followed by each
    layer's fraction of taken cells in the inner rings, with ``full_rings`` their full flags and,
    with ``layer_energy``, its energy features, (..., L * (1 + 2 RINGS + LAYER_ENERGY)));
    ``rows`` (..., X):
    log(1 + hits) per x row of the chosen layer (with ``centre_occupancy``, followed by the taken
    flags of each row's central columns, (..., X * (1 + CENTRE))); ``column`` (..., Y): 1 where
    the chosen (layer, x) row's y is taken. From a used-voxel mask, ``rows`` and ``column`` hold
    every layer's and row's (indexed by the choice).
    """

    layers: torch.Tensor
    rows: torch.Tensor
    column: torch.Tensor


class FactorisedVoxelHead(nn.Module):
    """P(layer) P(x | layer) P(y | layer, x); the layer head's last class is end-of-sequence.

    With ``occupancy`` each sub-head also sees how full the shower already is where it chooses:
    hits per layer (layer head), per x row of the chosen layer (x head), the taken y of the
    chosen row (y head). Without it, the layer and x heads have to count a shower's used voxels
    through attention; a model trained so put a quarter of the 20 hottest cells of 90 GeV W
    showers outside the central columns while the central cells of their layer were still free
    (Geant4: 1%; docs/results.md).
    """

    def __init__(
        self,
        d_model: int,
        tokenizer: TokenizerConfig,
        detector: DetectorConfig,
        occupancy: bool = False,
        rings: bool = False,
        centre: bool = False,
        own: bool = False,
        layer_energy: bool = False,
        full_rings: bool = False,
    ):
        super().__init__()
        d = d_model
        self.n_layers, self.nx, self.ny = detector.n_layers, detector.nx, detector.ny
        self.n_voxels = tokenizer.n_voxels
        self.sos, self.eos, self.pad = (
            tokenizer.spatial_sos,
            tokenizer.spatial_eos,
            tokenizer.spatial_pad,
        )
        self.layer = nn.Linear(d, self.n_layers + 1)
        self.x_in = nn.Linear(d, d)
        self.x_layer = nn.Embedding(self.n_layers, d)
        self.x_out = nn.Linear(d, self.nx)
        self.y_in = nn.Linear(d, d)
        self.y_layer = nn.Embedding(self.n_layers, d)
        self.y_x = nn.Embedding(self.nx, d)
        self.y_out = nn.Linear(d, self.ny)
        self.occupancy = occupancy
        self.rings = rings
        if rings:  # which ring around the beam axis each (x, y) cell is in; the rest is RINGS
            if not occupancy:
                raise CalofmError("voxel head: ring occupancy needs the occupancy-aware head")
            x, y = torch.meshgrid(torch.arange(self.nx), torch.arange(self.ny), indexing="ij")
            r = torch.hypot(x - (self.nx - 1) / 2, y - (self.ny - 1) / 2).floor().long()
            member = F.one_hot(r.flatten().clamp(max=RINGS), RINGS + 1)[:, :RINGS].float()
            self.register_buffer("ring_member", member, persistent=False)  # (cells, RINGS)
            inner = member.sum(-1).nonzero()[:, 0]  # the few cells in a ring: sampling reads these
            self.register_buffer("ring_cells", inner, persistent=False)
            self.register_buffer("ring_cells_member", member[inner], persistent=False)
        self.centre = centre
        if centre:  # the central columns, the first of them at centre_start
            if not occupancy or self.ny < CENTRE:
                raise CalofmError(
                    f"voxel head: centre occupancy needs the occupancy-aware head and at least "
                    f"{CENTRE} columns"
                )
            self.centre_start = (self.ny - CENTRE) // 2
        self.layer_energy = layer_energy
        if layer_energy and not rings:
            raise CalofmError("voxel head: layer energy needs ring occupancy")
        self.full_rings = full_rings
        if full_rings and not rings:
            raise CalofmError("voxel head: full rings need ring occupancy")
        # features of each layer: hits, ring fractions, full flags, energy
        per_layer = 1 + RINGS * rings + RINGS * full_rings + LAYER_ENERGY * layer_energy
        if occupancy:
            self.register_buffer("ones_y", torch.ones(self.ny, 1), persistent=False)
            self.layer_in = nn.Linear(d, d)
            self.layer_occ = nn.Linear(self.n_layers * per_layer, d)
            self.layer_out = nn.Linear(d, self.n_layers + 1)
            self.x_occ = nn.Linear(self.nx * (1 + CENTRE * centre), d)
            self.y_occ = nn.Linear(self.ny, d)
        self.own = own
        if own:  # the gates of each layer's and each row's own occupancy features
            if not occupancy:
                raise CalofmError("voxel head: own occupancy needs the occupancy-aware head")
            self.layer_gate = nn.Linear(d, per_layer)
            self.x_gate = nn.Linear(d, 1 + CENTRE * centre)

    # the three conditionals -------------------------------------------------------------------

    def _layer_logits(
        self,
        h: torch.Tensor,
        layer_bias: torch.Tensor | None,
        occupancy: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = self.layer(h)
        if occupancy is not None:
            a = F.gelu(self.layer_in(h) + self.layer_occ(occupancy))
            y = y + self.layer_out(a)
            if self.own:
                own = _own_term(occupancy, self.n_layers, self.layer_gate(a))
                y = y + F.pad(own, (0, 1))  # end-of-sequence has no occupancy of its own
        return add_layer_bias(y, layer_bias)

    def _x_logits(
        self, h: torch.Tensor, layer: torch.Tensor, occupancy: torch.Tensor | None = None
    ) -> torch.Tensor:
        a = self.x_in(h) + self.x_layer(layer)
        if occupancy is not None:
            a = a + self.x_occ(occupancy)
        return self._x_out(F.gelu(a), occupancy)

    def _x_out(self, a: torch.Tensor, occupancy: torch.Tensor | None) -> torch.Tensor:
        y = self.x_out(a)
        if self.own and occupancy is not None:
            y = y + _own_term(occupancy, self.nx, self.x_gate(a))
        return y

    def _y_logits(
        self,
        h: torch.Tensor,
        layer: torch.Tensor,
        x: torch.Tensor,
        occupancy: torch.Tensor | None = None,
    ) -> torch.Tensor:
        a = self.y_in(h) + self.y_layer(layer) + self.y_x(x)
        if occupancy is not None:
            a = a + self.y_occ(occupancy.to(self.y_occ.weight.dtype))
        return self.y_out(F.gelu(a))

    def _history_occupancy(
        self,
        history: torch.Tensor,
        layer: torch.Tensor,
        x: torch.Tensor,
        energy: torch.Tensor | None = None,
    ) -> Occupancy:
        """Occupancy at every position of ``history`` (B, T) (position j has inputs 1..j) for the
        chosen ``layer`` and ``x`` (B, T): counts from one-hot sums, no (B, T, voxels) tensor.
        ``energy`` (B, T, L): the layer energy features (``TokenScoring._layer_energy``)."""
        h_layer, h_x, h_y = self._split(history)
        regular = history < self.n_voxels
        causal = causal_history(history.shape[1], history.device)[None] & regular[:, None, :]
        dtype = self.x_occ.weight.dtype
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
        if self.rings:  # hits per (layer, ring) so far, as a fraction of the ring's cells
            member = self.ring_member[h_x * self.ny + h_y].to(dtype)  # (B, T, RINGS)
            hits = in_layers[..., None] * member[:, :, None]
            per_layer = self._with_rings(per_layer, hits.cumsum(1), energy)
        return Occupancy(per_layer, rows, column.clamp(max=1))

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

    def _used_occupancy(
        self, used: torch.Tensor, energy: torch.Tensor | None = None
    ) -> tuple[Occupancy, torch.Tensor]:
        """Occupancy of every layer, row and column from a (..., voxels) mask: ``layers``
        (..., L), ``rows`` (..., L, X) and ``column`` (..., L, X, Y) (the mask itself, boolean),
        indexed by the choice; and the hits per row (..., L, X), which sampling masks full rows
        and layers with. The mask is read, never copied whole: at every decode step a float copy
        of it cost more than the three attention blocks of the small preset."""
        dtype = self.x_occ.weight.dtype
        grid = used.unflatten(-1, (self.n_layers, self.nx, self.ny))
        # a sum over a boolean's last axis is 2x slower on a CPU than a byte copy and a matmul
        per_row = (grid.view(torch.uint8).to(dtype) @ self.ones_y.to(dtype))[..., 0]
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

    def _split(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(layer, x, y) of spatial ids; special ids give (0, 0, 0)."""
        v = torch.where(ids < self.n_voxels, ids, torch.zeros_like(ids))
        return v // (self.nx * self.ny), (v // self.ny) % self.nx, v % self.ny

    # the head's operations ---------------------------------------------------------------------

    def log_prob(
        self,
        h: torch.Tensor,
        target: torch.Tensor,
        history: torch.Tensor | None = None,
        layer_bias: torch.Tensor | None = None,
        routing: Routing | None = None,
        energy: torch.Tensor | None = None,
    ) -> torch.Tensor:
        regular = target < self.n_voxels
        layer, x, y = self._split(target)
        occ = None
        if self.occupancy:
            if history is None:
                raise CalofmError("voxel head: an occupancy-aware head needs the history")
            occ = self._history_occupancy(history, layer, x, energy)
        o_layers, o_rows, o_column = (None, None, None) if occ is None else occ
        lp_layer = torch.log_softmax(self._layer_logits(h, layer_bias, o_layers).float(), dim=-1)
        layer_class = torch.where(regular, layer, torch.full_like(layer, self.n_layers))
        out = lp_layer.gather(-1, layer_class[..., None])[..., 0]
        lp_x = torch.log_softmax(self._x_logits(h, layer, o_rows).float(), dim=-1)
        lp_y = torch.log_softmax(self._y_logits(h, layer, x, o_column).float(), dim=-1)
        part = lp_x.gather(-1, x[..., None])[..., 0] + lp_y.gather(-1, y[..., None])[..., 0]
        if history is not None:
            # A voxel is used once: at (layer, x) the y already taken leave the normalisation.
            h_layer, h_x, h_y = self._split(history)
            same_row = (h_layer[:, None, :] == layer[:, :, None]) & (
                h_x[:, None, :] == x[:, :, None]
            )
            match = (
                causal_history(history.shape[1], h.device)[None]
                & (history < self.n_voxels)[:, None, :]
                & same_row
            )
            part = part - excluded_log_norm(lp_y, h_y, match)
        return out + torch.where(regular, part, torch.zeros_like(part))

    def scores(
        self,
        h: torch.Tensor,
        layer_bias: torch.Tensor | None = None,
        routing: Routing | None = None,
        used: torch.Tensor | None = None,
        energy: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log P of every spatial token (SOS and PAD at -inf): logits of the same distribution.

        ``used`` (..., voxels): the voxels each position's shower already has (an
        occupancy-aware head needs it; the y already used are not removed here)."""
        occ_layers = occ_rows = occ_columns = None
        if self.occupancy:
            if used is None:
                raise CalofmError("voxel head: an occupancy-aware head needs the used voxels")
            (occ_layers, occ_rows, occ_columns), _ = self._used_occupancy(used, energy)
        lp_layer = torch.log_softmax(self._layer_logits(h, layer_bias, occ_layers).float(), -1)
        hx = self.x_in(h)[..., None, :] + self.x_layer.weight  # (..., L, d)
        if occ_rows is not None:
            hx = hx + self.x_occ(occ_rows)
        lp_x = torch.log_softmax(self._x_out(F.gelu(hx), occ_rows).float(), dim=-1)  # (..., L, X)
        hy = (
            self.y_in(h)[..., None, None, :]
            + self.y_layer.weight[:, None, :]
            + self.y_x.weight[None, :, :]
        )
        if occ_columns is not None:
            hy = hy + self.y_occ(occ_columns.to(self.y_occ.weight.dtype))
        lp_y = torch.log_softmax(self.y_out(F.gelu(hy)).float(), dim=-1)  # (..., L, X, Y)
        voxels = lp_layer[..., : self.n_layers, None, None] + lp_x[..., None] + lp_y
        return with_special_tokens(voxels.flatten(-3), lp_layer, self.n_layers)

    @torch.no_grad()
    def sample(
        self,
        h: torch.Tensor,
        u: torch.Tensor | None,
        used: torch.Tensor | None,
        temperature: float | torch.Tensor,
        top_k: int | None = None,
        top_p: float | None = None,
        layer_bias: torch.Tensor | None = None,
        routing: Routing | None = None,
        can_end: torch.Tensor | None = None,
        energy: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Layer, then x, then y, each from its conditional (top-k/p and temperature per part).

        Full layers and full rows are masked too, so a shower never runs out of allowed voxels.
        """
        b = h.shape[0]
        rows = torch.arange(b, device=h.device)
        grid = None if used is None else used.view(b, self.n_layers, self.nx, self.ny)
        occ = per_row = None
        if self.occupancy:
            if used is None:
                raise CalofmError("voxel head: an occupancy-aware head needs the used voxels")
            occ, per_row = self._used_occupancy(used.view(b, -1), energy)
        elif grid is not None:
            per_row = grid.sum(-1)
        logits = self._layer_logits(h, layer_bias, None if occ is None else occ.layers).float()
        if can_end is not None:
            logits[:, self.n_layers].masked_fill_(~can_end, float("-inf"))
        if per_row is not None:
            full = per_row.sum(-1) == self.nx * self.ny
            logits[:, : self.n_layers].masked_fill_(full, float("-inf"))
        layer = sample(logits, None if u is None else u[:, 0], temperature, top_k, top_p)
        end = layer == self.n_layers
        layer = layer.clamp(max=self.n_layers - 1)
        logits = self._x_logits(h, layer, None if occ is None else occ.rows[rows, layer]).float()
        if per_row is not None:
            logits.masked_fill_(per_row[rows, layer] == self.ny, float("-inf"))
        x = sample(logits, None if u is None else u[:, 1], temperature, top_k, top_p)
        column = None if occ is None else occ.column[rows, layer, x]
        logits = self._y_logits(h, layer, x, column).float()
        if grid is not None:
            logits.masked_fill_(grid[rows, layer, x], float("-inf"))
        y = sample(logits, None if u is None else u[:, 2], temperature, top_k, top_p)
        voxel = (layer * self.nx + x) * self.ny + y
        return torch.where(end, torch.full_like(voxel, self.eos), voxel)

    def never_end(self) -> None:
        with torch.no_grad():
            self.layer.bias[self.n_layers] = -1e9


def _own_term(occupancy: torch.Tensor, n: int, gate: torch.Tensor) -> torch.Tensor:
    """Each of ``n`` options' own occupancy features (its count, then its per-option features,
    laid out as ``occupancy`` (..., n * (1 + k)) is) weighted by ``gate`` (..., 1 + k): (..., n)."""
    counts, rest = occupancy[..., :n], occupancy[..., n:]
    own = torch.cat([counts[..., None], rest.unflatten(-1, (n, gate.shape[-1] - 1))], dim=-1)
    return (own * gate[..., None, :]).sum(-1)


VoxelHead = FlatVoxelHead | FactorisedVoxelHead | LayeredVoxelHead


def voxel_head(
    kind: str,
    d_model: int,
    tokenizer: TokenizerConfig,
    detector: DetectorConfig,
    layer_of_token: torch.Tensor,
    occupancy: bool = False,
    rings: bool = False,
    centre: bool = False,
    own: bool = False,
    layer_energy: bool = False,
    full_rings: bool = False,
) -> VoxelHead:
    if kind == "flat":
        return FlatVoxelHead(d_model, tokenizer, layer_of_token)
    if kind == "layered":
        return LayeredVoxelHead(d_model, tokenizer, detector)
    return FactorisedVoxelHead(
        d_model, tokenizer, detector, occupancy, rings, centre, own, layer_energy, full_rings
    )
