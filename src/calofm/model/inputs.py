"""What the blocks read: the embedded token streams, the conditions token, and the context added
to every position (conditions, shower totals, the shower's state so far).

Each spatial token also carries its voxel's (layer, x, y) through three learned embeddings, so the
model knows a voxel's depth and transverse position even for voxels it has rarely seen; the
special tokens use an extra index of each table. ``StreamInputs`` is a mixin of ``CaloFM``: the
embeddings stay the model's own modules, so their tensor names are the model's.
"""

from __future__ import annotations

import torch
from torch import nn

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.model.conditions import LOG_HITS_SCALE, LOG_MEV_SCALE, Conditions
from calofm.model.config import ModelConfig
from calofm.model.experts import Routing
from calofm.model.relative_energy import RelativeBins
from calofm.tokens import TokenizerConfig


def geometry_table(detector: DetectorConfig, tokenizer: TokenizerConfig) -> torch.Tensor:
    """(spatial_vocab, 3) of (layer, x, y) per spatial id; special ids get (L, nx, ny)."""
    det = detector
    layer, x, y = det.voxel_to_lxy(torch.arange(det.n_voxels).numpy())
    table = torch.tensor([det.n_layers, det.nx, det.ny]).repeat(tokenizer.spatial_vocab, 1)
    table[: det.n_voxels] = torch.stack(
        [torch.from_numpy(layer), torch.from_numpy(x), torch.from_numpy(y)], dim=1
    )
    return table


