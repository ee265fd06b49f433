"""Readers and writers for the field's shower files.

- ``showerdata``: the PyPI package's layout (variable-length points x, y, z=layer, E with x/y in mm
  from the beam axis and E in GeV; incident energies in GeV; PDG codes; directions). calofm's own
  files are showerdata files with extra attributes (material, particle, detector config, simulator).
- ``getting_high``: group ``30x30`` with ``energy`` (N, 1) in GeV and dense ``layers`` (N, L, X, Y)
  in MeV, the public ILD photon layout.

Files are read in slices, never whole unless asked; writers write under a temporary name.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from calofm import __version__
from calofm.data.showers import SparseShowers, concatenate, validate_energies
from calofm.detector import DetectorConfig, material_long
from calofm.errors import CalofmError
from calofm.files import partial_path
from calofm.particles import particle_from_pdg, pdg_code

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


def _open(path: str | os.PathLike[str]) -> h5py.File:
    path = Path(path)
    if not path.exists():
        raise CalofmError(f"{path}: no such file")
    if path.is_dir():
        raise CalofmError(f"{path}: is a directory, expected an HDF5 shower file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:
        raise CalofmError(f"{path}: not a readable HDF5 file ({exc.__class__.__name__})") from None


def _attr_str(attrs: h5py.AttributeManager, key: str) -> str | None:
    if key not in attrs:
        return None
    value = attrs[key]
    return value.decode() if isinstance(value, bytes) else str(value)


def _header(f: h5py.File, path: Path) -> ShowerFileInfo:
    meta: dict = {}
    text = _attr_str(f.attrs, META_ATTR)
    if text:
        try:
            meta = json.loads(text)
        except json.JSONDecodeError:
            raise CalofmError(f"{path}: malformed calofm metadata attribute") from None
    for key in ("material", "particle", "seed", "simulator", "geometry"):
        if key not in meta and key in f.attrs:
            value = f.attrs[key]
            if isinstance(value, (bytes, str)):  # np.bytes_ too: fixed-length strings of h5py
                meta[key] = _attr_str(f.attrs, key)
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
        group = _getting_high_group(f, path)
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


def _getting_high_group(f: h5py.File, path: Path) -> h5py.Group:
    for key in f.keys():
        if isinstance(f[key], h5py.Group) and "layers" in f[key]:
            return f[key]
    raise CalofmError(f"{path}: getting_high layout needs a group with a 'layers' dataset")


def file_info(path: str | os.PathLike[str]) -> ShowerFileInfo:
    with _open(path) as f:
        return _header(f, Path(path))


def read_showers(
    path: str | os.PathLike[str], start: int = 0, stop: int | None = None
) -> SparseShowers:
    """Read showers ``start:stop`` of a file in either format."""
    path = Path(path)
    with _open(path) as f:
        info = _header(f, path)
        stop = info.n if stop is None else min(stop, info.n)
        start = max(0, min(start, stop))
        if info.format == "getting_high":
            group = _getting_high_group(f, path)
            cells = group["layers"][start:stop]
            incident = group["energy"][start:stop].reshape(-1)
            validate_energies(incident, f"{path}: incident energies")
            try:
                return SparseShowers.from_dense(
                    cells, incident, info.detector, info.particle, info.metadata
                )
            except CalofmError as exc:
                raise CalofmError(f"{path}: {exc}") from None
        return _read_showerdata(f, info, start, stop)


def incident_energies(path: str | os.PathLike[str]) -> np.ndarray:
    """Every shower's incident energy in GeV, read without the showers (to pick one by energy)."""
    path = Path(path)
    with _open(path) as f:
        info = _header(f, path)
        if info.format == "getting_high":
            incident = _getting_high_group(f, path)["energy"][:]
        else:
            incident = f["energies"][:]
    incident = np.asarray(incident, dtype=np.float64).reshape(-1)
    validate_energies(incident, f"{path}: incident energies")
    return incident


