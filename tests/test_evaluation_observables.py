"""Observables: agree with showerdata's implementation and with a dense recomputation."""

from __future__ import annotations

import numpy as np
import pytest
import showerdata
from conftest import make_toy_showers
from showerdata.detector import DetectorGeometry
from showerdata.observables import (
    calc_center_of_energy,
    calc_energy_per_layer,
    calc_energy_per_radial_bin,
)

from calofm.data.formats import write_showers
from calofm.data.showers import SparseShowers
from calofm.detector import DetectorConfig
from calofm.evaluation.observables import (
    ObservableConfig,
    compute_observables,
    observable_list,
    radial_edges_mm,
    read_observables,
)
from calofm.tokens import TokenizerConfig

THRESHOLD = TokenizerConfig().threshold_mev


def _geometry(det: DetectorConfig, threshold_mev: float) -> DetectorGeometry:
    """showerdata's description of the same ECAL (only layers and the threshold matter here)."""
    return DetectorGeometry(
        calo_surface=0.0,
        num_layers=det.n_layers,
        num_layers_ecal=det.n_layers,
        num_layers_hcal=0,
        layer_thickness_ecal=det.silicon_mm,
        layer_thickness_hcal=0.0,
        ecal_cell_size=det.cell_mm,
        hcal_cell_size=0.0,
        layer_bottom_pos=tuple(float(i) for i in range(det.n_layers)),
        ecal_threshold=threshold_mev,
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    showers = make_toy_showers(30, seed=3)
    path = write_showers(showers, tmp_path_factory.mktemp("obs") / "toy.h5")
    return showers, path


@pytest.mark.parametrize("threshold", [0.0, THRESHOLD])
def test_layer_energy_and_centre_of_energy_match_showerdata(written, threshold):
    showers, path = written
    ours = read_observables(path, ObservableConfig(threshold_mev=threshold), progress=False)
    loaded = showerdata.load(path)
    geometry = _geometry(showers.detector, threshold) if threshold else None

    per_layer_gev = calc_energy_per_layer(loaded, showers.detector.n_layers, geometry)
    np.testing.assert_allclose(ours.energy_per_layer, per_layer_gev * 1e3, rtol=1e-4, atol=1e-4)

    centre = calc_center_of_energy(loaded, geometry)
    np.testing.assert_allclose(ours.cog_x, centre[:, 0], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ours.cog_y, centre[:, 1], rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ours.cog_z, centre[:, 2], rtol=1e-4, atol=1e-4)

    radial_gev = calc_energy_per_radial_bin(loaded, ours.radial_edges, geometry)
    np.testing.assert_allclose(ours.radial_profile, radial_gev * 1e3, rtol=1e-4, atol=1e-4)


def test_scalars_match_a_dense_recomputation_with_strict_threshold(toy_showers):
    obs = compute_observables(toy_showers, ObservableConfig())
    dense = toy_showers.to_dense().astype(np.float64)
    above = np.where(dense > THRESHOLD, dense, 0.0)
    np.testing.assert_allclose(obs.energy_sum, above.sum(axis=(1, 2, 3)), rtol=1e-9)
    np.testing.assert_array_equal(obs.n_hits, (dense > THRESHOLD).sum(axis=(1, 2, 3)))
    np.testing.assert_allclose(obs.energy_per_layer, above.sum(axis=(2, 3)), rtol=1e-9)
    np.testing.assert_allclose(obs.response, obs.energy_sum / (toy_showers.incident * 1e3))
    np.testing.assert_array_equal(np.diff(obs.cell_offsets), obs.n_hits)  # the spectrum's cells


def _one_shower(cells: list[tuple[int, int, int, float]], incident: float = 50.0) -> SparseShowers:
    det = DetectorConfig()
    layer, x, y, e = (np.array(v) for v in zip(*cells, strict=True))
    return SparseShowers(
        offsets=np.array([0, len(cells)]),
        voxels=det.lxy_to_voxel(layer, x, y),
        energies=e,
        incident=[incident],
        detector=det,
    )


def test_hit_at_threshold_is_dropped_from_the_hits_and_the_cell_spectrum():
    """A generator cannot make cells below the threshold, so neither sample's spectrum has them."""
    showers = _one_shower([(3, 14, 14, THRESHOLD), (3, 15, 15, 2.0), (4, 15, 15, 0.05)])
    obs = compute_observables(showers, ObservableConfig())
    assert obs.n_hits[0] == 1
    assert obs.energy_sum[0] == pytest.approx(2.0)
    assert obs.cell_energies.tolist() == pytest.approx([2.0])
    assert ObservableConfig().spectrum_edges()[0] == pytest.approx(THRESHOLD)


def test_last_two_layers_have_their_own_bins_and_outer_corner_its_ring():
    det = DetectorConfig()
    showers = _one_shower([(det.n_layers - 1, 0, 0, 1.0), (det.n_layers - 2, 14, 15, 3.0)])
    obs = compute_observables(showers, ObservableConfig())
    assert obs.energy_per_layer[0, -1] == pytest.approx(1.0)
    assert obs.energy_per_layer[0, -2] == pytest.approx(3.0)
    edges = radial_edges_mm(det)
    corner = np.hypot(*(c[0] for c in det.cell_centres_mm()))
    assert edges[-2] <= corner < edges[-1]
    assert obs.radial_profile[0, -1] == pytest.approx(1.0)
    assert obs.radial_profile.sum() == pytest.approx(4.0)
    assert obs.cog_z[0] == pytest.approx(((det.n_layers - 1) * 1.0 + (det.n_layers - 2) * 3.0) / 4)


def test_chunked_file_read_equals_one_pass(written):
    showers, path = written
    config = ObservableConfig()
    whole = compute_observables(showers, config)
    chunked = read_observables(path, config, chunk_size=7, progress=False)
    for name in ("energy_sum", "n_hits", "cog_x", "cog_z", "energy_per_layer", "radial_profile"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), rtol=1e-5)
    np.testing.assert_allclose(chunked.cell_energies, whole.cell_energies, rtol=1e-6)
    assert len(read_observables(path, config, max_showers=11, progress=False)) == 11


def test_select_keeps_each_showers_cells(toy_showers):
    obs = compute_observables(toy_showers, ObservableConfig())
    part = obs.select(np.array([5, 2, 9]))
    np.testing.assert_array_equal(part.energy_sum, obs.energy_sum[[2, 5, 9]])
    expected = np.concatenate(
        [obs.cell_energies[obs.cell_offsets[i] : obs.cell_offsets[i + 1]] for i in (2, 5, 9)]
    )
    np.testing.assert_array_equal(part.cell_energies, expected)


def test_slice_observables_only_see_showers_in_their_slice(toy_showers):
    config = ObservableConfig(energy_slices_gev=((10, 40),))
    obs = compute_observables(toy_showers, config)
    sliced = {o.name: o for o in observable_list(config)}["energy_sum_10-40GeV"]
    inside = (toy_showers.incident >= 10) & (toy_showers.incident < 40)
    np.testing.assert_array_equal(sliced.values(obs), obs.energy_sum[inside])
