"""Token dataset, collate and the length-bucketed, class-balanced, DDP-aware batch sampler."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_toy_showers

from calofm.data.batches import (
    BucketBatchSampler,
    TokenDataset,
    collate,
    eval_batches,
    padding_fraction,
    shard,
)
from calofm.detector import DetectorConfig
from calofm.tokens import Tokenizer, TokenizerConfig

DET = DetectorConfig(absorber_mm=(2.1,) * 6, nx=6, ny=6)
CLASSES = ["G4_W:gamma", "G4_Ta:gamma"]


def tokenizer(max_hits: int = 1200, max_mev: float = 70.0) -> Tokenizer:
    return Tokenizer(
        TokenizerConfig.for_detector(
            DET,
            scheme="log",
            n_bins=64,
            max_hits=max_hits,
            max_mev=max_mev,
            incident_min_gev=1.0,
            incident_max_gev=5.0,
        )
    )


def dataset(n_w: int = 40, n_ta: int = 10, **kwargs) -> TokenDataset:
    w = make_toy_showers(n_w, seed=1, detector=DET, energy_range=(1, 5))
    ta = make_toy_showers(n_ta, seed=2, detector=DET.with_material("G4_Ta"), energy_range=(1, 5))
    return TokenDataset([("G4_W:gamma", w), ("G4_Ta:gamma", ta)], tokenizer(**kwargs), CLASSES)


def test_collate_builds_sos_hits_eos_pad_sequences():
    ds = dataset()
    tok = tokenizer()
    c = tok.config
    idx = np.array([3, 0, 45])
    batch = collate(ds, idx)
    width = int(ds.lengths[idx].max()) + 2
    assert batch["spatial"].shape == batch["energy"].shape == (3, width)
    assert batch["class_id"].tolist() == [0, 0, 1]
    for row, i in enumerate(idx):
        n = int(ds.lengths[i])
        hits = slice(ds.offsets[i], ds.offsets[i + 1])
        sp, en = batch["spatial"][row].numpy(), batch["energy"][row].numpy()
        assert sp[0] == c.spatial_sos and en[0] == c.energy_sos
        assert np.array_equal(sp[1 : n + 1], ds.spatial[hits])
        assert np.array_equal(en[1 : n + 1], ds.energy[hits])
        assert sp[n + 1] == c.spatial_eos and en[n + 1] == c.energy_eos
        assert np.all(sp[n + 2 :] == c.spatial_pad) and np.all(en[n + 2 :] == c.energy_pad)
    assert np.allclose(batch["incident"].numpy(), ds.incident[idx])


def test_too_long_showers_are_excluded_and_reported():
    full = dataset()
    limit = int(np.median(full.lengths))
    ds = dataset(max_hits=limit)
    too_long = sum(r.n_too_long for r in ds.reports)
    assert too_long == int(np.sum(full.lengths > limit)) > 0
    assert len(ds) == len(full) - too_long and ds.lengths.max() <= limit
    text = " ".join(ds.messages())
    assert "excluded" in text and "--max-hits" in text


def test_clipped_energies_are_counted_and_reported():
    ds = dataset(max_mev=0.3)
    assert sum(r.n_clipped for r in ds.reports) > 0
    assert any("top bin" in m for m in ds.messages())


def test_bucketing_keeps_padding_small():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 900, size=4000)
    classes = np.zeros(4000, dtype=np.int64)
    sampler = BucketBatchSampler(lengths, classes, seed=0, batch_size=32, pool_batches=50)
    bucketed = sampler.batches(0)
    random = np.array_split(rng.permutation(4000), 4000 // 32)
    assert padding_fraction(lengths, bucketed) < 0.05 < 0.3 < padding_fraction(lengths, random)


def test_batches_are_shuffled_and_cover_every_shower_each_epoch():
    lengths = np.random.default_rng(1).integers(5, 50, size=200)
    sampler = BucketBatchSampler(lengths, np.zeros(200, np.int64), seed=3, batch_size=8)
    e0, e1 = sampler.batches(0), sampler.batches(1)
    assert sorted(np.concatenate(e0).tolist()) == list(range(200))
    assert [b.tolist() for b in e0] == [b.tolist() for b in sampler.batches(0)]
    assert [b.tolist() for b in e0] != [b.tolist() for b in e1]
    means = [lengths[b].mean() for b in e0]
    assert means != sorted(means)  # batch order is not the length order


def test_classes_are_drawn_equally_each_epoch():
    class_id = np.array([0] * 300 + [1] * 30)
    lengths = np.random.default_rng(2).integers(5, 50, size=330)
    sampler = BucketBatchSampler(lengths, class_id, seed=0, batch_size=10)
    drawn = np.concatenate(sampler.batches(0))
    counts = np.bincount(class_id[drawn])
    assert counts.tolist() == [300, 300]
    assert len(np.unique(drawn[class_id[drawn] == 0])) == 300  # the large class is not subsampled


def test_token_budget_bounds_padded_tokens_per_batch():
    lengths = np.random.default_rng(4).integers(10, 400, size=1000)
    sampler = BucketBatchSampler(lengths, np.zeros(1000, np.int64), seed=0, batch_tokens=4000)
    for b in sampler.batches(0):
        assert len(b) * (lengths[b].max() + 2) <= 4000 or len(b) == 1


def test_every_process_gets_a_share_of_every_global_batch():
    lengths = np.random.default_rng(5).integers(10, 100, size=101)
    sampler = BucketBatchSampler(
        lengths, np.zeros(101, np.int64), seed=0, batch_size=9, world_size=2
    )
    for b in sampler.batches(0):
        a, c = shard(b, 0, 2), shard(b, 1, 2)
        assert len(a) >= 1 and len(c) >= 1 and abs(len(a) - len(c)) <= 1
        assert sorted(np.concatenate([a, c]).tolist()) == sorted(b.tolist())


def test_eval_batches_cover_each_shower_once():
    lengths = np.random.default_rng(6).integers(10, 100, size=57)
    batches = eval_batches(lengths, batch_size=10)
    assert sorted(np.concatenate(batches).tolist()) == list(range(57))


def test_sampler_needs_exactly_one_batch_size():
    with pytest.raises(ValueError):
        BucketBatchSampler(np.ones(3), np.zeros(3), seed=0)