def _read_showerdata(f: h5py.File, info: ShowerFileInfo, start: int, stop: int) -> SparseShowers:
    det = info.detector
    rows = f["showers"][start:stop]
    num_points = f["num_points"][start:stop].astype(np.int64)
    incident = f["energies"][start:stop].reshape(-1).astype(np.float32)
    validate_energies(incident, f"{info.path}: incident energies")
    width = int(f["shape"][2]) if "shape" in f else 4
    points = (
        np.concatenate([r[: n * width] for r, n in zip(rows, num_points, strict=True)])
        if len(rows)
        else np.zeros(0)
    )
    points = points.reshape(-1, width)
    ix = np.rint(points[:, 0] / det.cell_mm - 0.5 + det.nx / 2).astype(np.int64)
    iy = np.rint(points[:, 1] / det.cell_mm - 0.5 + det.ny / 2).astype(np.int64)
    layer = np.rint(points[:, 2]).astype(np.int64)
    energy = points[:, 3] / GEV
    validate_energies(energy, f"{info.path}: point energies")
    inside = (
        (ix >= 0)
        & (ix < det.nx)
        & (iy >= 0)
        & (iy < det.ny)
        & (layer >= 0)
        & (layer < det.n_layers)
    )
    if not np.all(inside):
        raise CalofmError(f"{info.path}: {np.sum(~inside)} points lie outside the detector grid")
    return SparseShowers(
        offsets=np.concatenate([[0], np.cumsum(num_points)]),
        voxels=det.lxy_to_voxel(layer, ix, iy).astype(np.int32),
        energies=energy.astype(np.float32),
        incident=incident,
        detector=det,
        particle=info.particle,
        metadata=info.metadata,
    )


def iter_showers(
    path: str | os.PathLike[str], chunk_size: int = 1000, limit: int | None = None
) -> Iterator[SparseShowers]:
    """Stream a file in chunks so that a large file is never loaded whole."""
    n = file_info(path).n if limit is None else min(limit, file_info(path).n)
    for start in range(0, n, chunk_size):
        yield read_showers(path, start, min(start + chunk_size, n))


def read_all(path: str | os.PathLike[str], limit: int | None = None) -> SparseShowers:
    return concatenate(list(iter_showers(path, limit=limit)))


def file_metadata(showers: SparseShowers, **extra: object) -> dict:
    """The calofm attribute written into every file: enough to know what the showers are."""
    meta = {k: v for k, v in showers.metadata.items() if k not in ("detector",)}
    meta.update(extra)
    meta.update(
        material=showers.material,
        particle=showers.particle,
        detector=showers.detector.to_dict(),
        calofm_version=__version__,
    )
    return meta


def _points(showers: SparseShowers) -> tuple[list[np.ndarray], np.ndarray]:
    det = showers.detector
    layer, ix, iy = det.voxel_to_lxy(showers.voxels)
    xs, ys = det.cell_centres_mm()
    pts = np.stack(
        [xs[ix], ys[iy], layer.astype(np.float32), showers.energies * GEV], axis=1
    ).astype(np.float32)
    rows = [
        pts[a:b].reshape(-1) for a, b in zip(showers.offsets[:-1], showers.offsets[1:], strict=True)
    ]
    return rows, showers.n_hits.astype(np.int32)


def _foreign_partial(partial: Path, signature: str, replace: bool) -> bool:
    """Whether the partial file of an output must be started afresh.

    A partial of the same run is kept (the resume point). One left by other arguments is refused
    unless ``replace``: it may hold hours of another run. One that cannot be read (cut short while
    being written, e.g. by SIGKILL) holds nothing recoverable and is started again, with a warning.
    """
    if not partial.exists():
        return False
    try:
        with h5py.File(partial, "r") as f:
            same = f.attrs.get("run_signature") == signature and "n_written" in f.attrs
    except OSError:
        print(
            f"calofm: warning: {partial} cannot be read (it was cut short while being written); "
            "starting that output again",
            file=sys.stderr,
        )
        return True
    if same:
        return False
    if not replace:
        raise CalofmError(
            f"{partial} is an interrupted run made with other arguments; run that command again "
            "to resume it, or add --overwrite to discard it"
        )
    return True


