"""Shower totals: the density is a proper Gaussian mixture, its samples follow it, fitting changes
only the classes being trained, and generated showers have exactly the drawn totals."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, MixtureSameFamily, MultivariateNormal

from calofm.data.batches import TokenDataset
from calofm.detector import DetectorConfig
from calofm.generation.engine import ROWS, TOTALS, generate, seeded_rng
from calofm.model.conditions import Conditions
from calofm.model.config import preset
from calofm.model.totals import ShowerTotals, from_point, match_visible, to_point
from calofm.model.transformer import CaloFM
from calofm.tokens import Tokenizer, TokenizerConfig
from calofm.training.totals import dataset_totals, fit_totals

CLASSES = ["G4_W:gamma", "G4_Ta:gamma"]


def totals_model(classes: list[str] = CLASSES) -> CaloFM:
    torch.manual_seed(0)
    det = DetectorConfig()
    tok = TokenizerConfig.for_detector(det, scheme="log", n_bins=64, max_hits=60)
    return CaloFM(dataclasses.replace(preset("tiny"), totals=True), tok, det, classes).eval()


def random_mixture_input(b: int = 5) -> tuple[ShowerTotals, torch.Tensor, object]:
    torch.manual_seed(3)
    totals = ShowerTotals(2, Conditions.N_FEATURES, hidden=16, components=3)
    features = torch.randn(b, Conditions.N_FEATURES)
    model = totals_model()
    return totals, features, model.routing(torch.arange(b) % 2)


def test_totals_density_is_the_gaussian_mixture_it_describes():
    totals, features, routing = random_mixture_input()
    log_w, mean, tril = totals.mixture(features, routing)
    reference = MixtureSameFamily(
        Categorical(logits=log_w), MultivariateNormal(mean, scale_tril=tril)
    )
    z = torch.randn(5, 2)
    torch.testing.assert_close(totals.log_prob(features, routing, z), reference.log_prob(z))


@torch.no_grad()
def test_totals_samples_have_the_mixture_mean_and_covariance():
    totals, features, _ = random_mixture_input(1)
    n = 40000
    model = totals_model()
    u = torch.from_numpy(np.random.default_rng(0).random((n, 3)))
    z = totals.sample(features.expand(n, -1), model.routing(torch.zeros(n, dtype=torch.long)), u)
    log_w, mean, tril = (
        t[0] for t in totals.mixture(features, model.routing(torch.zeros(1, dtype=torch.long)))
    )
    w = log_w.exp()
    mu = (w[:, None] * mean).sum(0)
    second = (w[:, None, None] * (tril @ tril.mT + mean[:, :, None] * mean[:, None, :])).sum(0)
    cov = second - mu[:, None] * mu[None, :]
    sd = cov.diagonal().sqrt()
    assert torch.all((z.mean(0) - mu).abs() < 4 * sd / n**0.5)
    torch.testing.assert_close(torch.cov(z.T), cov, rtol=0.05, atol=0.05 * sd.max().item() ** 2)


def test_a_count_made_continuous_comes_back_as_the_same_count():
    n = torch.tensor([1, 7, 250, 1199])
    visible = torch.tensor([0.5, 10.0, 900.0, 2000.0])
    z = to_point(n, visible, torch.tensor([0.0, 0.3, 0.6, 0.999]))
    got_n, got_v = from_point(z, max_hits=1200)
    assert torch.equal(got_n, n)
    torch.testing.assert_close(got_v, visible)
    assert from_point(torch.tensor([[20.0, 1.0]]), max_hits=50)[0].item() == 51  # cut, truncated


def synthetic_dataset(model: CaloFM, n: int = 400) -> TokenDataset:
    """Showers whose hit count and energy grow with the incident energy, of both classes."""
    rng = np.random.default_rng(0)
    det, tok = model.detector, Tokenizer(model.tokenizer)
    sources = []
    for c, name in enumerate(model.classes):
        incident = rng.uniform(10, 100, n).astype(np.float32)
        counts = (5 + incident / 4 * (1 + c)).astype(np.int64)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        voxels = np.concatenate(
            [rng.choice(det.n_voxels, k, replace=False) for k in counts]
        ).astype(np.int32)
        energies = rng.uniform(0.5, 20, offsets[-1]).astype(np.float32)
        from calofm.data.showers import SparseShowers

        sources.append((name, SparseShowers(offsets, voxels, energies, incident, det)))
    return TokenDataset(sources, tok, model.classes)


def test_fitting_totals_changes_only_the_classes_it_fits_and_learns_their_counts():
    model = totals_model()
    data = synthetic_dataset(model)
    before = [{k: v.clone() for k, v in net.state_dict().items()} for net in model.totals.nets]
    fit_totals(model, data, [1], steps=250, batch_size=64, lr=1e-2)
    after = [net.state_dict() for net in model.totals.nets]
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert not all(torch.equal(before[1][k], after[1][k]) for k in before[1])
    # The fitted class draws hit counts like its data at low and high incident energies.
    n_hits, _ = dataset_totals(model, data)
    tok = Tokenizer(model.tokenizer)
    for lo, hi in ((10, 40), (70, 100)):
        rows = np.flatnonzero(
            (data.class_id == 1)
            & (data.incident >= tok.scale_incident(lo))
            & (data.incident < tok.scale_incident(hi))
        )
        features = Conditions(torch.from_numpy(data.incident[rows])).features(torch.float32)
        u = torch.from_numpy(np.random.default_rng(1).random((len(rows), 3)))
        drawn, _ = from_point(
            model.totals.sample(
                features, model.routing(torch.ones(len(rows), dtype=torch.long)), u
            ),
            model.tokenizer.max_hits,
        )
        assert abs(drawn.float().mean().item() - n_hits[rows].mean()) < 0.15 * n_hits[rows].mean()


def test_generated_showers_have_exactly_the_drawn_hit_count_and_visible_energy_above_threshold():
    model = totals_model()
    incident = np.array([10, 30, 50, 70, 90, 20], dtype=np.float32)
    classes = ["G4_W:gamma", "G4_Ta:gamma"] * 3
    showers, stats = generate(model, classes, incident, seed=4, batch_size=4)
    tok = Tokenizer(model.tokenizer)
    for r, name in enumerate(classes):
        u = torch.from_numpy(seeded_rng(4, TOTALS, r).random((1, 3)))
        cid = torch.tensor([model.class_index(name)])
        features = Conditions(torch.from_numpy(tok.scale_incident(incident[r : r + 1]))).features(
            torch.float32
        )
        n, visible = from_point(model.totals.sample(features, model.routing(cid), u), 60)
        s = showers[name]
        i = r // 2
        assert s.n_hits[i] == n.item()
        got = s.energies[s.offsets[i] : s.offsets[i + 1]].sum(dtype=np.float64)
        # n hits above the 0.1 MeV threshold hold more than n x 0.1 MeV: a random model's draw
        # below that is met as closely as the hits allow
        floor = 0.1 * n.item()
        assert got == pytest.approx(visible.item(), rel=1e-5) if visible > floor else floor < got
    # every drawn hit is a hit an analysis sees: none was scaled under the threshold
    assert (np.concatenate([s.energies for s in showers.values()]) > 0.1).all()
    assert stats["n_duplicates"] == 0 and stats["n_truncated"] == 0
    assert ROWS != TOTALS


def test_a_new_class_gets_its_own_totals_network_and_the_old_ones_stay():
    model = totals_model()
    old = [p.clone() for p in model.totals.parameters()]
    params = model.add_class("G4_Pb:gamma", init_from="G4_W:gamma")
    assert len(model.totals.nets) == 3
    new_ids = {id(p) for p in model.totals.nets[2].parameters()}
    assert new_ids <= {id(p) for p in params}
    for a, b in zip(
        old, [p for net in model.totals.nets[:2] for p in net.parameters()], strict=True
    ):
        assert torch.equal(a, b)


def test_matching_the_visible_energy_keeps_every_cell_above_threshold_and_their_order():
    cells = np.array([0.12, 0.15, 0.4, 3.0, 40.0], dtype=np.float32)
    for target in (10.0, 43.67, 120.0):
        moved = match_visible(cells, target, 0.1)
        assert moved.sum(dtype=np.float64) == pytest.approx(target, rel=1e-6)
        assert (moved > 0.1).all() and (np.argsort(moved) == np.argsort(cells)).all()
    # a plain rescaling to 10 MeV would have taken the three coolest cells under the threshold
    assert ((cells * 10.0 / cells.sum()) <= 0.1).sum() == 3
    # a visible energy no set of five hits can have: they all sit just above the threshold
    assert (match_visible(cells, 0.3, 0.1) > 0.1).all()
