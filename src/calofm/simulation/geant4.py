"""One Geant4 process: the sampling calorimeter of a ``DetectorConfig`` hit by a particle gun.

Geometry: every absorber plate of ``detector.absorber_mm`` is followed by a silicon plate of
``detector.silicon_mm``; plates are ``PLATE_SCALE`` times wider than the cell grid, in vacuum. The
central ``nx x ny`` cells of each silicon plate are two nested ``G4PVReplica``s, scored with a
``G4MultiFunctionalDetector`` + ``G4PSEnergyDeposit3D`` whose (layer, x, y) index is the flat voxel
index of the detector. Physics: ``G4EmStandardPhysics_option1`` (electromagnetic only, no hadronic
interactions) with a 0.7 mm production cut, on calofm's analytic stand-in bremsstrahlung and
photoelectric tables (see ``tables.py``). The gun fires at normal incidence at the grid centre.

Geant4 keeps global state per process (one run manager, one geometry), so a process builds one
``Calorimeter`` and reuses it for every chunk; ``runner.py`` gives each worker its own process.
Importing this module first points Geant4 at the stand-in tables, as the import itself needs them.
"""

from __future__ import annotations

import re
from importlib.metadata import version

import numpy as np

from calofm.data.showers import SparseShowers
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.simulation.tables import use_tables

use_tables()
import geant4_pybind as g4  # noqa: E402  (needs the data directory set first)

PHYSICS = "G4EmStandardPhysics_option1"
CUT_MM = 0.7
PLATE_SCALE = 2.0  # absorber and silicon plates are this many times wider than the cell grid
GUN_GAP_MM = 1.0  # the gun fires from this far in front of the first absorber
WORLD_MARGIN_MM = 10.0  # vacuum behind the stack and behind the gun


def geant4_release() -> str:
    """'11.4.p01' from Geant4's own version tag."""
    match = re.search(r"geant4-(\d+)-(\d+)(?:-patch-(\d+))?", g4.G4Version)
    if match is None:
        return g4.G4Version
    major, minor, patch = match.groups()
    return f"{int(major)}.{int(minor)}" + (f".p{patch}" if patch else "")


def simulator_version() -> str:
    """The simulator string written into every file this package simulates."""
    pybind = version("geant4_pybind")
    return (
        f"Geant4 {geant4_release()} (geant4-pybind {pybind}), {PHYSICS}, {CUT_MM:g} mm cut,"
        " stand-in brem_SB/photoelectric tables"
    )


def check_material(material: str) -> None:
    if material not in g4.G4NistManager.Instance().GetNistMaterialNames():
        raise CalofmError(
            f"unknown material {material!r}: not a Geant4 NIST material (such as G4_W, G4_Pb)"
        )


class _Geometry(g4.G4VUserDetectorConstruction):
    def __init__(self, detector: DetectorConfig):
        super().__init__()
        self.detector = detector
        self.depth_mm = sum(detector.absorber_mm) + detector.n_layers * detector.silicon_mm
        self.cells: g4.G4LogicalVolume | None = None

    def Construct(self) -> g4.G4VPhysicalVolume:  # noqa: N802 (Geant4 interface)
        det, mm = self.detector, g4.mm
        nist = g4.G4NistManager.Instance()
        absorber = nist.FindOrBuildMaterial(det.material)
        silicon = nist.FindOrBuildMaterial("G4_Si")
        grid_x, grid_y, si = det.nx * det.cell_mm, det.ny * det.cell_mm, det.silicon_mm
        plate_x, plate_y = PLATE_SCALE * grid_x, PLATE_SCALE * grid_y

        def box(
            name: str, x: float, y: float, z: float, material: g4.G4Material
        ) -> g4.G4LogicalVolume:
            solid = g4.G4Box(name, x / 2 * mm, y / 2 * mm, z / 2 * mm)
            return g4.G4LogicalVolume(solid, material, name)

        world_z = self.depth_mm + 2 * (GUN_GAP_MM + WORLD_MARGIN_MM)
        world = box(
            "world", 1.2 * plate_x, 1.2 * plate_y, world_z, nist.FindOrBuildMaterial("G4_Galactic")
        )
        world_pv = g4.G4PVPlacement(None, g4.G4ThreeVector(), world, "world", None, False, 0)

        # Copy-number depths seen from a cell: cell 0 (y), column 1 (x), grid 2, plate 3 (layer).
        self.cells = box("cell", det.cell_mm, det.cell_mm, si, silicon)
        column = box("column", det.cell_mm, grid_y, si, silicon)
        grid = box("grid", grid_x, grid_y, si, silicon)
        g4.G4PVReplica("cell", self.cells, column, g4.EAxis.kYAxis, det.ny, det.cell_mm * mm)
        g4.G4PVReplica("column", column, grid, g4.EAxis.kXAxis, det.nx, det.cell_mm * mm)
        plate = box("silicon", plate_x, plate_y, si, silicon)
        g4.G4PVPlacement(None, g4.G4ThreeVector(), grid, "grid", plate, False, 0)

        z = -self.depth_mm / 2
        for layer, thickness in enumerate(det.absorber_mm):
            slab = box(f"absorber{layer}", plate_x, plate_y, thickness, absorber)
            centre = g4.G4ThreeVector(0, 0, (z + thickness / 2) * mm)
            g4.G4PVPlacement(None, centre, slab, f"absorber{layer}", world, False, layer)
            z += thickness
            centre = g4.G4ThreeVector(0, 0, (z + si / 2) * mm)
            g4.G4PVPlacement(None, centre, plate, "silicon", world, False, layer)
            z += si
        return world_pv

    def ConstructSDandField(self) -> None:  # noqa: N802
        det = self.detector
        scorer = g4.G4MultiFunctionalDetector("calo")
        g4.G4SDManager.GetSDMpointer().AddNewDetector(scorer)
        scorer.RegisterPrimitive(
            g4.G4PSEnergyDeposit3D("edep", det.n_layers, det.nx, det.ny, 3, 1, 0)
        )
        self.SetSensitiveDetector(self.cells, scorer)