@contextmanager
def _new_partial(partial: Path) -> Iterator[h5py.File]:
    """Create a partial file under a fixed temporary name and rename it once it has its layout
    and signature, so that a kill during its creation never leaves a partial without them."""
    new = partial.with_name(partial.name + ".new")
    try:
        with h5py.File(new, "w") as f:
            yield f
        os.replace(new, partial)
    except BaseException:
        new.unlink(missing_ok=True)
        raise


class ShowerWriter:
    """Append showers to a showerdata file in chunks; the file gets its final name on ``finish``.

    The partial file (``NAME.partial``) records how many showers it holds and a signature of the run
    that writes it, so the same command resumes where an interrupted one stopped; a partial file of
    another run is refused unless ``replace_partial``.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        n_total: int,
        metadata: dict,
        signature: str,
        *,
        replace_partial: bool = False,
    ):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.n_total = n_total
        self.signature = signature
        if _foreign_partial(self.partial, signature, replace_partial):
            self.partial.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.partial.exists():
            vlen = h5py.vlen_dtype(np.dtype("float32"))
            with _new_partial(self.partial) as f:
                f.create_dataset("showers", shape=(n_total,), dtype=vlen)
                f.create_dataset("energies", shape=(n_total, 1), dtype=np.float32)
                f.create_dataset("directions", shape=(n_total, 3), dtype=np.float32)
                f.create_dataset("pdg", shape=(n_total,), dtype=np.int32)
                f.create_dataset("shower_ids", data=np.arange(n_total, dtype=np.int32))
                f.create_dataset("shape", data=np.array([n_total, 0, 4], dtype=np.int32))
                f.create_dataset("num_points", shape=(n_total,), dtype=np.int32)
                f.attrs["showerdata_version"] = _showerdata_version()
                f.attrs[META_ATTR] = json.dumps(metadata, sort_keys=True, default=str)
                f.attrs["material"] = metadata.get("material", "")
                f.attrs["particle"] = metadata.get("particle", "")
                f.attrs["run_signature"] = signature
                f.attrs["n_written"] = 0

    @property
    def n_written(self) -> int:
        with h5py.File(self.partial, "r") as f:
            return int(f.attrs["n_written"])

    @property
    def metadata(self) -> dict:
        """The file's calofm metadata as stored so far."""
        with h5py.File(self.partial, "r") as f:
            return json.loads(_attr_str(f.attrs, META_ATTR) or "{}")

    def append(self, showers: SparseShowers, **metadata: object) -> None:
        """Append showers; ``metadata`` entries are merged into the file's calofm metadata in the
        same write, so the count and the statistics that go with it never disagree."""
        start = self.n_written
        stop = start + len(showers)
        if stop > self.n_total:
            raise CalofmError(f"{self.path}: more showers than announced ({stop} > {self.n_total})")
        rows, num_points = _points(showers)
        merged = {**self.metadata, **metadata} if metadata else None
        with h5py.File(self.partial, "a") as f:
            if merged is not None:
                f.attrs[META_ATTR] = json.dumps(merged, sort_keys=True, default=str)
            if len(showers):
                f["showers"][start:stop] = rows
                f["energies"][start:stop] = showers.incident.reshape(-1, 1)
                directions = np.zeros((len(showers), 3), np.float32)
                directions[:, 2] = 1.0
                f["directions"][start:stop] = directions
                f["pdg"][start:stop] = pdg_code(showers.particle)
                f["num_points"][start:stop] = num_points
                shape = f["shape"][:]
                shape[1] = max(int(shape[1]), int(num_points.max(initial=0)))
                f["shape"][:] = shape
            f.attrs["n_written"] = stop
            f.flush()

    def finish(self) -> Path:
        if self.n_written != self.n_total:
            raise CalofmError(
                f"{self.path}: only {self.n_written} of {self.n_total} showers written"
            )
        with h5py.File(self.partial, "a") as f:
            del f.attrs["run_signature"]
            del f.attrs["n_written"]
        os.replace(self.partial, self.path)
        return self.path


