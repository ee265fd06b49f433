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


def test_tungsten_stack_is_about_24_radiation_lengths_deep():
    depth = DetectorConfig().layer_depth_x0()
    assert 23 < depth[-1] + 4.2 / 3.504 < 25.5
    assert np.all(np.diff(depth) > 0)


def test_impossible_geometry_is_rejected():
    with pytest.raises(CalofmError):
        DetectorConfig(nx=0)
    with pytest.raises(CalofmError):
        DetectorConfig(absorber_mm=(-1.0,))
