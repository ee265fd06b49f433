"""Writers that append showers chunk by chunk to ``NAME.partial`` and rename it when complete, so an
interrupted run (Ctrl-C, SIGTERM, even SIGKILL) is resumed by the same command, and a partial file
of other arguments is never silently reused.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from calofm import __version__
from calofm.data.layouts import FORMATS, GEV, META_ATTR, attr_str
from calofm.data.showers import SparseShowers
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.files import partial_path
from calofm.particles import pdg_code


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


class _PartialWriter:
    """A file written in chunks to ``NAME.partial`` and renamed to its final name on ``finish``.

    The partial file records how many showers it holds and a signature of the run that writes it,
    so the same command resumes where an interrupted one stopped; a partial file of another run is
    refused unless ``replace_partial``.
    """

    def __init__(
        self, path: str | os.PathLike[str], n_total: int, signature: str, replace_partial: bool
    ):
        self.path = Path(path)
        self.partial = partial_path(self.path)
        self.n_total = n_total
        self.signature = signature
        if _foreign_partial(self.partial, signature, replace_partial):
            self.partial.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)

    @property
    def n_written(self) -> int:
        with h5py.File(self.partial, "r") as f:
            return int(f.attrs["n_written"])

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


class ShowerWriter(_PartialWriter):
    """Append showers to a showerdata file in chunks; the file gets its final name on ``finish``."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        n_total: int,
        metadata: dict,
        signature: str,
        *,
        replace_partial: bool = False,
    ):
        super().__init__(path, n_total, signature, replace_partial)
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
    def metadata(self) -> dict:
        """The file's calofm metadata as stored so far."""
        with h5py.File(self.partial, "r") as f:
            return json.loads(attr_str(f.attrs, META_ATTR) or "{}")

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


def _showerdata_version() -> str:
    import showerdata

    return showerdata.__version__


class GettingHighWriter(_PartialWriter):
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
        super().__init__(path, n_total, signature, replace_partial)
        self.group = f"{detector.nx}x{detector.ny}"
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
