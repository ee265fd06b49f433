"""Join shower files of independent jobs (an array of ``calofm simulate`` jobs) into one file.

The showers are copied as stored, bit for bit, in the order of their seeds and offsets, so jobs
with seed offsets 0, n, 2n, ... merge into exactly the file one run of their total would have
written (its showers; the metadata lists the parts), whatever order they are given in. Files are joined only when they describe the same showers: the same detector, material,
particle and simulator (or the same model, adapters and sampling for generated files), and never
the same showers twice (the same seed and overlapping offsets).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from calofm.data.formats import file_info, showerdata_width, showers_from_rows
from calofm.data.layouts import META_ATTR, ShowerFileInfo, open_file
from calofm.errors import CalofmError
from calofm.files import atomic_output

COPY_ROWS = 1000  # showers copied at a time, so a large file is never held whole
DATASETS = ("showers", "energies", "directions", "pdg", "num_points")
# What must agree for two files to hold showers of the same kind (per part: seed, offset, n,
# energy range, statistics and paths may differ).
SIMULATION_KEYS = ("simulator", "physics_note", "tables_version", "chunk_size")
GENERATOR_KEYS = ("program", "model_sha256", "adapters", "class", "sampling", "max_hits")


@dataclass(frozen=True)
class Part:
    """One input file: its header and the range of its run's showers that it holds."""

    info: ShowerFileInfo

    @property
    def meta(self) -> dict:
        return self.info.metadata

    @property
    def seed(self) -> int | None:
        generator = self.meta.get("generator") or {}
        return generator.get("seed", self.meta.get("seed"))

    @property
    def first(self) -> int:
        return int(self.meta.get("offset", 0))

    @property
    def rows(self) -> range:
        return range(self.first, self.first + self.info.n)

    def kind(self) -> dict:
        """Everything that must be equal across the parts of one merged file."""
        generator = self.meta.get("generator") or {}
        return {
            "material": self.info.detector.material,
            "particle": self.info.particle,
            "detector": self.info.detector.to_dict(),
            **{k: self.meta.get(k) for k in SIMULATION_KEYS},
            "generator": {k: generator.get(k) for k in GENERATOR_KEYS} if generator else None,
        }


def _parts(paths: list[Path]) -> list[Part]:
    if len(paths) < 2:
        raise CalofmError("merge: give at least two shower files")
    resolved = [p.resolve() for p in paths]
    for i, p in enumerate(resolved):
        if p in resolved[:i]:
            raise CalofmError(f"{paths[i]}: given twice (its showers would be in the output twice)")
    parts = []
    for path in paths:
        info = file_info(path)
        if info.format != "showerdata":
            raise CalofmError(
                f"{path}: a {info.format} file; merge joins showerdata files (calofm convert "
                f"{path} --to showerdata first)"
            )
        with open_file(path) as f:
            missing = [name for name in DATASETS if name not in f]
        if missing:
            raise CalofmError(
                f"{path}: lacks the dataset {missing[0]!r} that merge copies (calofm convert "
                f"{path} --to showerdata writes a complete file)"
            )
        parts.append(Part(info))
    return parts


def _difference(a: dict, b: dict) -> str:
    keys = [k for k in a if a[k] != b.get(k)]
    return ", ".join(f"{k} {a[k]!r} vs {b.get(k)!r}" for k in keys if k != "detector") or (
        "detector geometry"
    )


def check_compatible(parts: list[Part]) -> None:
    """Refuse parts of different kinds, and parts that hold the same showers."""
    first = parts[0]
    for part in parts[1:]:
        if part.kind() != first.kind():
            raise CalofmError(
                f"{part.info.path} and {first.info.path} hold different showers "
                f"({_difference(first.kind(), part.kind())}); merge joins jobs of one kind"
            )
    for i, a in enumerate(parts):
        for b in parts[:i]:
            overlap = range(max(a.first, b.first), min(a.rows.stop, b.rows.stop))
            if a.seed is not None and a.seed == b.seed and len(overlap):
                raise CalofmError(
                    f"{a.info.path} and {b.info.path} both hold showers {overlap.start}.."
                    f"{overlap.stop - 1} of seed {a.seed} (the same showers twice); give the "
                    "jobs different --offset values (or seeds)"
                )


