import h5py
import numpy as np
import pytest
import showerdata

from calofm.cli import main
from calofm.data.formats import file_info, iter_showers, read_showers, write_showers
from calofm.data.showers import SparseShowers, concatenate
from calofm.data.writers import ShowerWriter
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError


@pytest.mark.parametrize("fmt", ["showerdata", "getting_high"])
def test_write_then_read_round_trips_hits_and_class(toy_showers, tmp_path, fmt):
    path = write_showers(toy_showers, tmp_path / "s.h5", fmt=fmt)
    back = read_showers(path)
    info = file_info(path)
    assert info.format == fmt and info.n == len(toy_showers)
    assert back.material == "G4_W" and back.particle == "gamma"
    assert np.array_equal(back.incident, toy_showers.incident)
    dense_a, dense_b = toy_showers.to_dense(), back.to_dense()
    assert np.allclose(dense_a, dense_b, rtol=1e-6, atol=1e-9)


def test_showerdata_files_load_with_the_showerdata_package(toy_showers, tmp_path):
    path = write_showers(toy_showers, tmp_path / "s.h5")
    loaded = showerdata.load(path)
    assert len(loaded) == len(toy_showers)
    assert np.allclose(
        loaded.points[0, : toy_showers.n_hits[0], 3].sum() * 1e3, toy_showers.shower(0)[1].sum()
    )
    assert loaded.pdg[0] == 22


def test_reading_in_slices_equals_reading_whole(toy_showers, tmp_path):
    path = write_showers(toy_showers, tmp_path / "s.h5")
    parts = list(iter_showers(path, chunk_size=7))
    assert [len(p) for p in parts] == [7, 7, 6]
    whole = concatenate(parts)
    assert np.array_equal(whole.voxels, toy_showers.voxels)


def test_writer_resumes_from_partial_file_of_the_same_run(toy_showers, tmp_path):
    out = tmp_path / "r.h5"
    w = ShowerWriter(out, len(toy_showers), {"material": "G4_W"}, signature="abc")
    w.append(toy_showers.select(slice(0, 10)))
    assert not out.exists()
    w2 = ShowerWriter(out, len(toy_showers), {"material": "G4_W"}, signature="abc")
    assert w2.n_written == 10
    w2.append(toy_showers.select(slice(10, 20)))
    w2.finish()
    assert np.array_equal(read_showers(out).voxels, toy_showers.voxels)


def test_writer_refuses_partial_file_of_a_different_run_unless_told_to_replace_it(
    toy_showers, tmp_path
):
    out = tmp_path / "r.h5"
    ShowerWriter(out, 20, {}, signature="one").append(toy_showers.select(slice(0, 10)))
    with pytest.raises(CalofmError, match="other arguments"):
        ShowerWriter(out, 20, {}, signature="two")
    assert ShowerWriter(out, 20, {}, signature="one").n_written == 10
    assert ShowerWriter(out, 20, {}, signature="two", replace_partial=True).n_written == 0


def test_nan_and_negative_energies_are_rejected(tmp_path):
    for bad in (np.nan, -1.0):
        path = tmp_path / f"bad{bad}.h5"
        with h5py.File(path, "w") as f:
            layers = np.zeros((2, 30, 30, 30), np.float32)
            layers[0, 0, 0, 0] = bad
            f.create_group("30x30").create_dataset("layers", data=layers)
            f["30x30"].create_dataset("energy", data=np.array([[10.0], [20.0]], np.float32))
        with pytest.raises(CalofmError, match="NaN|negative"):
            read_showers(path)


