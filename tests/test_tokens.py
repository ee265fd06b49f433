import numpy as np
import pytest

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.tokens import Tokenizer, TokenizerConfig, fit_max_mev


@pytest.mark.parametrize("scheme,n_bins", [("linear", 49929), ("log", 1024)])
def test_energy_decoding_is_unbiased_within_one_percent_of_a_bin(scheme, n_bins):
    cfg = TokenizerConfig(scheme=scheme, n_bins=n_bins)
    tok = Tokenizer(cfg)
    rng = np.random.default_rng(1)
    energies = rng.uniform(0.2, 60.0, 400_000)
    bins, clipped = tok.encode_energy(energies)
    decoded = tok.decode_energy(bins, rng)
    widths = tok.edges[bins + 1] - tok.edges[bins]
    assert clipped == 0
    assert abs(np.mean((decoded - energies) / widths)) < 0.01


def test_decoded_energy_lies_inside_its_bin():
    tok = Tokenizer(TokenizerConfig(scheme="log", n_bins=64))
    rng = np.random.default_rng(0)
    bins = np.arange(64)
    e = tok.decode_energy(bins, rng)
    assert np.all(e >= tok.edges[:-1] - 1e-6) and np.all(e <= tok.edges[1:] + 1e-6)
    assert np.array_equal(tok.encode_energy(e)[0], bins)


def test_energies_above_the_top_edge_are_clipped_and_counted():
    tok = Tokenizer(TokenizerConfig(max_mev=35.0, n_bins=1000))
    bins, clipped = tok.encode_energy(np.array([1.0, 36.0, 50.0]))
    assert clipped == 2
    assert bins[1] == bins[2] == 999


def test_vocabulary_sizes_follow_detector_and_binning():
    det = DetectorConfig(absorber_mm=(2.0,) * 10, nx=8, ny=6)
    cfg = TokenizerConfig.linear(det, bin_kev=10.0, max_mev=10.0)
    assert cfg.n_voxels == 480
    assert cfg.spatial_vocab == 483 and (cfg.spatial_sos, cfg.spatial_eos, cfg.spatial_pad) == (
        480,
        481,
        482,
    )
    assert cfg.n_bins == int(np.ceil((10.0 - 0.1) / 0.01))
    assert cfg.energy_vocab == cfg.n_bins + 3


def test_encoding_orders_hits_by_falling_energy_and_applies_threshold(toy_showers):
    tok = Tokenizer(TokenizerConfig())
    enc = tok.encode(toy_showers)
    kept = toy_showers.threshold(0.1)
    assert np.array_equal(enc.lengths, kept.n_hits)
    for i in range(len(enc)):
        bins = enc.energy[enc.offsets[i] : enc.offsets[i + 1]]
        assert np.all(np.diff(bins) <= 0)


def test_ties_are_broken_by_voxel_index_deterministically():
    from calofm.data.showers import SparseShowers

    s = SparseShowers(
        offsets=[0, 3], voxels=[30, 10, 20], energies=[1.0, 1.0, 2.0], incident=[50.0]
    )
    enc = Tokenizer(TokenizerConfig()).encode(s)
    assert enc.spatial.tolist() == [20, 10, 30]


def test_too_long_showers_are_flagged_not_truncated(toy_showers):
    tok = Tokenizer(TokenizerConfig(max_hits=50))
    enc = tok.encode(toy_showers)
    assert np.array_equal(enc.too_long, toy_showers.threshold(0.1).n_hits > 50)
    assert enc.lengths.max() > 50


def test_decode_merges_duplicate_voxels_and_reports_them():
    tok = Tokenizer(TokenizerConfig(scheme="log", n_bins=100))
    rng = np.random.default_rng(0)
    showers, n_dup = tok.decode(
        [np.array([5, 7, 5])],
        [np.array([90, 50, 10])],
        np.array([20.0]),
        DetectorConfig(),
        "gamma",
        rng,
    )
    assert n_dup == 1
    assert sorted(showers.voxels.tolist()) == [5, 7]
    # The same tokens with the third hit in a voxel of its own, drawn from the same stream:
    # the merged voxel holds exactly the sum of its two hits' energies.
    apart, n_apart = tok.decode(
        [np.array([5, 7, 6])],
        [np.array([90, 50, 10])],
        np.array([20.0]),
        DetectorConfig(),
        "gamma",
        np.random.default_rng(0),
    )
    assert n_apart == 0
    single = dict(zip(apart.voxels.tolist(), apart.energies.tolist(), strict=True))
    merged = dict(zip(showers.voxels.tolist(), showers.energies.tolist(), strict=True))
    assert merged[7] == pytest.approx(single[7], rel=1e-6)
    assert merged[5] == pytest.approx(single[5] + single[6], rel=1e-6)
    assert merged[5] > max(single[5], single[6]) + 1e-3


def test_decode_rejects_special_tokens_as_hits():
    cfg = TokenizerConfig(scheme="log", n_bins=100)
    with pytest.raises(CalofmError):
        Tokenizer(cfg).decode(
            [np.array([cfg.spatial_eos])],
            [np.array([1])],
            np.array([20.0]),
            DetectorConfig(),
            "gamma",
            np.random.default_rng(0),
        )


def test_fit_max_mev_leaves_headroom_above_the_data():
    assert fit_max_mev(np.array([1.0, 55.0])) == 70.0


def test_incident_energy_scales_to_unit_interval():
    tok = Tokenizer(TokenizerConfig())
    assert np.allclose(tok.scale_incident(np.array([10.0, 55.0, 100.0])), [-1, 0, 1])


def test_bad_config_is_rejected():
    with pytest.raises(CalofmError):
        TokenizerConfig(scheme="cubic")
    with pytest.raises(CalofmError):
        TokenizerConfig(threshold_mev=80.0)
