"""Metrics: zero for identical samples, large for different ones; the floor's splits."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_toy_showers

from calofm.errors import CalofmError
from calofm.evaluation.metrics import (
    MetricConfig,
    Standardiser,
    classifier_auc,
    compare_samples,
    histogram,
    make_splits,
    reference_edges,
    separation_power,
    w1x100,
)
from calofm.evaluation.observables import ObservableConfig, compute_observables, observable_list
from calofm.evaluation.plots import plot_observable


def test_w1_is_zero_for_identical_samples_and_about_100_per_std_of_shift():
    x = np.random.default_rng(0).normal(3.0, 2.0, 5000)
    scale = Standardiser.fit(x)
    assert w1x100(x, x.copy(), scale) == 0.0
    assert w1x100(x, x + 2.0, scale) == pytest.approx(100.0, rel=0.02)
    profile = np.column_stack([x, 10 * x])
    shifted = profile + np.array([2.0, 20.0])
    assert w1x100(profile, shifted, Standardiser.fit(profile)) == pytest.approx(100.0, rel=0.02)


def test_separation_power_is_zero_for_equal_and_one_for_disjoint_histograms():
    h = np.array([1.0, 5.0, 3.0, 0.0])
    assert separation_power(h, 2 * h) == pytest.approx(0.0)
    assert separation_power([1, 2, 0, 0], [0, 0, 3, 1]) == pytest.approx(1.0)
    assert 0 < separation_power([1, 2, 1, 0], [0, 1, 2, 1]) < 1


def test_classifier_auc_is_half_for_one_distribution_and_one_for_different_ones():
    rng = np.random.default_rng(1)
    config = MetricConfig()
    a, b = rng.normal(size=(2, 400, 6))
    same, _ = classifier_auc(a, b, config, seed=0)
    assert abs(same - 0.5) < 0.08
    different, _ = classifier_auc(a, b + 3.0, config, seed=0)
    assert different > 0.98
    with pytest.raises(CalofmError, match="equal class counts"):
        classifier_auc(a, b[:300], config, seed=0)


def test_splits_are_equal_sized_disjoint_halves_and_floor_ignores_other_candidates():
    config = MetricConfig(n_splits=3, seed=7)
    n, splits = make_splits(101, {"x": 80}, config)
    assert n == 50
    for s in splits:
        assert len(s.a) == len(s.b) == len(s.candidates["x"]) == n
        assert not set(s.a) & set(s.b)
    n2, splits2 = make_splits(101, {"x": 80, "y": 60}, config)
    assert n2 == 50
    for s, s2 in zip(splits, splits2, strict=True):
        np.testing.assert_array_equal(s.a, s2.a)
        np.testing.assert_array_equal(s.candidates["x"], s2.candidates["x"])
    n3, _ = make_splits(101, {"x": 80, "small": 30}, config)
    assert n3 == 30
    with pytest.raises(CalofmError, match="showers a side"):
        make_splits(7, {"x": 80}, config)


def test_edges_follow_the_reference_and_the_field_conventions(toy_showers):
    oc, mc = ObservableConfig(), MetricConfig()
    obs = compute_observables(toy_showers, oc)
    edges = {o.name: reference_edges(o, obs, oc, mc) for o in observable_list(oc)}
    assert edges["cell_energy"][0] == pytest.approx(oc.threshold_mev)
    assert edges["cell_energy"][-1] == pytest.approx(70.0)
    assert len(edges["energy_per_layer"]) == toy_showers.detector.n_layers + 1
    assert (
        edges["energy_sum"][0]
        < obs.energy_sum.min()
        <= obs.energy_sum.max()
        < edges["energy_sum"][-1]
    )
    assert np.all(np.diff(edges["n_hits"]) == np.diff(edges["n_hits"])[0])
    assert edges["n_hits"][0] % 1 == 0.5
    for centre in ("cog_x", "cog_y"):  # centred axes: a shift to one side shows at a glance
        assert edges[centre][0] == pytest.approx(-edges[centre][-1])


def test_histogram_counts_showers_beyond_the_range_and_says_how_many():
    oc, mc = ObservableConfig(), MetricConfig()
    sample = compute_observables(make_toy_showers(40, seed=5), oc)
    cog_x = next(o for o in observable_list(oc) if o.name == "cog_x")
    edges = reference_edges(cog_x, sample, oc, mc)
    sample.cog_x[:4] = edges[0] - 1.0
    sample.cog_x[4:5] = edges[-1] + 1.0
    hist = histogram(cog_x, sample, edges)
    assert (hist.underflow, hist.overflow) == (pytest.approx(0.1), pytest.approx(0.025))
    assert hist.values.sum() == pytest.approx(1.0)  # still in the outer bins, for the metrics
    assert hist.values[0] >= 0.1


def test_plots_scale_log_axes_to_the_values_and_mark_outer_bins(tmp_path):
    """A band reaching zero must not drag a log axis down to 1e-18; showers beyond a scalar's
    range are counted in hatched outer bins, with their fractions in the legend."""
    oc, mc = ObservableConfig(), MetricConfig()
    reference = compute_observables(make_toy_showers(40, seed=1), oc)
    candidate = compute_observables(make_toy_showers(30, seed=2), oc)
    candidate.cog_y[:3] = 1e3
    by_name = {o.name: o for o in observable_list(oc)}
    for name in ("radial_profile", "cog_y"):
        obs = by_name[name]
        edges = reference_edges(obs, reference, oc, mc)
        ref, cand = histogram(obs, reference, edges), histogram(obs, candidate, edges)
        if name == "radial_profile":
            ref = ref._replace(errors=ref.values * 1.5)  # a band far below zero
        fig = plot_observable(obs, edges, ref, {"model": cand}, tmp_path / f"{name}.png")
        top = fig.axes[0]
        texts = [t.get_text() for t in fig.legends[0].get_texts()]
        assert fig.legends[0].get_title().get_text() == obs.heading
        if name == "radial_profile":
            positive = ref.values[ref.values > 0]
            assert top.get_ylim()[0] >= positive.min() / 2.01
        else:
            assert any("10.0% above the range" in t for t in texts)
            assert "overflow" in [t.get_text() for t in top.texts]


def test_shifted_candidate_is_far_from_the_reference_while_the_floor_is_small():
    oc = ObservableConfig(energy_slices_gev=((10, 100),))
    mc = MetricConfig(n_splits=2, classifier_max_iter=30)
    reference = compute_observables(make_toy_showers(120, seed=1), oc)
    same = compute_observables(make_toy_showers(60, seed=2), oc)
    hotter = make_toy_showers(60, seed=3)
    hotter.energies *= 2.0
    observables = observable_list(oc)
    edges = {o.name: reference_edges(o, reference, oc, mc) for o in observables}
    cands = {"same": same, "hotter": compute_observables(hotter, oc)}
    result = compare_samples(reference, cands, observables, edges, mc, progress=False)
    floor = result["floor"]["observables"]["energy_sum"]["w1x100"]
    assert result["candidates"]["same"]["observables"]["energy_sum"]["w1x100"] < 3 * floor + 10
    assert result["candidates"]["hotter"]["observables"]["energy_sum"]["w1x100"] > 3 * floor
    assert result["candidates"]["hotter"]["classifier_auc"] > 0.9
    assert result["n_compared"] == 60


def test_splits_depend_on_the_seed():
    _, first = make_splits(100, {"x": 100}, MetricConfig(n_splits=1, seed=0))
    _, again = make_splits(100, {"x": 100}, MetricConfig(n_splits=1, seed=0))
    _, other = make_splits(100, {"x": 100}, MetricConfig(n_splits=1, seed=1))
    np.testing.assert_array_equal(first[0].a, again[0].a)
    assert not np.array_equal(first[0].a, other[0].a)


def test_candidates_with_the_same_showers_get_the_same_numbers():
    """An adapter that leaves a class's showers untouched must not look different in the table."""
    oc = ObservableConfig(energy_slices_gev=((10, 100),))
    mc = MetricConfig(n_splits=2, classifier_max_iter=30)
    reference = compute_observables(make_toy_showers(60, seed=1), oc)
    sample = compute_observables(make_toy_showers(80, seed=2), oc)  # subsampled to 30 per split
    observables = observable_list(oc)
    edges = {o.name: reference_edges(o, reference, oc, mc) for o in observables}
    result = compare_samples(
        reference, {"base": sample, "after": sample}, observables, edges, mc, progress=False
    )
    assert result["candidates"]["base"] == result["candidates"]["after"]