class _Physics(g4.G4VModularPhysicsList):
    def __init__(self):
        super().__init__()
        self.SetVerboseLevel(0)
        self.RegisterPhysics(getattr(g4, PHYSICS)())


class _Gun(g4.G4VUserPrimaryGeneratorAction):
    """Fires one particle per event; the energy of event i is ``energies_mev[i]`` of the run."""

    def __init__(self, z_mm: float):
        super().__init__()
        self.gun = g4.G4ParticleGun(1)
        self.gun.SetParticleMomentumDirection(g4.G4ThreeVector(0, 0, 1))
        self.gun.SetParticlePosition(g4.G4ThreeVector(0, 0, z_mm * g4.mm))
        self.energies_mev = np.zeros(0)

    def GeneratePrimaries(self, event: g4.G4Event) -> None:  # noqa: N802
        self.gun.SetParticleEnergy(float(self.energies_mev[event.GetEventID()]) * g4.MeV)
        self.gun.GeneratePrimaryVertex(event)


class _Scorer(g4.G4UserEventAction):
    """Copies each event's hits map into row ``event id`` of ``cells``, a dense (event, voxel)
    array that ``Calorimeter.simulate`` allocates per run."""

    def __init__(self):
        super().__init__()
        self.collection = -1
        self.cells = np.zeros((0, 0), np.float32)

    def EndOfEventAction(self, event: g4.G4Event) -> None:  # noqa: N802
        if self.collection < 0:
            self.collection = g4.G4SDManager.GetSDMpointer().GetCollectionID("calo/edep")
        hits = event.GetHCofThisEvent().GetHC(self.collection)
        row = self.cells[event.GetEventID()]
        for voxel, energy in hits:
            row[voxel] = energy / g4.MeV


class Calorimeter:
    """The Geant4 set-up of one process; build it once, then call ``simulate`` per chunk."""

    def __init__(self, detector: DetectorConfig):
        check_material(detector.material)
        self.detector = detector
        self.run_manager = g4.G4RunManagerFactory.CreateRunManager(g4.G4RunManagerType.Serial)
        self.run_manager.SetVerboseLevel(0)
        self.geometry = _Geometry(detector)
        # The physics list must exist before any user action (Geant4 exception Event0032).
        self.run_manager.SetUserInitialization(self.geometry)
        self.run_manager.SetUserInitialization(_Physics())
        g4.G4EmParameters.Instance().SetVerbose(0)  # after the constructor, which sets it to 1
        self.run_manager.Initialize()
        # As a UI command after Initialize: SetDefaultCutValue in the physics list is not applied.
        g4.G4UImanager.GetUIpointer().ApplyCommand(f"/run/setCut {CUT_MM} mm")
        self.gun = _Gun(-self.geometry.depth_mm / 2 - GUN_GAP_MM)
        self.scorer = _Scorer()
        self.run_manager.SetUserAction(self.gun)
        self.run_manager.SetUserAction(self.scorer)

    def simulate(self, particle: str, energies_gev: np.ndarray, seed: int) -> SparseShowers:
        """One shower per incident energy; the same seed gives the same showers in any process."""
        definition = g4.G4ParticleTable.GetParticleTable().FindParticle(particle)
        if definition is None:
            raise CalofmError(f"particle {particle!r} is not defined by Geant4's {PHYSICS}")
        self.gun.gun.SetParticleDefinition(definition)
        energies_gev = np.asarray(energies_gev, dtype=np.float32)
        self.gun.energies_mev = energies_gev.astype(np.float64) * 1e3
        self.scorer.cells = np.zeros((len(energies_gev), self.detector.n_voxels), np.float32)
        g4.G4Random.setTheSeed(seed)
        self.run_manager.BeamOn(len(energies_gev))
        cells = self.scorer.cells.reshape(-1, *self.detector.shape)
        return SparseShowers.from_dense(cells, energies_gev, self.detector, particle)
