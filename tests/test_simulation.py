"""The embedded Geant4: stand-in tables, determinism, resume, bad input, and shower physics."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys

import numpy as np
import pytest

from calofm.cli import main
from calofm.data.formats import file_info, read_all
from calofm.detector import CRITICAL_ENERGY_MEV, RADIATION_LENGTH_MM, DetectorConfig
from calofm.simulation import tables
from calofm.simulation.runner import (
    SimulationRequest,
    check_request,
    open_writer,
    simulate,
    simulate_to_file,
)

DET = DetectorConfig()
SMALL = SimulationRequest(DET, "gamma", n=6, energy_gev=(1.0, 5.0), seed=7, chunk_size=2)
AVOGADRO = 6.02214076e23


def same_showers(a, b) -> bool:
    return all(
        np.array_equal(x, y)
        for x, y in [
            (a.offsets, b.offsets),
            (a.voxels, b.voxels),
            (a.energies, b.energies),
            (a.incident, b.incident),
        ]
    )


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory):
    """The SMALL request written with one and with two workers."""
    out = tmp_path_factory.mktemp("sim")
    paths = {
        w: simulate_to_file(SMALL, out / f"w{w}.h5", workers=w, progress=False) for w in (1, 2)
    }
    return paths


def test_same_seed_gives_identical_showers_for_any_number_of_workers(small_runs):
    one, two = read_all(small_runs[1]), read_all(small_runs[2])
    assert len(one) == SMALL.n and np.all(one.n_hits > 0)
    assert same_showers(one, two)
    lo, hi = SMALL.energy_gev
    assert np.all((one.incident >= lo) & (one.incident <= hi))


def test_another_seed_gives_other_showers(small_runs):
    other = SimulationRequest(DET, "gamma", n=2, energy_gev=SMALL.energy_gev, seed=8, chunk_size=2)
    first = read_all(small_runs[1]).select(slice(0, 2))
    assert not same_showers(simulate(other), first)


def test_file_records_material_particle_simulator_and_run(small_runs):
    info = file_info(small_runs[1])
    meta = info.metadata
    assert info.particle == "gamma" and info.detector == DET and info.n == SMALL.n
    assert meta["material"] == "G4_W" and meta["seed"] == 7 and meta["n"] == 6
    assert meta["energy_range_gev"] == [1.0, 5.0]
    assert (
        meta["simulator"].startswith("Geant4 11.4")
        and "G4EmStandardPhysics_option1" in meta["simulator"]
    )
    assert "stand-in" in meta["physics_note"]


def test_interrupted_run_resumes_at_the_first_missing_chunk(tmp_path, small_runs):
    """A partial file holding one finished chunk is kept; the rest matches an uninterrupted run."""
    full = read_all(small_runs[1])
    out = tmp_path / "resumed.h5"
    finished = full.select(slice(0, SMALL.chunk_size))
    finished.energies = finished.energies * 2  # marks the chunk, to see that it is not redone
    writer = open_writer(SMALL, out, check_request(SMALL))
    writer.append(finished)
    assert not out.exists()

    simulate_to_file(SMALL, out, progress=False)
    resumed = read_all(out)
    k = SMALL.chunk_size
    np.testing.assert_allclose(resumed.energies[: resumed.offsets[k]], finished.energies, rtol=1e-6)
    assert same_showers(resumed.select(slice(k, None)), full.select(slice(k, None)))
    assert not writer.partial.exists()


GOOD = {"--material": "G4_W", "--particle": "gamma", "-n": "2", "--energy": "1"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"--material": "G4_Unobtainium"}, "unknown material"),
        ({"--particle": "photon"}, "unknown particle"),
        ({"--particle": "kaon0L"}, "not defined by Geant4"),  # found out in the worker
        ({"-n": "0"}, "at least 1"),
        ({"--energy": "0"}, "outside"),
        ({"--energy": "20000"}, "outside"),
        ({"--energy": None, "--energy-range": ["50", "10"]}, "LO must not exceed HI"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, changes, message):
    out = tmp_path / "bad.h5"
    options = {**GOOD, **changes}
    argv = ["simulate", "--out", str(out)]
    for flag, value in options.items():
        if value is not None:
            argv += [flag, *([value] if isinstance(value, str) else value)]
    code = main(argv)
    err = capsys.readouterr().err.splitlines()
    lines = [line for line in err if line.strip() and not line.startswith("simulate ")]  # no bar
    assert code == 2
    assert (
        len(lines) == 1 and lines[0].startswith("calofm simulate: error:") and message in lines[0]
    )
    assert not out.exists() and not (tmp_path / "bad.h5.partial").exists()


def test_standin_tables_are_written_offline_even_with_ci_true(tmp_path):
    """A fresh machine: no Geant4 data, CI=true (which makes geant4-pybind try to download)."""
    env = {k: v for k, v in os.environ.items() if k != "GEANT4_DATA_DIR"}
    for _, variable in tables.DATASETS:
        env.pop(variable, None)
    env.update(CI="true", HOME=str(tmp_path), CALOFM_CACHE=str(tmp_path / "cache"))
    out = tmp_path / "pb.h5"
    argv = ["simulate", "--material", "G4_Pb", "--particle", "e-", "-n", "2", "--energy", "1"]
    result = subprocess.run(
        [sys.executable, "-m", "calofm", *argv, "--out", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote 2 showers to {out}\n"  # Geant4's own output is silenced
    root = tmp_path / "cache" / "geant4-data" / tables.TABLES_VERSION
    for z in (1, 6, 82, 100):
        assert (root / f"G4EMLOW8.8/brem_SB/br{z}").is_file()
        for kind in ("cs", "high", "low"):
            assert (root / f"G4EMLOW8.8/epics2017/phot/pe-{kind}-{z}.dat").is_file()
    assert (root / "G4ENSDFSTATE3.0/ENSDFSTATE.dat").is_file()
    assert all((root / folder).is_dir() for folder, _ in tables.DATASETS)
    assert not (tmp_path / ".geant4_pybind").exists()
    assert file_info(out).n == 2


CUT_CHECK = """
import numpy as np
from calofm.detector import DetectorConfig
from calofm.simulation.geant4 import Calorimeter, g4
calo = Calorimeter(DetectorConfig())
ui = g4.G4UImanager.GetUIpointer()
runs = [calo.simulate("e-", np.full(2, 2.0), 5).energies]
for command in ("/run/setCut 0.7 mm", "/run/setCut 1 mm"):
    ui.ApplyCommand(command)
    runs.append(calo.simulate("e-", np.full(2, 2.0), 5).energies)