def merged_metadata(parts: list[Part]) -> dict:
    """The first part's metadata for the whole: the total count, the energy range spanned, the
    parts listed; the seed (and offset) stay only when the parts are one run's consecutive jobs."""
    meta = dict(parts[0].meta)
    meta.pop("offset", None)
    n = sum(p.info.n for p in parts)
    meta["n"] = n
    ranges = [p.meta["energy_range_gev"] for p in parts if "energy_range_gev" in p.meta]
    if len(ranges) == len(parts):
        meta["energy_range_gev"] = [min(r[0] for r in ranges), max(r[1] for r in ranges)]
    consecutive = all(
        b.seed == a.seed and b.first == a.rows.stop for a, b in zip(parts, parts[1:], strict=False)
    )
    if consecutive:
        if parts[0].first:
            meta["offset"] = parts[0].first
    else:
        meta.pop("seed", None)
    stats = [p.meta.get("generation_stats") for p in parts]
    if all(isinstance(s, dict) for s in stats):
        meta["generation_stats"] = {k: sum(s.get(k, 0) for s in stats) for k in stats[0]}
    meta["merged_from"] = [
        {
            "file": str(p.info.path),
            "n": p.info.n,
            "seed": p.seed,
            "offset": p.first,
            "energy_range_gev": p.meta.get("energy_range_gev"),
        }
        for p in parts
    ]
    return meta


def _copy(parts: list[Part], out: h5py.File, meta: dict) -> None:
    n = meta["n"]
    with h5py.File(parts[0].info.path, "r") as f:
        for name in DATASETS:
            src = f[name]
            out.create_dataset(name, shape=(n, *src.shape[1:]), dtype=src.dtype)
        for key, value in f.attrs.items():
            out.attrs[key] = value
    out.create_dataset("shower_ids", data=np.arange(n, dtype=np.int32))
    width, start = 0, 0
    for part in parts:
        with h5py.File(part.info.path, "r") as f:
            for first in range(0, part.info.n, COPY_ROWS):
                last = min(first + COPY_ROWS, part.info.n)
                chunk = {name: f[name][first:last] for name in DATASETS}
                rows, counts, energies = chunk["showers"], chunk["num_points"], chunk["energies"]
                # NaN, negative or malformed: refused before a row is written
                showers_from_rows(part.info, rows, counts, energies, showerdata_width(f), first)
                for name in DATASETS:
                    out[name][start + first : start + last] = chunk[name]
            width = max(width, int(f["shape"][1]) if "shape" in f else 0)
        start += part.info.n
    out.create_dataset("shape", data=np.array([n, width, 4], dtype=np.int32))
    out.attrs[META_ATTR] = json.dumps(meta, sort_keys=True, default=str)


def merge_files(
    inputs: list[str | os.PathLike[str]], out: str | os.PathLike[str]
) -> tuple[Path, dict]:
    """Write the showers of ``inputs`` to ``out`` (atomically), ordered by seed and offset so
    that the order the files are given in (a shell glob: job1, job10, job2...) does not matter;
    return the output's metadata.

    The caller checks ``out`` (exists, --overwrite) first; ``out`` must not be one of the inputs.
    """
    out = Path(out)
    parts = _parts([Path(p) for p in inputs])
    if any(p.info.path.resolve() == out.resolve() for p in parts):
        raise CalofmError(f"--out {out}: is one of the inputs; choose another name")
    check_compatible(parts)
    parts.sort(key=lambda p: (p.seed is None, p.seed or 0, p.first))  # any shell glob order
    meta = merged_metadata(parts)
    with atomic_output(out) as tmp:
        with h5py.File(tmp, "w") as f:
            _copy(parts, f, meta)
    return out, meta
