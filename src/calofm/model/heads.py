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

What the factorised head's sub-heads see of the shower so far is ``calofm.model.occupancy``'s.

``layer_bias`` (B, layers), where given, is added to every voxel's logit by its layer (flat) or to
the layer logits (factorised): the per-class conditioning adapter moves hits between layers. A
base head acts on every row alike and takes no routing; the adapters' wrappers are row-routed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.model.flat_head import FlatVoxelHead
from calofm.model.layered_head import LayeredVoxelHead
from calofm.model.occupancy import Occupancy, OccupancyFeatures
from calofm.model.sampling import sample
from calofm.model.voxel_parts import (
    add_layer_bias,
    causal_history,
    excluded_log_norm,
    split_voxels,
    with_special_tokens,
)
from calofm.tokens import TokenizerConfig


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
        pull_reach: float | None = None,
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
        if (rings or centre or own or layer_energy or full_rings) and not occupancy:
            raise CalofmError(
                "voxel head: ring, centre and own occupancy, layer energy and full rings need "
                "the occupancy-aware head"
            )
        self.own = own
        if occupancy:
            self.features = OccupancyFeatures(detector, rings, centre, layer_energy, full_rings)
            per_layer, per_row = self.features.per_layer, self.features.per_row
            self.layer_in = nn.Linear(d, d)
            self.layer_occ = nn.Linear(self.n_layers * per_layer, d)
            self.layer_out = nn.Linear(d, self.n_layers + 1)
            self.x_occ = nn.Linear(self.nx * per_row, d)
            self.y_occ = nn.Linear(self.ny, d)
            if own:  # the gates of each layer's and each row's own occupancy features
                self.layer_gate = nn.Linear(d, per_layer)
                self.x_gate = nn.Linear(d, per_row)
        self.pull = pull_reach is not None  # ModelConfig.centre_pull(_reach)
        if pull_reach is not None:  # the gates of the centre's products with the positions
            self.x_pull = nn.Linear(d, 1)
            self.y_pull = nn.Linear(d, 1)
            self.register_buffer("x_pos", _reach(self.nx, pull_reach), persistent=False)
            self.register_buffer("y_pos", _reach(self.ny, pull_reach), persistent=False)

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
        self,
        h: torch.Tensor,
        layer: torch.Tensor,
        occupancy: torch.Tensor | None = None,
        centre: torch.Tensor | None = None,
    ) -> torch.Tensor:
        a = self.x_in(h) + self.x_layer(layer)
        if occupancy is not None:
            a = a + self.x_occ(occupancy)
        return self._x_out(F.gelu(a), occupancy, centre)

    def _x_out(
        self, a: torch.Tensor, occupancy: torch.Tensor | None, centre: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``centre`` (..., 2): the shower's centre, its dimensions broadcasting against ``a``'s."""
        y = self.x_out(a)
        if self.own and occupancy is not None:
            y = y + _own_term(occupancy, self.nx, self.x_gate(a))
        if self.pull:
            y = y + self.x_pull(a) * _centre(centre)[..., :1] * self.x_pos
        return y

    def _y_logits(
        self,
        h: torch.Tensor,
        layer: torch.Tensor,
        x: torch.Tensor,
        occupancy: torch.Tensor | None = None,
        centre: torch.Tensor | None = None,
    ) -> torch.Tensor:
        a = self.y_in(h) + self.y_layer(layer) + self.y_x(x)
        if occupancy is not None:
            a = a + self.y_occ(occupancy.to(self.y_occ.weight.dtype))
        return self._y_out(F.gelu(a), centre)

    def _y_out(self, a: torch.Tensor, centre: torch.Tensor | None) -> torch.Tensor:
        y = self.y_out(a)
        if self.pull:
            y = y + self.y_pull(a) * _centre(centre)[..., 1:] * self.y_pos
        return y

    def _split(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(layer, x, y) of spatial ids; special ids give (0, 0, 0)."""
        return split_voxels(ids, self.n_layers, self.nx, self.ny)

    def _used_occupancy(
        self, used: torch.Tensor, energy: torch.Tensor | None = None
    ) -> tuple[Occupancy, torch.Tensor]:
        return self.features.from_used(used, self.x_occ.weight.dtype, energy)

    # the head's operations ---------------------------------------------------------------------

    def log_prob(
        self,
        h: torch.Tensor,
        target: torch.Tensor,
        history: torch.Tensor | None = None,
        layer_bias: torch.Tensor | None = None,
        energy: torch.Tensor | None = None,
        centre: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``centre`` (B, T, 2): each position's shower centre so far, in cells (``pull``)."""
        regular = target < self.n_voxels
        layer, x, y = self._split(target)
        occ = None
        if self.occupancy:
            if history is None:
                raise CalofmError("voxel head: an occupancy-aware head needs the history")
            occ = self.features.from_history(history, layer, x, self.x_occ.weight.dtype, energy)
        o_layers, o_rows, o_column = (None, None, None) if occ is None else occ
        lp_layer = torch.log_softmax(self._layer_logits(h, layer_bias, o_layers).float(), dim=-1)
        layer_class = torch.where(regular, layer, torch.full_like(layer, self.n_layers))
        out = lp_layer.gather(-1, layer_class[..., None])[..., 0]
        lp_x = torch.log_softmax(self._x_logits(h, layer, o_rows, centre).float(), dim=-1)
        lp_y = torch.log_softmax(self._y_logits(h, layer, x, o_column, centre).float(), dim=-1)
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
        used: torch.Tensor | None = None,
        energy: torch.Tensor | None = None,
        centre: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """log P of every spatial token (SOS and PAD at -inf): logits of the same distribution.

        ``used`` (..., voxels): the voxels each position's shower already has (an
        occupancy-aware head needs it; the y already used are not removed here); ``centre``
        (..., 2) its centre so far (``pull``)."""
        occ_layers = occ_rows = occ_columns = None
        if self.occupancy:
            if used is None:
                raise CalofmError("voxel head: an occupancy-aware head needs the used voxels")
            (occ_layers, occ_rows, occ_columns), _ = self._used_occupancy(used, energy)
        lp_layer = torch.log_softmax(self._layer_logits(h, layer_bias, occ_layers).float(), -1)
        hx = self.x_in(h)[..., None, :] + self.x_layer.weight  # (..., L, d)
        if occ_rows is not None:
            hx = hx + self.x_occ(occ_rows)
        c = None if centre is None else centre[..., None, :]  # over layers
        lp_x = torch.log_softmax(self._x_out(F.gelu(hx), occ_rows, c).float(), -1)  # (..., L, X)
        hy = (
            self.y_in(h)[..., None, None, :]
            + self.y_layer.weight[:, None, :]
            + self.y_x.weight[None, :, :]
        )
        if occ_columns is not None:
            hy = hy + self.y_occ(occ_columns.to(self.y_occ.weight.dtype))
        c = None if centre is None else centre[..., None, None, :]  # over layers and rows
        lp_y = torch.log_softmax(self._y_out(F.gelu(hy), c).float(), dim=-1)  # (..., L, X, Y)
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
        can_end: torch.Tensor | None = None,
        energy: torch.Tensor | None = None,
        centre: torch.Tensor | None = None,
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
        o_rows = None if occ is None else occ.rows[rows, layer]
        logits = self._x_logits(h, layer, o_rows, centre).float()
        if per_row is not None:
            logits.masked_fill_(per_row[rows, layer] == self.ny, float("-inf"))
        x = sample(logits, None if u is None else u[:, 1], temperature, top_k, top_p)
        column = None if occ is None else occ.column[rows, layer, x]
        logits = self._y_logits(h, layer, x, column, centre).float()
        if grid is not None:
            logits.masked_fill_(grid[rows, layer, x], float("-inf"))
        y = sample(logits, None if u is None else u[:, 2], temperature, top_k, top_p)
        voxel = (layer * self.nx + x) * self.ny + y
        return torch.where(end, torch.full_like(voxel, self.eos), voxel)

    def never_end(self) -> None:
        with torch.no_grad():
            self.layer.bias[self.n_layers] = -1e9


def _reach(n: int, reach: float) -> torch.Tensor:
    """(n,) positions of ``n`` rows (columns) from the beam axis in cells, clipped at ``reach``
    (``ModelConfig.centre_pull_reach``)."""
    return (torch.arange(n) - (n - 1) / 2).clamp(-reach, reach)


def _centre(centre: torch.Tensor | None) -> torch.Tensor:
    if centre is None:
        raise CalofmError("voxel head: a head with the centre pull needs the shower's centre")
    return centre


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
    pull_reach: float | None = None,
) -> VoxelHead:
    if kind == "flat":
        return FlatVoxelHead(d_model, tokenizer, layer_of_token)
    if kind == "layered":
        return LayeredVoxelHead(d_model, tokenizer, detector)
    return FactorisedVoxelHead(
        d_model,
        tokenizer,
        detector,
        occupancy,
        rings,
        centre,
        own,
        layer_energy,
        full_rings,
        pull_reach,
    )
