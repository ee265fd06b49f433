"""What the last block's output gives: next-token logits, the training NLLs and the next tokens
drawn in generation, under the design's constraints (voxels used once, energies that never rise,
one stop decision). ``TokenScoring`` is a mixin of ``CaloFM``: the heads stay the model's own
modules, so their tensor names are the model's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.model.conditions import Conditions
from calofm.model.config import ModelConfig
from calofm.model.experts import Routing, routing_for
from calofm.model.relative_energy import RelativeBins
from calofm.model.sampling import sample
from calofm.tokens import TokenizerConfig


class TokenScoring:
    """``CaloFM``'s output side, on the model's final norm, heads and buffers."""

    config: ModelConfig
    tokenizer: TokenizerConfig
    ln_f: nn.LayerNorm
    spatial_head: nn.Module
    energy_head: nn.Module
    energy_ids: torch.Tensor
    bin_mev: torch.Tensor
    geometry: torch.Tensor
    detector: DetectorConfig
    relative: RelativeBins | None

    def energy_shift(self, cond: Conditions) -> torch.Tensor | None:
        """(B,) the bins of the rows' visible energies with ``relative_energy``, else None."""
        if self.relative is None:
            return None
        if not cond.has_totals:
            raise CalofmError("model: relative energies need the shower totals in the conditions")
        return self.relative.shift(cond.visible)

    def energy_output(self, token: int) -> int:
        """The energy head's output index of the special energy ``token`` (SOS, EOS, PAD)."""
        return token if self.relative is None else token + self.tokenizer.n_bins

    def _energy_logits(
        self,
        h: torch.Tensor,
        routing: Routing,
        previous: torch.Tensor | None,
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Energy logits after the final norm; with ``falling_energy`` no bin above ``previous``,
        with ``single_stop`` never end-of-sequence.

        ``previous`` holds the energy tokens the positions were fed (SOS, PAD: no constraint);
        ``shift`` (B,) the rows' ``energy_shift`` (relative energies: the head's bins are counted
        from it, the logits returned are over absolute bins).
        """
        logits = self.energy_head(h, **routing_for(self.energy_head, routing))
        if self.relative is not None:
            if shift is None:
                raise CalofmError("model: relative energies need each row's energy_shift")
            logits = self.relative.logits(logits, shift)
        ids = self.energy_ids
        if self.config.single_stop:  # the energy of a shower that goes on: EOS is not among them
            logits = logits.masked_fill(ids == self.tokenizer.energy_eos, float("-inf"))
        if self.config.falling_energy and previous is not None:
            above = (ids > previous[..., None]) & (ids < self.tokenizer.n_bins)
            logits = logits.masked_fill(above, float("-inf"))
        return logits

    def totals_of(
        self, spatial: torch.Tensor, energy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hit count (B,) and visible MeV (B,) of token sequences: hits are the regular spatial
        tokens, the visible energy is the sum of their bins' mean energies (as the state's)."""
        n_hits = (spatial < self.tokenizer.n_voxels).sum(1)
        visible = self.bin_mev[energy].sum(1).clamp(min=self.tokenizer.threshold_mev)
        return n_hits, visible

    def layer_mev(self, spatial: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        """(B, t, layers): the energy (MeV) each layer holds after tokens 0..j of ``spatial`` and
        ``energy`` (B, t), per j; what a decoder adds up hit by hit."""
        layer = self.geometry[spatial, 0]  # special tokens: one past the last layer
        n_layers = self.detector.n_layers
        mev = self.bin_mev[energy] * (layer < n_layers)
        one_hot = F.one_hot(layer.clamp(max=n_layers - 1), n_layers).to(mev.dtype)
        return (one_hot * mev[..., None]).cumsum(dim=-2)

    def centre_sums(self, spatial: torch.Tensor, energy: torch.Tensor) -> torch.Tensor:
        """(B, t, 3): the energy (MeV) of tokens 0..j of ``spatial`` and ``energy`` (B, t) and
        its first moments in x and y (cells from the beam axis), per j; what a decoder adds up
        hit by hit (special tokens carry no energy)."""
        mev = self.bin_mev[energy]
        return torch.cat([mev[..., None], self._moments(spatial, energy)], dim=-1).cumsum(dim=1)

    def _centre(self, sums: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The voxel head's ``centre`` argument with ``centre_pull``: the energy-weighted centre
        (..., 2) of the hits so far from their ``centre_sums`` (..., 3), 0 before the first hit;
        empty otherwise."""
        if not self.config.centre_pull:
            return {}
        if sums is None:
            raise CalofmError("model: centre_pull needs the shower's energy and its moments")
        return {"centre": sums[..., 1:] / sums[..., :1].clamp(min=1e-3)}

    def _layer_energy(
        self, layer_mev: torch.Tensor | None, previous_energy: torch.Tensor | None
    ) -> dict[str, torch.Tensor]:
        """The voxel head's ``energy`` argument with ``layer_energy``: log(1 + each layer's energy
        so far over the last hit's) (..., layers); empty otherwise."""
        if not self.config.layer_energy:
            return {}
        if layer_mev is None or previous_energy is None:
            raise CalofmError("model: layer_energy needs each layer's energy and the last energy")
        last = self.bin_mev[previous_energy].clamp(min=self.tokenizer.threshold_mev)
        return {"energy": torch.log1p(layer_mev / last[..., None])}

    def logits(
        self,
        h: torch.Tensor,
        routing: Routing,
        previous_energy: torch.Tensor | None = None,
        used: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        layer_mev: torch.Tensor | None = None,
        centre_sums: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Spatial logits (B, t, Vs) (log-probabilities for a factorised head) and energy logits
        (B, t, Ve) from block outputs ``h``; ``previous_energy`` (B, t) the fed energy tokens;
        ``used`` (B, t, voxels) the voxels each position's shower has (a head that reads them);
        ``layer_mev`` (B, t, layers) its energy per layer (``layer_energy``); ``centre_sums``
        (B, t, 3) its energy and moments (``centre_pull``)."""
        h = self.ln_f(h)
        extra = self._layer_energy(layer_mev, previous_energy) | self._centre(centre_sums)
        extra |= routing_for(self.spatial_head, routing)
        if used is None:
            spatial = self.spatial_head.scores(h, **extra)
        else:
            spatial = self.spatial_head.scores(h, used=used, **extra)
        return spatial, self._energy_logits(h, routing, previous_energy, shift)

    def used_voxels(self, spatial: torch.Tensor) -> torch.Tensor:
        """(B, t, voxels) bool: the voxels among tokens 0..j of ``spatial`` (B, t), per j."""
        n = self.tokenizer.n_voxels
        hits = F.one_hot(spatial.clamp(max=n), n + 1)[..., :n]
        return hits.cumsum(dim=1) > 0

    def _nll(
        self,
        h: torch.Tensor,
        spatial_full: torch.Tensor,
        energy_full: torch.Tensor,
        routing: Routing,
        shift: torch.Tensor | None = None,
        fed_energy: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(spatial NLL, energy NLL) in nats per token of full (B, T+1) sequences, from the last
        block's outputs ``h`` (B, T, d) at their first T tokens (the energies fed there:
        ``fed_energy``, by default the shower's own).

        PAD targets are ignored; with ``single_stop`` the energy stream's EOS targets count zero
        nats (the voxel head predicts the end), so both NLLs stay means over the same target
        tokens and batch means combine exactly (validation, DDP). With ``exclude_used_voxels``
        each position's voxel distribution is renormalised over the voxels the shower does not
        have yet; with ``falling_energy`` the energy distribution over the bins not above the
        previous one: the distributions sampled.
        """
        tok = self.tokenizer
        inputs_s = spatial_full[:, :-1]
        inputs_e = energy_full[:, :-1] if fed_energy is None else fed_energy
        targets_s, targets_e = spatial_full[:, 1:], energy_full[:, 1:]
        h = self.ln_f(h)
        history = inputs_s if self.config.exclude_used_voxels else None
        extra = {}
        if self.config.layer_energy:
            extra = self._layer_energy(self.layer_mev(inputs_s, inputs_e), inputs_e)
        if self.config.centre_pull:
            extra |= self._centre(self.centre_sums(inputs_s, inputs_e))
        extra |= routing_for(self.spatial_head, routing)
        log_p = self.spatial_head.log_prob(h, targets_s, history, **extra)
        real = targets_s != tok.spatial_pad
        nll_s = -torch.where(real, log_p, torch.zeros_like(log_p)).sum() / real.sum().clamp(min=1)
        le = self._energy_logits(h, routing, inputs_e, shift)
        n_targets = (targets_e != tok.energy_pad).sum().clamp(min=1)
        if self.config.single_stop:  # the end is the voxel head's to predict
            targets_e = targets_e.masked_fill(targets_e == tok.energy_eos, tok.energy_pad)
        nll_e = (
            F.cross_entropy(
                le.flatten(0, 1).float(),
                targets_e.flatten(),
                ignore_index=tok.energy_pad,
                reduction="sum",
            )
            / n_targets
        )
        return nll_s, nll_e

    @torch.no_grad()
    def next_tokens(
        self,
        h: torch.Tensor,
        routing: Routing,
        u: torch.Tensor | None,
        used: torch.Tensor | None,
        previous_energy: torch.Tensor,
        temperature: float | torch.Tensor,
        top_k: int | None = None,
        top_p: float | None = None,
        can_end: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
        layer_mev: torch.Tensor | None = None,
        centre_sums: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the next (voxel, energy bin) per row from the last block's output ``h`` (B, d).

        ``u`` (B, 4): the row's uniforms for this step (layer, x, y, energy; a flat head uses the
        first for the voxel); ``used`` (B, n_voxels) the voxels never to draw again (or None);
        ``previous_energy`` (B,) the last energy token fed; ``can_end`` (B,) bool: rows whose
        voxel head may end the shower here (None: all); ``layer_mev`` (B, layers) each row's
        energy per layer so far (``layer_energy``); ``centre_sums`` (B, 3) its energy and moments
        so far (``centre_pull``). SOS and PAD never come out.
        """
        tok = self.tokenizer
        h = self.ln_f(h)
        s = self.spatial_head.sample(
            h,
            None if u is None else u[:, :3],
            used,
            temperature,
            top_k,
            top_p,
            **routing_for(self.spatial_head, routing),
            can_end=can_end,
            **self._layer_energy(layer_mev, previous_energy),
            **self._centre(centre_sums),
        )
        le = self._energy_logits(h, routing, previous_energy, shift).float()
        le[:, tok.energy_sos] = le[:, tok.energy_pad] = float("-inf")  # no index tensors
        e = sample(le, None if u is None else u[:, 3], temperature, top_k, top_p)
        return s, e
