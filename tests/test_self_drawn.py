"""Training on the model's own energy draws (``TrainConfig.self_drawn_energy``): what is fed,
what it is drawn from, and that a run with it stays reproducible and resumable."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_training import CLASSES, DET, TOKENS, _weights_equal, datasets, model

from calofm.data.batches import collate
from calofm.errors import CalofmError
from calofm.model import CaloFM, preset
from calofm.model.conditions import Conditions
from calofm.training.config import TrainConfig
from calofm.training.steps import self_drawn_energies
from calofm.training.trainer import train


def batch(n: int = 8) -> dict[str, torch.Tensor]:
    train_set, _ = datasets()
    return collate(train_set, np.arange(0, 2 * n, 2))


def test_feeding_the_showers_own_energies_is_teacher_forcing():
    m, b = model().eval(), batch()
    args = (b["spatial"], b["energy"], b["incident"], b["class_id"])
    own = m.loss(*args, fed_energy=b["energy"][:, :-1].clone())
    for a, c in zip(m.loss(*args), own, strict=True):
        assert torch.equal(a, c)


def test_fed_energies_replace_only_hit_energies_by_regular_bins():
    m, b = model(), batch()
    fed = self_drawn_energies(m, b, 0.999, torch.Generator().manual_seed(0))
    own = b["energy"][:, :-1]
    hit = own < TOKENS.n_bins
    hit[:, 0] = False  # the start token
    assert torch.equal(fed[~hit], own[~hit])
    assert (fed[hit] < TOKENS.n_bins).all()
    assert (fed[hit] != own[hit]).float().mean() > 0.5  # drawn, not copied
    # the token fed at position j is the one drawn where position j - 1 predicts it
    again = m.energy_draws(
        b["spatial"], b["energy"], b["incident"], b["class_id"], torch.Generator().manual_seed(0)
    )
    drawn = fed != own
    assert torch.equal(fed[:, 1:][drawn[:, 1:]], again[:, :-1][drawn[:, 1:]])
    # the share is the probability of a hit being drawn
    half = self_drawn_energies(m, b, 0.5, torch.Generator().manual_seed(1))
    changed = (half[hit] != own[hit]).float().mean().item()
    assert 0.2 < changed < 0.6


def test_draws_follow_the_distribution_each_position_predicts():
    """Drawn 4,000 times, the bins at a position come out as often as the forward pass's energy
    distribution over the regular bins says (the position sees the shower's own tokens)."""
    torch.manual_seed(0)
    m = CaloFM(preset("tiny"), TOKENS, DET, CLASSES).eval()
    b = batch(1)
    n = 4000
    s, e = b["spatial"].expand(n, -1), b["energy"].expand(n, -1)
    inc, cid = b["incident"].expand(n), b["class_id"].expand(n)
    draws = m.energy_draws(s, e, inc, cid, torch.Generator().manual_seed(3))
    position = 2
    cond = m._own_totals(Conditions.of(inc[:1]), s[:1], e[:1])
    _, logits = m(s[:1, :-1], e[:1, :-1], cond, cid[:1])
    p = torch.softmax(logits[0, position, : TOKENS.n_bins].double(), dim=-1)
    counts = torch.bincount(draws[:, position], minlength=TOKENS.n_bins).double() / n
    assert (counts - p).abs().max() < 4 * (p.max() / n) ** 0.5 + 1e-3
    assert int(draws.max()) < TOKENS.n_bins


def test_a_run_on_own_draws_differs_from_teacher_forcing_and_resumes_exactly(tmp_path):
    train_set, val_set = datasets()
    config = TrainConfig(
        epochs=2, batch_size=8, lr=3e-3, warmup_steps=4, log_every=3, self_drawn_energy=0.3
    )
    teacher = model()
    rng = torch.get_rng_state()
    forced = TrainConfig(epochs=2, batch_size=8, lr=3e-3, warmup_steps=4, log_every=3)
    train(teacher, train_set, val_set, forced, None, tmp_path / "t", device="cpu", progress=False)
    whole = model()
    train(whole, train_set, val_set, config, None, tmp_path / "a", device="cpu", progress=False)
    assert torch.equal(torch.get_rng_state(), rng)
    assert not _weights_equal(teacher, whole)

    cpu = dict(device="cpu", progress=False)
    stopped = train(
        model(),
        train_set,
        val_set,
        config,
        None,
        tmp_path / "b",
        should_stop=lambda s: s == 7,
        **cpu,
    )
    assert stopped.interrupted
    resumed = model(seed=1)
    train(resumed, train_set, val_set, config, None, tmp_path / "b", resume=True, **cpu)
    assert _weights_equal(whole, resumed)


@pytest.mark.parametrize("share", [-0.1, 1.0, float("nan")])
def test_a_share_outside_zero_to_one_is_refused(share):
    with pytest.raises(CalofmError, match="self_drawn_energy"):
        TrainConfig(max_steps=1, self_drawn_energy=share)
