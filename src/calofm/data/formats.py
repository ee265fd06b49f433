"""Shower sets to and from files of either layout (``calofm.data.layouts``): a file's header, its
showers whole, in slices or in chunks, and a whole set written at once. Files are read in slices,
never whole unless asked; a large output is written chunk by chunk (``calofm.data.writers``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from calofm.data.layouts import (
    GEV,
    ShowerFileInfo,
    getting_high_group,
    open_file,
    read_header,
)
from calofm.data.showers import SparseShowers, concatenate, validate_energies
from calofm.data.writers import file_metadata, open_writer
from calofm.errors import CalofmError


def file_info(path: str | os.PathLike[str]) -> ShowerFileInfo:
    with open_file(path) as f:
        return read_header(f, Path(path))


def read_showers(
    path: str | os.PathLike[str], start: int = 0, stop: int | None = None
) -> SparseShowers:
    """Read showers ``start:stop`` of a file in either format."""
    path = Path(path)
    with open_file(path) as f:
        info = read_header(f, path)
        stop = info.n if stop is None else min(stop, info.n)
        start = max(0, min(start, stop))
        if info.format == "getting_high":
            group = getting_high_group(f, path)
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
    with open_file(path) as f:
        info = read_header(f, path)
        if info.format == "getting_high":
            incident = getting_high_group(f, path)["energy"][:]
        else:
            incident = f["energies"][:]
    incident = np.asarray(incident, dtype=np.float64).reshape(-1)
    validate_energies(incident, f"{path}: incident energies")
    return incident


def _read_showerdata(f: h5py.File, info: ShowerFileInfo, start: int, stop: int) -> SparseShowers:
    return showers_from_rows(
        info,
        f["showers"][start:stop],
        f["num_points"][start:stop],
        f["energies"][start:stop],
        showerdata_width(f),
        start,
    )


def showerdata_width(f: h5py.File) -> int:
    """Numbers per point of a showerdata file's rows (x, y, layer, energy[, time])."""
    return int(f["shape"][2]) if "shape" in f else 4


def showers_from_rows(
    info: ShowerFileInfo,
    rows: np.ndarray,
    num_points: np.ndarray,
    energies: np.ndarray,
    width: int,
    start: int = 0,
) -> SparseShowers:
    """Showers ``start:`` of a showerdata file from its datasets' rows as read (``showers``,
    ``num_points``, ``energies``), checked: NaN or negative energies, point counts that disagree
    with the rows and points outside the grid are refused with the file and shower named."""
    det = info.detector
    num_points = num_points.astype(np.int64)
    incident = energies.reshape(-1).astype(np.float32)
    validate_energies(incident, f"{info.path}: incident energies")
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    wrong = np.flatnonzero((num_points < 0) | (num_points * width > lengths))
    if len(wrong):
        i = int(wrong[0])
        raise CalofmError(
            f"{info.path}: shower {start + i} has {lengths[i] // width} points, but its "
            f"num_points says {num_points[i]}"
        )
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
    try:
        return SparseShowers(
            offsets=np.concatenate([[0], np.cumsum(num_points)]),
            voxels=det.lxy_to_voxel(layer, ix, iy).astype(np.int32),
            energies=energy.astype(np.float32),
            incident=incident,
            detector=det,
            particle=info.particle,
            metadata=info.metadata,
        )
    except CalofmError as exc:  # point counts that disagree with the rows of points
        raise CalofmError(f"{info.path}: {exc}") from None


def iter_showers(
    path: str | os.PathLike[str], chunk_size: int = 1000, limit: int | None = None
) -> Iterator[SparseShowers]:
    """Stream a file in chunks so that a large file is never loaded whole."""
    n = file_info(path).n if limit is None else min(limit, file_info(path).n)
    for start in range(0, n, chunk_size):
        yield read_showers(path, start, min(start + chunk_size, n))


def read_all(path: str | os.PathLike[str], limit: int | None = None) -> SparseShowers:
    return concatenate(list(iter_showers(path, limit=limit)))


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
