"""Sampling and batched generation: distributions, special tokens, stopping, seeds, overfitting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_toy_showers
from test_model import tiny_model

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.generation.engine import generate
from calofm.generation.sampler import SamplingConfig, sample
from calofm.model import CaloFM, ModelConfig
from calofm.tokens import Tokenizer, TokenizerConfig


def frequencies(logits: list[float], temperature=1.0, top_k=None, top_p=None, n=40000, seed=0):
    x = torch.tensor(logits).repeat(n, 1)
    u = torch.from_numpy(np.random.default_rng(seed).random(n))
    drawn = sample(x, u, temperature, top_k, top_p)
    return np.bincount(drawn.numpy(), minlength=len(logits)) / n


# ---- sampler ------------------------------------------------------------------------------------


def test_sampling_follows_the_softmax_at_any_temperature():
    logits = [1.0, 0.0, 2.0, -1.0, 0.5]
    for t in (1.0, 0.5, 2.0):
        want = torch.softmax(torch.tensor(logits) / t, 0).numpy()
        np.testing.assert_allclose(frequencies(logits, t), want, atol=0.01)


def test_masked_tokens_are_never_drawn_even_at_the_edges_of_the_uniform():
    x = torch.tensor([[float("-inf"), 1.0, float("-inf"), 0.0, float("-inf")]]).repeat(3, 1)
    u = torch.tensor([0.0, 0.5, 1 - 1e-16], dtype=torch.float64)
    assert set(sample(x, u, 1.0).tolist()) <= {1, 3}


def test_top_k_and_top_p_keep_only_the_likeliest_tokens():
    logits = [3.0, 0.0, 2.0, 1.0, -1.0]
    f = frequencies(logits, top_k=2)
    assert f[[1, 3, 4]].sum() == 0
    np.testing.assert_allclose(f[0] / f[2], np.e, rtol=0.05)
    p = torch.softmax(torch.tensor(logits), 0).numpy()  # 0.64, 0.03, 0.24, 0.09, 0.01
    f = frequencies(logits, top_p=0.9)
    assert f[[1, 4]].sum() == 0 and f[3] > 0
    np.testing.assert_allclose(f[[0, 2, 3]], p[[0, 2, 3]] / p[[0, 2, 3]].sum(), atol=0.01)
    assert frequencies(logits, top_p=1e-6)[0] == 1.0


def test_greedy_is_argmax_and_dynamic_temperature_is_linear():
    x = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 4.9]])
    assert sample(x, None, 0.0).tolist() == [1, 0]
    cfg = SamplingConfig(dynamic_temperature=(0.95, 1.05))
    assert cfg.temperature_at(0, 100) == pytest.approx(0.95)
    assert cfg.temperature_at(50, 100) == pytest.approx(1.0)
    assert cfg.temperature_at(100, 100) == pytest.approx(1.05)
    assert not cfg.greedy and SamplingConfig(temperature=0).greedy


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -1},
        {"top_k": 0},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"dynamic_temperature": (0, 1)},
    ],
)
def test_bad_sampling_settings_are_rejected(kwargs):
    with pytest.raises(CalofmError):
        SamplingConfig(**kwargs)


# ---- engine -------------------------------------------------------------------------------------


def biased_model(spatial: dict | None = None, energy: dict | None = None) -> CaloFM:
    """A tiny flat-head model whose head biases push tokens up or down; keys: an id or 'sos',
    'eos', 'pad'. The paper's design: duplicates are possible and merged."""
    model = tiny_model(paper_design=True)
    tok = model.tokenizer
    with torch.no_grad():
        for head, bias, prefix in (
            (model.spatial_head, spatial or {}, "spatial"),
            (model.energy_head, energy or {}, "energy"),
        ):
            for key, value in bias.items():
                head.bias[getattr(tok, f"{prefix}_{key}") if isinstance(key, str) else key] = value
    return model


def test_special_tokens_never_come_out_as_hits():
    model = biased_model({"sos": 50.0, "pad": 50.0}, {"sos": 50.0, "pad": 50.0})
    out, stats = generate(model, "G4_W:gamma", np.full(4, 50.0), seed=0, max_hits=20)
    showers = out["G4_W:gamma"]
    assert stats["n_hits"] > 0
    assert showers.voxels.max() < model.tokenizer.n_voxels


@pytest.mark.parametrize("head", ["spatial", "energy"])
def test_end_of_sequence_from_either_head_ends_the_shower(head):
    model = biased_model(**{head: {"eos": 50.0}})
    out, stats = generate(model, "G4_W:gamma", np.full(3, 50.0), seed=0, max_hits=20)
    assert out["G4_W:gamma"].n_hits.tolist() == [0, 0, 0]
    assert stats["steps"] < 20 and stats["n_truncated"] == 0  # stopped long before max_hits