print([len(r) == len(runs[0]) and bool(np.all(r == runs[0])) for r in runs[1:]])
"""


def test_production_cut_in_effect_is_0p7_mm():
    """With the same seed, showers equal those after an explicit 0.7 mm cut and differ at 1 mm."""
    result = subprocess.run(
        [sys.executable, "-c", CUT_CHECK], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[True, False]"


def test_concurrent_table_generation_is_safe(tmp_path, monkeypatch):
    monkeypatch.setenv("CALOFM_CACHE", str(tmp_path))
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        roots = pool.starmap(tables.ensure_tables, [()] * 4)
    assert len(set(roots)) == 1 and roots[0] == tables.cache_dir()
    assert sorted(p.name for p in roots[0].parent.iterdir()) == [tables.TABLES_VERSION]
    assert (roots[0] / "G4EMLOW8.8/brem_SB/br74").is_file()


@pytest.mark.parametrize(
    ("z", "a", "density", "material"),
    [(74, 183.84, 19.3, "G4_W"), (82, 207.2, 11.35, "G4_Pb"), (14, 28.0855, 2.33, "G4_Si")],
)
def test_bremsstrahlung_table_reproduces_the_radiation_length(z, a, density, material):
    """Read br{Z} as G4Physics2DVector does; at 10 GeV, n Z^2 * integral chi dkappa = 1/X0."""
    text = (tables.ensure_tables() / f"G4EMLOW8.8/brem_SB/br{z}").read_text().split()
    kind, nx, ny = (int(t) for t in text[:3])
    values = np.array(text[3:], dtype=float)
    assert kind == 2 and len(values) == nx + ny + nx * ny
    kappa, log_t, chi = values[:nx], values[nx : nx + ny], values[nx + ny :].reshape(ny, nx)
    assert kappa[0] < 1e-6 and kappa[-1] == 1.0 and np.all(np.diff(kappa) > 0)
    assert np.exp(log_t[0]) == pytest.approx(1e-3) and np.all(np.diff(log_t) > 0)
    assert np.all(chi >= 0)
    atoms_per_cm3 = density * AVOGADRO / a
    x0_mm = 10 / (atoms_per_cm3 * z**2 * np.trapezoid(chi[-1], kappa) * 1e-27)
    assert x0_mm == pytest.approx(RADIATION_LENGTH_MM[material], rel=0.03)


def test_photoelectric_tables_follow_the_livermore_layout():
    phot = tables.ensure_tables() / "G4EMLOW8.8/epics2017/phot"
    cs = (phot / "pe-cs-74.dat").read_text().split()
    e_min, e_max, n, n_again = float(cs[0]), float(cs[1]), int(cs[2]), int(cs[3])
    pairs = np.array(cs[4:], dtype=float).reshape(-1, 2)
    assert n == n_again == len(pairs) and pairs[0, 0] == e_min and pairs[-1, 0] == e_max
    for name in ("pe-high-74.dat", "pe-low-74.dat"):
        fit = (phot / name).read_text().split()
        shells, subshells, threshold = int(fit[0]), int(fit[1]), float(fit[2])
        params = np.array(fit[3:], dtype=float)
        assert shells == subshells == 1 and len(params) == 7 and params[0] == threshold
        sigma_100kev = params[1] / 0.1 + params[2] / 0.1**2 + params[3] / 0.1**3  # barn
        assert sigma_100kev == pytest.approx(1130, rel=0.01)  # W near 100 keV (NIST XCOM)


def _shower_max_x0(showers) -> float:
    """Depth of the mean longitudinal profile's maximum, from a gamma-function fit (PDG 34.5)."""
    profile = showers.to_dense().sum(axis=(2, 3)).mean(axis=0)
    depth = DET.layer_depth_x0()
    weight = np.sqrt(profile / profile.max())
    design = np.stack([np.ones_like(depth), np.log(depth), -depth], axis=1)
    _, a_minus_1, b = np.linalg.lstsq(
        design * weight[:, None], np.log(np.maximum(profile, 1e-9)) * weight, rcond=None
    )[0]
    return a_minus_1 / b