class StreamInputs:
    """``CaloFM``'s input side, on the model's embeddings, buffers and decode state."""

    config: ModelConfig
    tokenizer: TokenizerConfig
    detector: DetectorConfig
    spatial_embed: nn.Embedding
    energy_embed: nn.Embedding
    incident_embed: nn.Linear
    layer_embed: nn.Embedding
    x_embed: nn.Embedding
    y_embed: nn.Embedding
    geometry: torch.Tensor
    bin_mev: torch.Tensor
    context: nn.Module | None
    deposited: torch.Tensor | None
    moments: torch.Tensor | None
    embed_adapters: nn.Module | None
    relative: RelativeBins | None

    def _token_embeddings(
        self, spatial: torch.Tensor, energy: torch.Tensor, shift: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The two streams' token embeddings, each voxel's with its layer's, x's and y's; with
        ``shift`` (relative energies) the energy tokens are counted from it."""
        g = self.geometry[spatial]
        xs = (
            self.spatial_embed(spatial)
            + self.layer_embed(g[..., 0])
            + self.x_embed(g[..., 1])
            + self.y_embed(g[..., 2])
        )
        if shift is not None:
            energy = self.relative.tokens(energy, shift)
        return xs, self.energy_embed(energy)

    def _context(
        self,
        cond: Conditions,
        spatial: torch.Tensor,
        energy: torch.Tensor,
        start: int | None,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """(B, t, d) added to every position: the conditions and/or the shower's state so far.

        The state at token k (SOS is token 0) is that of hits 1..k: their count and the energy
        their bins decode to on average, summed from the tokens (with ``transverse_state``, also
        that energy's first moments in x and y). On cached passes (``start`` not None)
        ``self.deposited`` and ``self.moments`` carry the sums from one decode step to the next.
        """
        if self.context is None:
            return None
        b, t = energy.shape
        parts = []
        if self.config.condition_every_position:
            parts.append(cond.features(dtype)[:, None, :].expand(b, t, -1))
        if self.config.totals:
            if not cond.has_totals:
                raise CalofmError("model: a model with shower totals needs them in the conditions")
            parts.append(cond.totals_features(dtype)[:, None, :].expand(b, t, -1))
        if self.config.shower_state:
            deposited = self.bin_mev[energy].cumsum(dim=1)
            if start is not None:
                if self.deposited is None:
                    raise CalofmError("model: call setup_cache before decoding with a cache")
                if start > 0:
                    deposited = deposited + self.deposited[:, None]
                self.deposited.copy_(deposited[:, -1])
            first = start or 0
            hits = torch.arange(first, first + t, device=energy.device, dtype=dtype).expand(b, t)
            parts.append(self._state(deposited.to(dtype), hits, cond, dtype))
            if self.config.transverse_state:
                moments = self._moments(spatial, energy).cumsum(dim=1)
                if start is not None:
                    if start > 0:
                        moments = moments + self.moments[:, None]
                    self.moments.copy_(moments[:, -1])
                parts.append(_lean(moments, deposited).to(dtype))
        return self.context(torch.cat(parts, dim=-1))

    def _moments(self, spatial: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        """(..., 2) each hit's energy times its cell's x and y from the beam axis, in cells
        (special tokens carry no energy)."""
        x, y = self.geometry[spatial][..., 1:].float().unbind(-1)
        det = self.detector
        offsets = torch.stack([x - (det.nx - 1) / 2, y - (det.ny - 1) / 2], dim=-1)
        return self.bin_mev[energy][..., None] * offsets

    def _state(
        self, deposited: torch.Tensor, hits: torch.Tensor, cond: Conditions, dtype: torch.dtype
    ) -> torch.Tensor:
        """(..., n_state) features of the shower so far from its deposited MeV and hit count,
        (B, t) on full passes or (B,) in the decode step."""
        state = [torch.log1p(deposited) / LOG_MEV_SCALE, torch.log1p(hits) / LOG_HITS_SCALE]
        if self.config.totals:  # what is left to deposit, as fractions of the totals
            rows = (slice(None),) + (None,) * (deposited.dim() - 1)
            visible = cond.visible.to(dtype)[rows].clamp(min=1e-3)
            n_hits = cond.n_hits.to(dtype)[rows].clamp(min=1)
            state.append(1 - deposited / visible)
            state.append(1 - hits / n_hits)
            if self.config.energy_left_per_hit:  # in units of the hit threshold, log-scaled
                floor = self.tokenizer.threshold_mev
                per_hit = (visible - deposited).clamp(min=floor) / (n_hits - hits).clamp(min=1)
                state.append(torch.log(per_hit / floor).clamp(min=0) / LOG_MEV_SCALE)
        return torch.stack(state, dim=-1)

    def _embed(
        self,
        spatial: torch.Tensor,
        energy: torch.Tensor,
        cond: Conditions,
        routing: Routing,
        start: int | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The embedded streams, the conditions token prepended on a sequence's first pass."""
        xs, xe = self._token_embeddings(spatial, energy, self.energy_shift(cond))
        context = self._context(cond, spatial, energy, start, xs.dtype)
        if context is not None:
            xs, xe = xs + context, xe + context
        xi = None
        if not start:
            xi = self.incident_embed(cond.incident.to(xs.dtype)[:, None])[:, None, :]
        if self.embed_adapters is not None:
            xs, xe, xi = self.embed_adapters(xs, xe, xi, spatial, routing)
        if xi is not None:
            xs, xe = torch.cat([xi, xs], dim=1), torch.cat([xi, xe], dim=1)
        return xs, xe

    def _step_context(
        self,
        cond: Conditions,
        spatial: torch.Tensor,
        energy: torch.Tensor,
        pos: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """``_context`` for one token per row (B,) at per-row positions ``pos`` (B,): the same
        features, from tensors only (the decode step is captured or compiled once).

        The token at hidden position p >= 1 is token p - 1 of its stream, so the shower has p - 1
        hits before it; ``self.deposited`` restarts at a row's first token (p <= 1).
        """
        if self.context is None:
            return None
        parts = []
        if self.config.condition_every_position:
            parts.append(cond.features(dtype))
        if self.config.totals:
            parts.append(cond.totals_features(dtype))
        if self.config.shower_state:
            assert self.deposited is not None, "call setup_cache before decoding with a cache"
            fresh = pos <= 1
            deposited = torch.where(fresh, 0.0, self.deposited) + self.bin_mev[energy]
            self.deposited.copy_(deposited)
            hits = (pos - 1).clamp(min=0).to(dtype)
            parts.append(self._state(deposited.to(dtype), hits, cond, dtype))
            if self.config.transverse_state:
                assert self.moments is not None, "call setup_cache before decoding with a cache"
                moments = torch.where(fresh[:, None], 0.0, self.moments) + self._moments(
                    spatial, energy
                )
                self.moments.copy_(moments)
                parts.append(_lean(moments, deposited).to(dtype))
        return self.context(torch.cat(parts, dim=-1))[:, None, :]

    def _step_embed(
        self,
        spatial: torch.Tensor,
        energy: torch.Tensor,
        pos: torch.Tensor,
        cond: Conditions,
        routing: Routing,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_embed`` for one input per row (B, 1, d) at hidden positions ``pos`` (B,): the
        conditions token where ``pos`` is 0, else the tokens ``spatial``, ``energy`` (B,)."""
        s, e = spatial[:, None], energy[:, None]
        xs, xe = self._token_embeddings(s, e, self.energy_shift(cond))
        context = self._step_context(cond, spatial, energy, pos, xs.dtype)
        if context is not None:
            xs, xe = xs + context, xe + context
        xi = self.incident_embed(cond.incident.to(xs.dtype)[:, None])[:, None, :]
        if self.embed_adapters is not None:
            xs, xe, xi = self.embed_adapters(xs, xe, xi, s, routing)
        first = (pos == 0)[:, None, None]
        return torch.where(first, xi, xs), torch.where(first, xi, xe)


# The lean of a shower in tenths of a cell: a shower's centre wanders by a few tenths.
LEAN_SCALE = 10.0


def _lean(moments: torch.Tensor, deposited: torch.Tensor) -> torch.Tensor:
    """The energy-weighted transverse centre so far (..., 2), in tenths of a cell from the beam
    axis; 0 before the first hit."""
    return LEAN_SCALE * moments / deposited.clamp(min=1e-3)[..., None]
