"""The calorimeter description: one object, saved with every data set and model.

Nothing else in calofm hard-codes the grid size or the number of voxels; they are derived here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import ClassVar

import numpy as np

from calofm.configs import FromDict
from calofm.errors import CalofmError

# Radiation lengths (mm) of Geant4 NIST materials, used only for derived depths in X0.
# Source: Geant4 11.4 NIST material table.
RADIATION_LENGTH_MM = {
    "G4_W": 3.504,
    "G4_Ta": 4.094,
    "G4_Pb": 5.613,
    "G4_Au": 3.344,
    "G4_Pt": 3.054,
    "G4_U": 3.166,
    "G4_Cu": 14.36,
    "G4_Fe": 17.57,
    "G4_Si": 93.66,
}

# Critical energies (MeV, Rossi definition, PDG) used by the physics sanity checks.
CRITICAL_ENERGY_MEV = {
    "G4_W": 7.97,
    "G4_Ta": 8.48,
    "G4_Pb": 7.43,
    "G4_Au": 7.53,
    "G4_Pt": 7.59,
    "G4_U": 6.65,
    "G4_Cu": 19.42,
    "G4_Fe": 21.68,
}


def _default_absorbers() -> list[float]:
    return [2.1] * 20 + [4.2] * 10


@dataclass(frozen=True)
class DetectorConfig(FromDict):
    """A sampling ECAL: absorber plates each followed by a silicon plane segmented into cells.

    Voxel axis order is (layer, x, y); the flat voxel index is ``(layer * nx + x) * ny + y``.
    """

    config_name: ClassVar[str] = "detector"

    absorber_mm: tuple[float, ...] = field(default_factory=lambda: tuple(_default_absorbers()))
    silicon_mm: float = 0.5
    cell_mm: float = 5.0
    nx: int = 30
    ny: int = 30
    material: str = "G4_W"
    axes: str = "layer,x,y"

    def __post_init__(self) -> None:
        object.__setattr__(self, "absorber_mm", tuple(float(t) for t in self.absorber_mm))
        if not self.absorber_mm or any(t <= 0 for t in self.absorber_mm):
            raise CalofmError("detector: absorber thicknesses must be positive and non-empty")
        if self.nx <= 0 or self.ny <= 0 or self.cell_mm <= 0 or self.silicon_mm <= 0:
            raise CalofmError("detector: grid, cell size and silicon thickness must be positive")
        if self.axes != "layer,x,y":
            raise CalofmError(f"detector: unsupported voxel axis order {self.axes!r}")

    @property
    def n_layers(self) -> int:
        return len(self.absorber_mm)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Dense shape of one shower, (layer, x, y)."""
        return (self.n_layers, self.nx, self.ny)

    @property
    def n_voxels(self) -> int:
        return self.n_layers * self.nx * self.ny

    def with_material(self, material: str) -> DetectorConfig:
        return DetectorConfig(**{**asdict(self), "material": material})

    def voxel_to_lxy(self, voxels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Split flat voxel indices into (layer, x, y) cell indices."""
        voxels = np.asarray(voxels, dtype=np.int64)
        layer, rest = np.divmod(voxels, self.nx * self.ny)
        x, y = np.divmod(rest, self.ny)
        return layer, x, y

    def lxy_to_voxel(self, layer: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return (
            np.asarray(layer, np.int64) * self.nx + np.asarray(x, np.int64)
        ) * self.ny + np.asarray(y, np.int64)

    def cell_centres_mm(self) -> tuple[np.ndarray, np.ndarray]:
        """Transverse cell-centre coordinates relative to the grid centre (the beam axis)."""
        x = (np.arange(self.nx) + 0.5 - self.nx / 2) * self.cell_mm
        y = (np.arange(self.ny) + 0.5 - self.ny / 2) * self.cell_mm
        return x, y

    def layer_depth_x0(self) -> np.ndarray:
        """Depth (in radiation lengths) of each silicon plane's front face, absorber plus silicon."""
        x0 = radiation_length_mm(self.material)
        x0_si = RADIATION_LENGTH_MM["G4_Si"]
        per_layer = np.asarray(self.absorber_mm) / x0 + self.silicon_mm / x0_si
        return np.cumsum(per_layer) - self.silicon_mm / x0_si

    def to_dict(self) -> dict:
        d = asdict(self)
        d["absorber_mm"] = list(self.absorber_mm)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DetectorConfig:
        return cls.from_dict(json.loads(text))


def radiation_length_mm(material: str) -> float:
    if material not in RADIATION_LENGTH_MM:
        raise CalofmError(
            f"no radiation length known for {material!r}; known: {sorted(RADIATION_LENGTH_MM)}"
        )
    return RADIATION_LENGTH_MM[material]


def material_short(material: str) -> str:
    """'G4_W' -> 'W', as used in the getting_high file names."""
    return material[3:] if material.startswith("G4_") else material


def material_long(name: str) -> str:
    """'W' -> 'G4_W'; a name that already has the prefix is returned unchanged."""
    return name if name.startswith("G4_") else f"G4_{name}"
