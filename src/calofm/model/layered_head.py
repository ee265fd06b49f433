"""The layered voxel head: P(layer) P(x, y | layer), a voxel used once excluded within its layer.

The factorised head (``calofm.model.heads``) removes a used voxel only from its (layer, x) row's
y distribution, so its x head has to learn from attention alone that a row's hot cells are
taken; a model trained so sends a quarter of the 20 hottest hits of 90 GeV W showers out of the
central columns while central cells of their layer are still free (Geant4: 1%). Here the
transverse position is one (x, y) draw from a layer's nx * ny cells, and the cells the shower
already has in that layer leave its normalisation exactly, as in the flat head; the layer head
sees the shower's hits per layer (always: a layer is the one choice left without exclusion).
A step costs about twice the factorised head's sub-heads, a thirtieth of the flat head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.model.sampling import sample
from calofm.model.voxel_parts import (
    add_layer_bias,
    causal_history,
    excluded_log_norm,
    with_special_tokens,
)
from calofm.tokens import TokenizerConfig


class LayeredVoxelHead(nn.Module):
    """P(layer | hits per layer) P(x, y | layer); the layer head's last class is end-of-sequence."""

    def __init__(self, d_model: int, tokenizer: TokenizerConfig, detector: DetectorConfig):
        super().__init__()
        d = d_model
        self.n_layers, self.n_cells = detector.n_layers, detector.nx * detector.ny
        self.n_voxels = tokenizer.n_voxels
        self.sos, self.eos, self.pad = (
            tokenizer.spatial_sos,
            tokenizer.spatial_eos,
            tokenizer.spatial_pad,
        )
        self.layer = nn.Linear(d, self.n_layers + 1)
        self.layer_in = nn.Linear(d, d)
        self.layer_occ = nn.Linear(self.n_layers, d)
        self.layer_out = nn.Linear(d, self.n_layers + 1)
        self.cell_in = nn.Linear(d, d)
        self.cell_layer = nn.Embedding(self.n_layers, d)
        self.cell_out = nn.Linear(d, self.n_cells)

    def _layer_logits(
        self, h: torch.Tensor, hits: torch.Tensor, layer_bias: torch.Tensor | None
    ) -> torch.Tensor:
        """``hits`` (..., L): the shower's hits per layer so far."""
        occupancy = self.layer_occ(torch.log1p(hits.to(h.dtype)))
        y = self.layer(h) + self.layer_out(F.gelu(self.layer_in(h) + occupancy))
        return add_layer_bias(y, layer_bias)

    def _cell_logits(self, h: torch.Tensor, layer: torch.Tensor) -> torch.Tensor:
        return self.cell_out(F.gelu(self.cell_in(h) + self.cell_layer(layer)))

    def _split(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(layer, cell) of spatial ids; special ids give (0, 0)."""
        v = torch.where(ids < self.n_voxels, ids, torch.zeros_like(ids))
        return v // self.n_cells, v % self.n_cells

    def _hits_per_layer(self, history: torch.Tensor) -> torch.Tensor:
        """(B, T, L): hits per layer among inputs 1..j at every position j of ``history``."""
        layer, _ = self._split(history)
        regular = (history < self.n_voxels)[..., None]
        return (F.one_hot(layer, self.n_layers) * regular).cumsum(dim=1)

    def log_prob(
        self,
        h: torch.Tensor,
        target: torch.Tensor,
        history: torch.Tensor | None = None,
        layer_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log P(target) per position; with ``history`` the cells the shower already has in the
        target's layer leave that layer's (x, y) distribution. Without it: an empty shower."""
        if history is None:
            hits = torch.zeros(*target.shape, self.n_layers, device=target.device)
        else:
            hits = self._hits_per_layer(history)
        regular = target < self.n_voxels
        layer, cell = self._split(target)
        lp_layer = torch.log_softmax(self._layer_logits(h, hits, layer_bias).float(), dim=-1)
        layer_class = torch.where(regular, layer, torch.full_like(layer, self.n_layers))
        out = lp_layer.gather(-1, layer_class[..., None])[..., 0]
        lp_cell = torch.log_softmax(self._cell_logits(h, layer).float(), dim=-1)
        part = lp_cell.gather(-1, cell[..., None])[..., 0]
        if history is not None:
            h_layer, h_cell = self._split(history)
            match = (
                causal_history(history.shape[1], h.device)[None]
                & (history < self.n_voxels)[:, None, :]
                & (h_layer[:, None, :] == layer[:, :, None])
            )
            part = part - excluded_log_norm(lp_cell, h_cell, match)
        return out + torch.where(regular, part, torch.zeros_like(part))

    def scores(
        self,
        h: torch.Tensor,
        layer_bias: torch.Tensor | None = None,
        used: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log P of every spatial token (SOS and PAD at -inf) given the ``used`` voxels
        (..., voxels; None: an empty shower), the used ones not yet removed."""
        if used is None:
            hits = torch.zeros(*h.shape[:-1], self.n_layers, device=h.device)
        else:
            hits = used.unflatten(-1, (self.n_layers, self.n_cells)).sum(-1)
        lp_layer = torch.log_softmax(self._layer_logits(h, hits, layer_bias).float(), dim=-1)
        hc = self.cell_in(h)[..., None, :] + self.cell_layer.weight  # (..., L, d)
        lp_cell = torch.log_softmax(self.cell_out(F.gelu(hc)).float(), dim=-1)  # (..., L, cells)
        voxels = lp_layer[..., : self.n_layers, None] + lp_cell
        return with_special_tokens(voxels.flatten(-2), lp_layer, self.n_layers)

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
        can_end: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer, then the cell in it (the first two uniforms of ``u``); full layers and
        used cells masked. ``used`` (B, voxels) is required: the layer head reads it."""
        if used is None:
            raise CalofmError("voxel head: the layered head needs the shower's used voxels")
        b = h.shape[0]
        grid = used.view(b, self.n_layers, self.n_cells)
        per_layer = grid.sum(-1)
        logits = self._layer_logits(h, per_layer, layer_bias).float()
        if can_end is not None:
            logits[:, self.n_layers].masked_fill_(~can_end, float("-inf"))
        logits[:, : self.n_layers].masked_fill_(per_layer == self.n_cells, float("-inf"))
        layer = sample(logits, None if u is None else u[:, 0], temperature, top_k, top_p)
        end = layer == self.n_layers
        layer = layer.clamp(max=self.n_layers - 1)
        logits = self._cell_logits(h, layer).float()
        logits.masked_fill_(grid[torch.arange(b, device=h.device), layer], float("-inf"))
        cell = sample(logits, None if u is None else u[:, 1], temperature, top_k, top_p)
        voxel = layer * self.n_cells + cell
        return torch.where(end, torch.full_like(voxel, self.eos), voxel)

    def never_end(self) -> None:
        with torch.no_grad():
            self.layer.bias[self.n_layers] = -1e9
