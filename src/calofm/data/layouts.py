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
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def open_file(path: str | os.PathLike[str]) -> Iterator[h5py.File]:
    """The file open for reading; HDF5 failing to read it (a damaged file whose header is
    intact) is one error line naming the file, wherever in the ``with`` block it happens."""
    path = Path(path)
    if not path.exists():
        raise CalofmError(f"{path}: no such file")
    if path.is_dir():
        raise CalofmError(f"{path}: is a directory, expected an HDF5 shower file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise CalofmError(f"{path}: not a readable HDF5 file ({exc.__class__.__name__})") from None
    try:
        with f:
            yield f
    except OSError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise CalofmError(
            f"{path}: damaged HDF5 file, its data cannot be read ({reason})"
        ) from None


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
        if not isinstance(meta, dict):
            raise CalofmError(f"{path}: malformed calofm metadata attribute (not a JSON object)")
    for key in ("material", "particle", "seed", "simulator", "geometry"):
        if key not in meta and key in f.attrs:
            value = f.attrs[key]
            if isinstance(value, (bytes, str)):  # np.bytes_ too: fixed-length strings of h5py
                meta[key] = attr_str(f.attrs, key)
            else:
                meta[key] = value.item() if hasattr(value, "item") else value
    material = material_long(str(meta.get("material", "G4_W")))
    detector = (
        _detector(meta["detector"], path)
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
        if (
            layers.ndim != 4
            or energy.ndim not in (1, 2)
            or energy.shape[1:] not in ((), (1,))
            or layers.shape[0] != energy.shape[0]
        ):
            raise CalofmError(
                f"{path}: 'layers' must be (N, layer, x, y) with one energy per shower"
            )
        if not (_numeric(layers) and _numeric(energy)):
            raise CalofmError(f"{path}: 'layers' and 'energy' must hold numbers")
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
        n = _check_showerdata(f, path)
        particle = meta.get("particle")
        if not particle and "pdg" in f:
            pdg = f["pdg"]
            if not _numeric(pdg) or pdg.ndim != 1:
                raise CalofmError(f"{path}: 'pdg' must be a list of PDG codes")
            try:
                particle = particle_from_pdg(int(pdg[0])) if pdg.shape[0] else None
            except CalofmError as exc:
                raise CalofmError(f"{path}: {exc}") from None
        return ShowerFileInfo(path, "showerdata", n, detector, str(particle or "gamma"), meta)

    raise CalofmError(
        f"{path}: unknown layout (expected a showerdata file or a getting_high '30x30' group)"
    )


def _detector(config: object, path: Path) -> DetectorConfig:
    """The detector config stored in a file's metadata, or one error line saying what is wrong."""
    if not isinstance(config, dict):
        raise CalofmError(f"{path}: malformed detector config in the calofm metadata")
    try:
        return DetectorConfig.from_dict(config)
    except CalofmError as exc:
        raise CalofmError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CalofmError(
            f"{path}: malformed detector config in the calofm metadata ({exc})"
        ) from None


def _numeric(dataset: object) -> bool:
    return isinstance(dataset, h5py.Dataset) and dataset.dtype.kind in "fiu"


def _check_showerdata(f: h5py.File, path: Path) -> int:
    """The number of showers of a showerdata file, once its datasets are seen to agree: one row
    of points, one incident energy and one point count per shower, points of (x, y, z, E)."""
    showers, energies, num_points = f["showers"], f["energies"], f["num_points"]
    if not isinstance(showers, h5py.Dataset) or showers.ndim != 1:
        raise CalofmError(f"{path}: 'showers' must be one row of points per shower")
    if (
        not _numeric(energies)
        or energies.ndim not in (1, 2)
        or energies.shape[1:] not in ((), (1,))
    ):
        raise CalofmError(f"{path}: 'energies' must be one incident energy per shower")
    if not _numeric(num_points) or num_points.dtype.kind == "f" or num_points.ndim != 1:
        raise CalofmError(f"{path}: 'num_points' must be one whole number per shower")
    n = int(energies.shape[0])
    if showers.shape[0] != n or num_points.shape[0] != n:
        raise CalofmError(
            f"{path}: {showers.shape[0]} showers, {n} incident energies and "
            f"{num_points.shape[0]} point counts; showerdata needs one of each per shower"
        )
    if "shape" in f:
        shape = f["shape"]
        if not _numeric(shape) or shape.shape != (3,) or int(shape[2]) < 4:
            raise CalofmError(f"{path}: 'shape' must be (N, max points, 4 or more values a point)")
    return n


def getting_high_group(f: h5py.File, path: Path) -> h5py.Group:
    for key in f.keys():
        if isinstance(f[key], h5py.Group) and "layers" in f[key]:
            return f[key]
    raise CalofmError(f"{path}: getting_high layout needs a group with a 'layers' dataset")