@pytest.fixture(scope="module")
def physics_showers():
    """10 GeV photons and electrons, plus 5 and 20 GeV photons, in tungsten."""
    runs = {("gamma", 10.0): 30, ("e-", 10.0): 30, ("gamma", 5.0): 60, ("gamma", 20.0): 40}
    return {
        key: simulate(SimulationRequest(DET, key[0], n, (key[1], key[1]), seed=3, chunk_size=10))
        for key, n in runs.items()
    }


@pytest.mark.slow
def test_photon_shower_maximum_is_where_the_pdg_estimate_puts_it(physics_showers):
    expected = np.log(10e3 / CRITICAL_ENERGY_MEV["G4_W"]) + 0.5
    assert abs(_shower_max_x0(physics_showers[("gamma", 10.0)]) - expected) < 1.5


@pytest.mark.slow
def test_electrons_peak_earlier_than_photons(physics_showers):
    photon = _shower_max_x0(physics_showers[("gamma", 10.0)])
    electron = _shower_max_x0(physics_showers[("e-", 10.0)])
    assert 0.3 < photon - electron < 2.0


@pytest.mark.slow
def test_visible_energy_grows_linearly_with_incident_energy(physics_showers):
    energies = np.array([5.0, 10.0, 20.0])
    showers = [physics_showers[("gamma", e)] for e in energies]
    visible = np.array([s.energies.sum() / len(s) for s in showers])
    slope, intercept = np.polyfit(energies, visible, 1)
    residuals = visible - (slope * energies + intercept)
    assert np.all(np.abs(residuals / visible) < 0.05)  # sampling fraction falls ~1.5% by 20 GeV
    assert 15 < slope < 30  # MeV visible in 0.5 mm Si per GeV (about 2.3% sampling fraction)