def _showerdata_version() -> str:
    import showerdata

    return showerdata.__version__


class GettingHighWriter:
    """Append showers as dense (N, layer, x, y) MeV arrays to ``NAME.partial``, renamed to the
    final name on ``finish``; like ``ShowerWriter``, the same run resumes its partial file."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        n_total: int,
        metadata: dict,
        detector: DetectorConfig,
        signature: str,
        *,
        replace_partial: bool = False,
    ):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.n_total = n_total
        self.group = f"{detector.nx}x{detector.ny}"
        if _foreign_partial(self.partial, signature, replace_partial):
            self.partial.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial.exists():
            return
        with _new_partial(self.partial) as f:
            g = f.create_group(self.group)
            g.create_dataset("energy", shape=(n_total, 1), dtype=np.float32)
            g.create_dataset(
                "layers",
                shape=(n_total, *detector.shape),
                dtype=np.float32,
                chunks=(1, *detector.shape),
                compression="gzip",
            )
            f.attrs[META_ATTR] = json.dumps(metadata, sort_keys=True, default=str)
            for key in ("material", "particle", "simulator", "seed"):
                if key in metadata:
                    f.attrs[key] = metadata[key]
            f.attrs["run_signature"] = signature
            f.attrs["n_written"] = 0

    @property
    def n_written(self) -> int:
        with h5py.File(self.partial, "r") as f:
            return int(f.attrs["n_written"])

    def append(self, showers: SparseShowers) -> None:
        start = self.n_written
        stop = start + len(showers)
        if stop > self.n_total:
            raise CalofmError(f"{self.path}: more showers than announced ({stop} > {self.n_total})")
        with h5py.File(self.partial, "a") as f:
            f[self.group]["energy"][start:stop] = showers.incident.reshape(-1, 1)
            f[self.group]["layers"][start:stop] = showers.to_dense()
            f.attrs["n_written"] = stop
            f.flush()

    def finish(self) -> Path:
        if self.n_written != self.n_total:
            raise CalofmError(
                f"{self.path}: only {self.n_written} of {self.n_total} showers written"
            )
        with h5py.File(self.partial, "a") as f:
            del f.attrs["run_signature"]
            del f.attrs["n_written"]
        os.replace(self.partial, self.path)
        return self.path


def open_writer(
    path: str | os.PathLike[str],
    fmt: str,
    n_total: int,
    metadata: dict,
    detector: DetectorConfig,
    signature: str,
    *,
    replace_partial: bool = False,
) -> ShowerWriter | GettingHighWriter:
    """A chunk-by-chunk writer for either layout; ``signature`` names the run that may resume."""
    if fmt == "showerdata":
        return ShowerWriter(path, n_total, metadata, signature, replace_partial=replace_partial)
    if fmt == "getting_high":
        return GettingHighWriter(
            path, n_total, metadata, detector, signature, replace_partial=replace_partial
        )
    raise CalofmError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")


def write_showers(
    showers: SparseShowers, path: str | os.PathLike[str], fmt: str = "showerdata", **extra: object
) -> Path:
    """Write a whole set at once in either format (under a temporary name, then renamed).

    The set is in memory, so there is nothing to resume: a partial file at ``path`` is replaced."""
    writer = open_writer(
        path,
        fmt,
        len(showers),
        file_metadata(showers, **extra),
        showers.detector,
        "write-once",
        replace_partial=True,
    )
    for start in range(0, len(showers), 1000):
        writer.append(showers.select(slice(start, start + 1000)))
    return writer.finish()
