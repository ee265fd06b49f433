"""Relative energies: the energy head and embedding count bins from the shower's visible energy,
so that a shower with more visible energy, otherwise alike, has every cell that many bins higher."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from test_static_decode import totals_model

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.model import CaloFM, ModelConfig, preset
from calofm.model.conditions import Conditions
from calofm.model.relative_energy import RelativeBins
from calofm.tokens import TokenizerConfig

TOK = TokenizerConfig.for_detector(DetectorConfig(), scheme="log", n_bins=64, max_hits=40)


def test_relative_energy_needs_totals_and_log_bins():
    with pytest.raises(CalofmError, match="relative_energy needs totals"):
        ModelConfig(relative_energy=True)
    config = dataclasses.replace(preset("tiny"), relative_energy=True)
    linear = TokenizerConfig.for_detector(DetectorConfig(), n_bins=64)
    with pytest.raises(CalofmError, match="log energy bins"):
        CaloFM(config, linear, DetectorConfig(), ["G4_W:gamma"])


def test_absolute_logits_are_the_relative_ones_read_from_the_visible_energys_bin():
    bins = RelativeBins(TOK)
    n = TOK.n_bins
    relative = torch.randn(3, 5, bins.vocab)
    shift = torch.tensor([0, 17, n])
    absolute = bins.logits(relative, shift)
    assert absolute.shape == (3, 5, TOK.energy_vocab)
    for row, s in enumerate(shift.tolist()):
        for b in range(n):
            assert torch.equal(absolute[row, :, b], relative[row, :, b - s + n])
        for special in range(3):  # SOS, EOS, PAD after the bins, in both vocabularies
            assert torch.equal(absolute[row, :, n + special], relative[row, :, 2 * n + special])
    tokens = torch.tensor([[0, 5, n + 1], [63, 0, n + 2], [10, n, n]])
    want = [[n, n + 5, 2 * n + 1], [63 - 17 + n, n - 17, 2 * n + 2], [10, 2 * n, 2 * n]]
    assert bins.tokens(tokens, shift).tolist() == want


def test_the_shift_is_the_visible_energys_bin_from_the_reference():
    bins = RelativeBins(TOK)
    ratio = math.exp(bins.log_ratio)
    visible = bins.ref_mev * ratio ** torch.tensor([0.0, 1.0, 10.0, 30.0])
    assert bins.shift(visible).tolist() == [0, 1, 10, 30]
    assert bins.shift(torch.tensor([1e-3, 1e9])).tolist() == [0, TOK.n_bins]


def test_more_visible_energy_moves_the_first_cell_by_as_many_bins():
    """With the conditions' context switched off, the only difference between two showers that
    differ in visible energy by k bins is the head's shift: the first hit's energy distribution
    moves by exactly k bins."""
    model = totals_model("log", relative_energy=True)
    with torch.no_grad():
        model.context[-1].weight.zero_()
        model.context[-1].bias.zero_()
    bins = model.relative
    ratio = math.exp(bins.log_ratio)
    k = 9
    visible = bins.ref_mev * ratio ** torch.tensor([20.0, 20.0 + k])
    assert bins.shift(visible).tolist() == [20, 20 + k]
    cond = Conditions(torch.zeros(2), torch.tensor([20, 20]), visible)
    spatial = torch.full((2, 1), model.tokenizer.spatial_sos)
    energy = torch.full((2, 1), model.tokenizer.energy_sos)
    with torch.no_grad():
        _, le = model(spatial, energy, cond, torch.tensor([0, 0]))
    low, high = le[0, 0, : TOK.n_bins], le[1, 0, : TOK.n_bins]
    assert not torch.equal(low[k:], low[:-k])  # the distribution is not flat
    torch.testing.assert_close(high[k:], low[:-k])


def test_a_model_with_relative_energies_trains():
    model = totals_model("log", relative_energy=True).train()
    tok = model.tokenizer
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, tok.n_voxels, (2, 8), generator=g)
    e = torch.randint(0, tok.n_bins, (2, 8), generator=g).sort(1, descending=True).values
    s[:, 0], e[:, 0], s[:, -1], e[:, -1] = (
        tok.spatial_sos,
        tok.energy_sos,
        tok.spatial_eos,
        tok.energy_eos,
    )
    loss = model.loss(s, e, torch.tensor([0.1, -0.5]), torch.tensor([0, 1]))[0]
    loss.backward()
    assert torch.isfinite(loss)
    assert model.energy_head.weight.shape[0] == 2 * tok.n_bins + 3
    assert model.energy_embed.weight.grad.abs().sum() > 0
