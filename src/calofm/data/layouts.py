"""The field's two shower-file layouts, recognised and checked from a file's header alone.

- ``showerdata``: the PyPI package's layout (variable-length points x, y, z=layer, E with x/y in mm
  from the beam axis and E in GeV; incident energies in GeV; PDG codes; directions). calofm's own
  files are showerdata files with extra attributes (material, particle, detector config, simulator).
- ``getting_high``: group ``30x30`` with ``energy`` (N, 1) in GeV and dense ``layers`` (N, L, X, Y)
  in MeV, the public ILD photon layout.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import h5py

from calofm.detector import DetectorConfig, material_long
from calofm.errors import CalofmError
from calofm.particles import particle_from_pdg

FORMATS = ("showerdata", "getting_high")
META_ATTR = "calofm"
GEV = 1e-3  # MeV -> GeV


@dataclass
class ShowerFileInfo:
    """What a shower file holds, read from its header without loading the showers."""

    path: Path
    format: str
    n: int
    detector: DetectorConfig
    particle: str
    metadata: dict = field(default_factory=dict)


def open_file(path: str | os.PathLike[str]) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise CalofmError(f"{path}: no such file")
    if path.is_dir():
        raise CalofmError(f"{path}: is a directory, expected an HDF5 shower file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise CalofmError(f"{path}: not a readable HDF5 file ({exc.__class__.__name__})") from None


def attr_str(attrs: h5py.AttributeManager, key: str) -> str | None:
    if key not in attrs:
        return None
    value = attrs[key]
    return value.decode() if isinstance(value, bytes) else str(value)


def read_header(f: h5py.File, path: Path) -> ShowerFileInfo:
    meta: dict = {}
    text = attr_str(f.attrs, META_ATTR)
    if text:
        try:
            meta = json.loads(text)
        except json.JSONDecodeError:
            raise CalofmError(f"{path}: malformed calofm metadata attribute") from None
    for key in ("material", "particle", "seed", "simulator", "geometry"):
        if key not in meta and key in f.attrs:
            value = f.attrs[key]
            if isinstance(value, (bytes, str)):  # np.bytes_ too: fixed-length strings of h5py
                meta[key] = attr_str(f.attrs, key)
            else:
                meta[key] = value.item() if hasattr(value, "item") else value
    material = material_long(str(meta.get("material", "G4_W")))
    detector = (
        DetectorConfig.from_dict(meta["detector"])
        if "detector" in meta
        else DetectorConfig(material=material)
    )
    if detector.material != material:
        detector = detector.with_material(material)

    if any(isinstance(f[k], h5py.Group) and "layers" in f[k] for k in f.keys()):
        group = getting_high_group(f, path)
        layers, energy = group.get("layers"), group.get("energy")
        if not isinstance(layers, h5py.Dataset) or not isinstance(energy, h5py.Dataset):
            raise CalofmError(f"{path}: getting_high layout needs datasets 'layers' and 'energy'")
        if layers.ndim != 4 or layers.shape[0] != energy.shape[0]:
            raise CalofmError(
                f"{path}: 'layers' must be (N, layer, x, y) with one energy per shower"
            )
        if "detector" not in meta:
            n_layers, nx, ny = layers.shape[1:]
            if (n_layers, nx, ny) != detector.shape:
                raise CalofmError(
                    f"{path}: grid {layers.shape[1:]} does not match the detector {detector.shape};"
                    " store the detector config in the file's 'calofm' attribute"
                )
        elif layers.shape[1:] != detector.shape:
            raise CalofmError(f"{path}: grid {layers.shape[1:]} contradicts its detector config")
        particle = str(meta.get("particle", "gamma"))
        return ShowerFileInfo(path, "getting_high", int(energy.shape[0]), detector, particle, meta)

    if "showers" in f and "energies" in f and "num_points" in f:
        pdg = f["pdg"][:1] if "pdg" in f and f["pdg"].shape[0] else None
        particle = str(
            meta.get("particle") or (particle_from_pdg(int(pdg[0])) if pdg is not None else "gamma")
        )
        return ShowerFileInfo(
            path, "showerdata", int(f["energies"].shape[0]), detector, particle, meta
        )

    raise CalofmError(
        f"{path}: unknown layout (expected a showerdata file or a getting_high '30x30' group)"
    )


def getting_high_group(f: h5py.File, path: Path) -> h5py.Group:
    for key in f.keys():
        if isinstance(f[key], h5py.Group) and "layers" in f[key]:
            return f[key]
    raise CalofmError(f"{path}: getting_high layout needs a group with a 'layers' dataset")