def test_wrong_layout_is_a_clear_error(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("x", data=np.zeros(3))
    with pytest.raises(CalofmError, match="unknown layout"):
        file_info(path)


def test_grid_mismatch_is_a_clear_error(tmp_path):
    path = tmp_path / "grid.h5"
    with h5py.File(path, "w") as f:
        f.create_group("30x30").create_dataset("layers", data=np.zeros((1, 20, 30, 30), np.float32))
        f["30x30"].create_dataset("energy", data=np.ones((1, 1), np.float32))
    with pytest.raises(CalofmError, match="grid"):
        file_info(path)


def test_threshold_keeps_hits_strictly_above_and_handles_empty_showers():
    s = SparseShowers(
        offsets=[0, 2, 2, 3], voxels=[1, 2, 3], energies=[0.05, 0.2, 0.1], incident=[1, 2, 3]
    )
    t = s.threshold(0.1)
    assert t.n_hits.tolist() == [1, 0, 0] and t.voxels.tolist() == [2]


def test_select_keeps_requested_order(toy_showers):
    sub = toy_showers.select(np.array([3, 1]))
    assert np.array_equal(sub.shower(0)[0], toy_showers.shower(3)[0])
    assert np.array_equal(sub.shower(1)[1], toy_showers.shower(1)[1])


def test_from_dense_rejects_wrong_grid():
    with pytest.raises(CalofmError):
        SparseShowers.from_dense(np.zeros((1, 3, 3, 3)), [10.0], DetectorConfig(), "gamma")


def test_convert_round_trip_through_the_command_line(toy_showers, tmp_path, capsys):
    src = write_showers(toy_showers, tmp_path / "a.h5", fmt="getting_high")
    assert main(["convert", str(src), "--to", "showerdata", "--out", str(tmp_path / "b.h5")]) == 0
    assert (
        main(
            [
                "convert",
                str(tmp_path / "b.h5"),
                "--to",
                "getting_high",
                "--out",
                str(tmp_path / "c.h5"),
            ]
        )
        == 0
    )
    assert np.allclose(
        read_showers(tmp_path / "c.h5").to_dense(), toy_showers.to_dense(), rtol=1e-6
    )


def test_convert_of_missing_file_is_one_line_and_exit_2(tmp_path, capsys):
    assert (
        main(
            [
                "convert",
                str(tmp_path / "none.h5"),
                "--to",
                "showerdata",
                "--out",
                str(tmp_path / "o.h5"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file" in err
    assert not (tmp_path / "o.h5").exists()


def test_reference_data_reads_as_getting_high(shared_data):
    info = file_info(shared_data / "W_gamma_test.h5")
    assert info.format == "getting_high" and info.n == 1000
    assert info.detector.material == "G4_W" and info.particle == "gamma"
    s = read_showers(shared_data / "W_gamma_test.h5", 0, 5)
    assert len(s) == 5 and s.energies.min() > 0


@pytest.mark.parametrize("as_bytes", [False, True])
def test_public_getting_high_file_takes_material_and_particle_from_its_attributes(
    tmp_path, as_bytes
):
    """A file of the public layout (group 30x30, energy in GeV, layers in MeV) without calofm's
    own attribute: the class comes from the top-level 'material' and 'particle' attributes."""
    rng = np.random.default_rng(0)
    layers = np.zeros((3, 30, 30, 30), np.float32)
    for i in range(3):
        cells = rng.integers(0, 30, size=(20, 3))
        layers[i, cells[:, 0], cells[:, 1], cells[:, 2]] = rng.uniform(0.2, 5.0, 20)
    incident = np.array([[12.0], [50.0], [90.0]], np.float32)
    path = tmp_path / "Ta_e-_public.h5"
    with h5py.File(path, "w") as f:
        group = f.create_group("30x30")
        group.create_dataset("energy", data=incident)
        group.create_dataset("layers", data=layers)
        for key, value in (("material", "G4_Ta"), ("particle", "e-"), ("seed", 7)):
            f.attrs[key] = np.bytes_(value) if as_bytes and isinstance(value, str) else value
    info = file_info(path)
    assert info.format == "getting_high" and info.n == 3
    assert info.detector.material == "G4_Ta" and info.particle == "e-"
    assert info.detector.shape == (30, 30, 30)
    showers = read_showers(path)
    assert showers.detector.material == "G4_Ta" and showers.particle == "e-"
    np.testing.assert_array_equal(showers.incident, incident[:, 0])
    np.testing.assert_allclose(showers.to_dense(), layers)
    assert read_showers(path, 1, 2).incident.tolist() == [50.0]
