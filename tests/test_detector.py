import numpy as np
import pytest

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError


def test_default_detector_is_the_30_layer_ild_like_stack():
    det = DetectorConfig()
    assert det.shape == (30, 30, 30) and det.n_voxels == 27000
    assert det.absorber_mm[:20] == (2.1,) * 20 and det.absorber_mm[20:] == (4.2,) * 10


def test_voxel_index_round_trips_through_layer_x_y():
    det = DetectorConfig(absorber_mm=(1.0,) * 4, nx=5, ny=3)
    voxels = np.arange(det.n_voxels)
    assert np.array_equal(det.lxy_to_voxel(*det.voxel_to_lxy(voxels)), voxels)
    assert det.voxel_to_lxy(np.array([1 * 15 + 2 * 3 + 1]))[0][0] == 1


def test_config_survives_json_round_trip():
    det = DetectorConfig(material="G4_Pb", nx=10, ny=12)
    assert DetectorConfig.from_json(det.to_json()) == det


def test_cell_centres_are_symmetric_about_the_beam_axis():
    x, y = DetectorConfig().cell_centres_mm()
    assert x[14] == -2.5 and x[15] == 2.5 and np.isclose(x.sum(), 0)


def test_tungsten_stack_is_24_radiation_lengths_deep():
    # 20 x 2.1 mm + 10 x 4.2 mm of tungsten (X0 = 3.504 mm) is 23.97 X0, the 30 silicon planes
    # of 0.5 mm (X0 = 93.66 mm) another 0.16 X0; depths are those of each plane's front face.
    depth = DetectorConfig().layer_depth_x0()
    thin, thick, si = 2.1 / 3.504, 4.2 / 3.504, 0.5 / 93.66
    assert depth[0] == pytest.approx(thin, abs=1e-3)  # behind the first absorber plate
    np.testing.assert_allclose(np.diff(depth[:20]), thin + si, atol=1e-6)
    np.testing.assert_allclose(np.diff(depth[19:]), thick + si, atol=1e-6)
    assert depth[-1] == pytest.approx(24.127, abs=0.005)
    assert depth[-1] + si == pytest.approx(24.133, abs=0.005)  # the whole stack


def test_impossible_geometry_is_rejected():
    with pytest.raises(CalofmError):
        DetectorConfig(nx=0)
    with pytest.raises(CalofmError):
        DetectorConfig(absorber_mm=(-1.0,))