def test_showers_reaching_max_hits_are_kept_and_counted():
    model = biased_model({"eos": -50.0}, {"eos": -50.0})
    out, stats = generate(model, "G4_W:gamma", np.full(3, 50.0), seed=0, max_hits=12)
    assert stats["n_truncated"] == 3 and stats["n_hits"] == 36
    assert stats["n_duplicates"] == 36 - out["G4_W:gamma"].n_hits.sum()


def test_duplicate_voxels_are_merged_with_summed_energy():
    # Every hit lands in voxel 77 with an energy inside bin 30: a merged voxel holds ten hits'
    # energies, so its energy lies between ten times the bin's lower and upper edges (keeping
    # one hit, or summing nine, gives less than ten times the lower edge).
    model = biased_model({"eos": -50.0, 77: 60.0}, {"eos": -50.0, 30: 60.0})
    out, stats = generate(model, "G4_W:gamma", np.full(2, 50.0), seed=0, max_hits=10)
    showers = out["G4_W:gamma"]
    assert showers.n_hits.tolist() == [1, 1] and set(showers.voxels.tolist()) == {77}
    assert stats["n_duplicates"] == 18 and stats["duplicate_rate"] == pytest.approx(0.9)
    edges = Tokenizer(model.tokenizer).edges
    lo, hi = edges[30], edges[31]
    assert 9 * hi < 10 * lo  # the window tells ten hits from nine
    assert np.all((showers.energies >= 10 * lo - 1e-3) & (showers.energies <= 10 * hi + 1e-3))


def test_same_seed_same_showers_whatever_the_batch_size_or_split():
    model = tiny_model()
    energies = np.linspace(10, 100, 7)
    a = generate(model, "G4_Pb:gamma", energies, seed=5, batch_size=7, max_hits=25)[0]
    b = generate(model, "G4_Pb:gamma", energies, seed=5, batch_size=3, max_hits=25)[0]
    c1 = generate(model, "G4_Pb:gamma", energies[:4], seed=5, batch_size=2, max_hits=25)[0]
    c2 = generate(model, "G4_Pb:gamma", energies[4:], seed=5, max_hits=25, first_row=4)[0]
    other = generate(model, "G4_Pb:gamma", energies, seed=6, batch_size=7, max_hits=25)[0]
    key = "G4_Pb:gamma"
    for x in (b[key], c1[key], c2[key]):
        n = len(x)
        rows = slice(0, n) if x is not c2[key] else slice(4, 7)
        ref = a[key].select(rows)
        np.testing.assert_array_equal(x.offsets, ref.offsets)
        np.testing.assert_array_equal(x.voxels, ref.voxels)
        np.testing.assert_array_equal(x.energies, ref.energies)
    assert not np.array_equal(other[key].voxels, a[key].voxels)


def test_generate_leaves_the_callers_model_in_its_mode_and_on_its_device():
    model = tiny_model().train()
    first = generate(model, "G4_Pb:gamma", np.full(3, 50.0), seed=1, max_hits=12)[0]
    assert model.training
    again = generate(model, "G4_Pb:gamma", np.full(3, 50.0), seed=1, max_hits=12, device="cpu")
    assert model.training and model.energy_head.weight.device.type == "cpu"
    np.testing.assert_array_equal(first["G4_Pb:gamma"].voxels, again[0]["G4_Pb:gamma"].voxels)


def test_rows_of_different_classes_come_back_per_class():
    model = tiny_model()
    classes = ["G4_W:gamma", "G4_Pb:gamma", "G4_W:gamma", "G4_W:e-"]
    out, stats = generate(model, classes, np.array([10, 20, 30, 40.0]), seed=0, max_hits=10)
    assert {k: len(v) for k, v in out.items()} == {"G4_W:gamma": 2, "G4_Pb:gamma": 1, "G4_W:e-": 1}
    assert out["G4_W:gamma"].incident.tolist() == [10, 30]
    assert out["G4_Pb:gamma"].material == "G4_Pb" and out["G4_W:e-"].particle == "e-"
    assert stats["n_showers"] == 4


def test_bad_requests_raise_clear_errors():
    model = tiny_model()
    with pytest.raises(CalofmError, match="G4_W:gamma, G4_Pb:gamma, G4_W:e-"):
        generate(model, "G4_Ta:gamma", np.array([10.0]), seed=0)
    for kwargs in ({"batch_size": 0}, {"max_hits": 0}, {"top_k": 0}):
        with pytest.raises(CalofmError):
            generate(model, "G4_W:gamma", np.array([10.0]), seed=0, **kwargs)
    for energies in (np.array([]), np.array([-5.0]), np.array([np.nan])):
        with pytest.raises(CalofmError):
            generate(model, "G4_W:gamma", energies, seed=0)
    with pytest.raises(CalofmError, match="class names"):
        generate(model, ["G4_W:gamma"], np.array([10.0, 20.0]), seed=0)


