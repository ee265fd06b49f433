"""Simulation as an array of jobs: seed offsets, and ``calofm merge`` of the jobs' files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
from conftest import make_toy_showers

from calofm.cli import main
from calofm.data.formats import file_info, write_showers
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.simulation.runner import SimulationRequest

SIM = ["simulate", "--material", "G4_W", "--energy-range", "1", "3", "--seed", "5"]
SIM += ["--chunk-size", "2"]


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """One run of 8 showers, and the same run as two jobs of 4 (offsets 0 and 4)."""
    d = tmp_path_factory.mktemp("jobs")
    assert main([*SIM, "-n", "8", "--out", str(d / "whole.h5")]) == 0
    for j in (0, 1):
        assert main([*SIM, "-n", "4", "--offset", str(4 * j), "--out", str(d / f"job{j}.h5")]) == 0
    return d


def _datasets(path) -> dict[str, bytes | list[bytes]]:
    """Every dataset's bytes, as stored."""
    with h5py.File(path, "r") as f:
        out = {k: f[k][:].tobytes() for k in ("energies", "directions", "pdg", "num_points")}
        out["shape"] = f["shape"][:].tobytes()
        out["showers"] = [row.tobytes() for row in f["showers"][:]]
    return out


def test_jobs_with_offsets_merge_into_exactly_the_showers_of_one_run(jobs, capsys):
    inputs = [str(jobs / "job1.h5"), str(jobs / "job0.h5")]  # in any order
    assert main(["merge", *inputs, "--out", str(jobs / "m.h5")]) == 0
    assert "wrote 8 showers from 2 files" in capsys.readouterr().out
    assert _datasets(jobs / "m.h5") == _datasets(jobs / "whole.h5")
    meta = file_info(jobs / "m.h5").metadata
    assert (meta["seed"], meta["n"], "offset" in meta) == (5, 8, False)
    assert [p["offset"] for p in meta["merged_from"]] == [0, 4]


def test_merge_refuses_an_existing_output_without_overwrite(jobs, capsys):
    inputs = [str(jobs / "job0.h5"), str(jobs / "job1.h5")]
    out = jobs / "again.h5"
    out.write_text("a complete output\n")
    assert main(["merge", *inputs, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert out.read_text() == "a complete output\n"
    assert main(["merge", *inputs, "--out", str(out), "--overwrite"]) == 0
    assert file_info(out).n == 8
    assert sorted(p.name for p in jobs.iterdir() if p.name.startswith((".again", "again"))) == [
        "again.h5"
    ]


def test_merge_refuses_the_same_showers_twice(jobs, capsys):
    for inputs in (["job0.h5", "job0.h5"], ["job0.h5", "whole.h5"]):
        argv = ["merge", *(str(jobs / p) for p in inputs), "--out", str(jobs / "dup.h5")]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and ("twice" in err)
        assert not (jobs / "dup.h5").exists()


def test_merge_refuses_files_of_other_materials_particles_or_geometries(tmp_path):
    from calofm.data.merge import merge_files

    det = DetectorConfig()
    w = write_showers(make_toy_showers(3, seed=1, detector=det), tmp_path / "w.h5")
    others = {
        "material": make_toy_showers(3, seed=2, detector=det.with_material("G4_Pb")),
        "particle": make_toy_showers(3, seed=3, detector=det),
        "geometry": make_toy_showers(3, seed=4, detector=DetectorConfig(absorber_mm=(2.1,) * 30)),
    }
    others["particle"].particle = "e-"
    for what, showers in others.items():
        other = write_showers(showers, tmp_path / f"{what}.h5")
        with pytest.raises(CalofmError, match="hold different showers"):
            merge_files([w, other], tmp_path / "out.h5")
        assert not (tmp_path / "out.h5").exists()


def test_offset_must_be_a_whole_number_of_chunks():
    with pytest.raises(CalofmError, match="whole number of chunks"):
        SimulationRequest(DetectorConfig(), "gamma", n=4, energy_gev=(1, 2), chunk_size=4, offset=2)


def test_offset_runs_the_chunks_of_the_same_seed_further_on():
    base = SimulationRequest(DetectorConfig(), "gamma", n=8, energy_gev=(1, 2), chunk_size=2)
    job = SimulationRequest(
        DetectorConfig(), "gamma", n=4, energy_gev=(1, 2), chunk_size=2, offset=4
    )
    for i in range(2):
        energies, seed = job.chunk(i)
        np.testing.assert_array_equal(energies, base.chunk(i + 2)[0])
        assert seed == base.chunk(i + 2)[1]
    assert "offset" not in base.describe("g4") and job.describe("g4")["offset"] == 4
