"""Energy tokens measured from the shower's own visible energy (``ModelConfig.relative_energy``).

With log bins, scaling every cell of a shower by a factor moves each cell's bin by the same number
of bins. A model with shower totals knows the visible energy V before the first hit, so the energy
head and the energy embedding can work in bins counted from V's bin: the network then predicts
"the k-th hottest cell carries this fraction of the shower" and the absolute scale comes from V
exactly, instead of being learned separately at every incident energy (where a model trained
for an hour made the cells of 10 GeV showers too hot and those of 90 GeV showers too cold).

Relative index of absolute bin ``b``: ``b - shift + n_bins``, with ``shift`` V's bin counted from
``REF_THRESHOLDS`` thresholds, clamped to ``[0, n_bins]``; the relative vocabulary has ``2 n_bins``
bins, then SOS, EOS and PAD. Everything outside the model (data, sampling, decoding) stays in
absolute bins.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from calofm.errors import CalofmError
from calofm.tokens import TokenizerConfig

# V's bin is counted from this many thresholds (10 MeV for a 0.1 MeV threshold): with log bins
# from 0.1 to 75 MeV the shift covers visible energies from 10 MeV to 7.5 GeV.
REF_THRESHOLDS = 100.0


class RelativeBins(nn.Module):
    """Maps absolute energy tokens and logits to and from bins counted from the visible energy."""

    def __init__(self, tokenizer: TokenizerConfig):
        super().__init__()
        if tokenizer.scheme != "log":
            raise CalofmError("model: relative_energy needs log energy bins (scheme 'log')")
        self.n_bins = tokenizer.n_bins
        self.log_ratio = math.log(tokenizer.max_mev / tokenizer.threshold_mev) / tokenizer.n_bins
        self.ref_mev = REF_THRESHOLDS * tokenizer.threshold_mev
        absolute = torch.arange(tokenizer.energy_vocab)
        self.register_buffer("absolute", absolute, persistent=False)

    @property
    def vocab(self) -> int:
        """Relative bins, then SOS, EOS and PAD."""
        return 2 * self.n_bins + 3

    def shift(self, visible: torch.Tensor) -> torch.Tensor:
        """(B,) long: the bin of the visible MeV (B,) counted from the reference energy."""
        bins = torch.log(visible.float().clamp(min=self.ref_mev) / self.ref_mev) / self.log_ratio
        return bins.round().long().clamp(max=self.n_bins)

    def tokens(self, energy: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Absolute energy tokens (B, ...) as relative ones; special tokens keep their order."""
        rows = shift.view((-1,) + (1,) * (energy.dim() - 1))
        return energy + self.n_bins - torch.where(energy < self.n_bins, rows, 0)

    def logits(self, relative: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """Logits over the absolute vocabulary (B, ..., energy_vocab) from relative ones."""
        index = self.tokens(self.absolute.expand(len(shift), -1), shift)  # (B, energy_vocab)
        index = index.view((len(shift),) + (1,) * (relative.dim() - 2) + (-1,))
        return relative.gather(-1, index.expand(relative.shape[:-1] + (index.shape[-1],)))