@pytest.mark.slow
def test_a_model_that_overfits_a_few_showers_reproduces_their_statistics():
    det = DetectorConfig(absorber_mm=[2.1] * 10, nx=8, ny=8)
    showers = make_toy_showers(8, seed=0, detector=det, energy_range=(10, 30))
    tok = TokenizerConfig.for_detector(
        det, scheme="log", n_bins=32, max_mev=20.0, max_hits=80, incident_max_gev=30.0
    )
    enc = Tokenizer(tok).encode(showers)
    t = int(enc.lengths.max()) + 2
    spatial = torch.full((len(enc), t), tok.spatial_pad)
    energy = torch.full((len(enc), t), tok.energy_pad)
    for i, (a, b) in enumerate(zip(enc.offsets[:-1], enc.offsets[1:], strict=True)):
        n = b - a
        spatial[i, : n + 2] = torch.tensor([tok.spatial_sos, *enc.spatial[a:b], tok.spatial_eos])
        energy[i, : n + 2] = torch.tensor([tok.energy_sos, *enc.energy[a:b], tok.energy_eos])
    incident = torch.from_numpy(enc.incident)
    class_id = torch.zeros(len(enc), dtype=torch.long)

    torch.manual_seed(0)
    model = CaloFM(ModelConfig(d_model=64, n_heads=4, n_blocks=2), tok, det, ["G4_W:gamma"])
    steps = 300
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    for _ in range(steps):
        loss = model.loss(spatial, energy, incident, class_id)[0]
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    assert loss.item() < 0.05

    repeats = 8
    out, stats = generate(
        model.eval(), "G4_W:gamma", np.repeat(showers.incident, repeats), seed=0, batch_size=64
    )
    gen = out["G4_W:gamma"]
    ref = showers.threshold(tok.threshold_mev)

    def energy_sum(s):
        return np.array([s.shower(i)[1].sum() for i in range(len(s))])

    for name, r, g in (
        ("hits", ref.n_hits, gen.n_hits),
        ("energy sum", energy_sum(ref), energy_sum(gen)),
    ):
        per_shower = g.reshape(len(ref), repeats).mean(axis=1)
        assert abs(g.mean() / r.mean() - 1) < 0.1, name
        assert np.corrcoef(per_shower, r)[0, 1] > 0.9, name
    assert stats["n_truncated"] <= 2


def test_unique_voxels_never_repeats_a_voxel_within_a_shower():
    model = tiny_model(paper_design=True)
    with torch.no_grad():  # make a few voxels far likelier than the rest, so repeats are common
        model.spatial_head.bias[:5] += 8.0
    cls = model.classes[0]
    energies = np.full(4, 50.0, np.float32)
    _, stats_free = generate(model, cls, energies, seed=3, max_hits=300)
    uniq, stats = generate(model, cls, energies, seed=3, max_hits=300, unique_voxels=True)
    assert stats_free["n_duplicates"] > 0
    assert stats["n_duplicates"] == 0
    assert stats["n_hits"] == sum(len(uniq[cls].shower(i)[0]) for i in range(4))


def test_dynamic_temperature_changes_at_every_decoding_step():
    """Constant logits (zeroed head weights): end-of-sequence has logit 20, every voxel 0, so
    P(EOS at step k) = 1 / (1 + (27000 - k) exp(-20 / T_k)) with unique voxels. Cooling from 8 to
    0.5 over 40 steps ends showers after 30.4 hits on average with a spread of 3.9; any one
    temperature for the whole shower gives a spread of 13 or more (or no hits at all)."""
    model = tiny_model(paper_design=True)
    tok = model.tokenizer
    with torch.no_grad():
        for head in (model.spatial_head, model.energy_head):
            head.weight.zero_()
            head.bias.zero_()
        model.spatial_head.bias[tok.spatial_eos] = 20.0
        model.energy_head.bias[tok.energy_eos] = -1e4
    max_hits, n = 40, 48
    out, stats = generate(
        model, "G4_W:gamma", np.full(n, 50.0), seed=1, max_hits=max_hits,
        dynamic_temperature=(8.0, 0.5), unique_voxels=True,
    )  # fmt: skip
    lengths = out["G4_W:gamma"].n_hits
    temps = [8.0 - 7.5 * k / max_hits for k in range(max_hits)]
    p = [1 / (1 + (27000 - k) * np.exp(-20 / t)) for k, t in enumerate(temps)]
    alive = np.cumprod([1.0] + [1 - q for q in p])
    mean_want = alive[1:].sum()  # E[L] = sum_k P(L > k)
    assert mean_want == pytest.approx(30.4, abs=0.1)
    assert abs(lengths.mean() - mean_want) < 2.0  # 3.6 standard errors
    assert 2.0 < lengths.std() < 6.5
    assert stats["n_truncated"] == 0 and stats["n_hits"] == lengths.sum()
