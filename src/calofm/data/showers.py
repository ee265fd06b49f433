"""Sparse showers in memory: the one representation every reader produces and every tool consumes.

Hits are stored flat (CSR layout): shower ``i`` owns ``voxels[offsets[i]:offsets[i+1]]`` and the
matching ``energies``. A flat voxel index follows the detector's (layer, x, y) axis order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError


@dataclass
class SparseShowers:
    """Showers of one class (material from ``detector.material``, plus ``particle``).

    Energies are cell energies in MeV; ``incident`` is the incident energy in GeV.
    """

    offsets: np.ndarray  # (N+1,) int64
    voxels: np.ndarray  # (H,) int32
    energies: np.ndarray  # (H,) float32, MeV
    incident: np.ndarray  # (N,) float32, GeV
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    particle: str = "gamma"
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.voxels = np.asarray(self.voxels, dtype=np.int32)
        self.energies = np.asarray(self.energies, dtype=np.float32)
        self.incident = np.asarray(self.incident, dtype=np.float32).reshape(-1)
        if self.offsets.ndim != 1 or len(self.offsets) != len(self.incident) + 1:
            raise CalofmError("showers: offsets must have one entry more than incident energies")
        if (
            self.offsets[0] != 0
            or self.offsets[-1] != len(self.voxels)
            or len(self.voxels) != len(self.energies)
        ):
            raise CalofmError("showers: offsets do not match the number of hits")

    @property
    def material(self) -> str:
        return self.detector.material

    def __len__(self) -> int:
        return len(self.incident)

    @property
    def n_hits(self) -> np.ndarray:
        return np.diff(self.offsets)

    def shower_index(self) -> np.ndarray:
        """For every hit, the index of the shower it belongs to."""
        return np.repeat(np.arange(len(self)), self.n_hits)

    def shower(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.voxels[a:b], self.energies[a:b]

    def select(self, index: np.ndarray | slice) -> SparseShowers:
        """A new set with the showers at ``index`` (in that order)."""
        idx = np.arange(len(self))[index]
        counts = self.n_hits[idx]
        starts = self.offsets[idx]
        hit_idx = np.repeat(
            starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts
        ) + np.arange(counts.sum())
        return SparseShowers(
            offsets=np.concatenate([[0], np.cumsum(counts)]),
            voxels=self.voxels[hit_idx],
            energies=self.energies[hit_idx],
            incident=self.incident[idx],
            detector=self.detector,
            particle=self.particle,
            metadata=dict(self.metadata),
        )

    def threshold(self, mev: float) -> SparseShowers:
        """Keep only hits with energy strictly above ``mev``."""
        keep = self.energies > mev
        counts = np.bincount(self.shower_index()[keep], minlength=len(self))
        return SparseShowers(
            offsets=np.concatenate([[0], np.cumsum(counts)]),
            voxels=self.voxels[keep],
            energies=self.energies[keep],
            incident=self.incident,
            detector=self.detector,
            particle=self.particle,
            metadata=dict(self.metadata),
        )

    def to_dense(self) -> np.ndarray:
        """(N, layer, x, y) float32 array in MeV; duplicate voxels are summed."""
        dense = np.zeros((len(self), self.detector.n_voxels), dtype=np.float32)
        np.add.at(dense, (self.shower_index(), self.voxels), self.energies)
        return dense.reshape((len(self), *self.detector.shape))

    @classmethod
    def from_dense(
        cls,
        cells: np.ndarray,
        incident: np.ndarray,
        detector: DetectorConfig,
        particle: str,
        metadata: dict | None = None,
    ) -> SparseShowers:
        """Build from an (N, layer, x, y) array, keeping every strictly positive cell."""
        cells = np.asarray(cells)
        if cells.ndim != 4 or cells.shape[1:] != detector.shape:
            raise CalofmError(
                f"showers: dense array has shape {cells.shape[1:]}, detector expects {detector.shape}"
            )
        validate_energies(cells, "cell energies")
        flat = cells.reshape(len(cells), detector.n_voxels)
        rows, voxels = np.nonzero(flat > 0)
        counts = np.bincount(rows, minlength=len(cells))
        return cls(
            offsets=np.concatenate([[0], np.cumsum(counts)]),
            voxels=voxels.astype(np.int32),
            energies=flat[rows, voxels].astype(np.float32),
            incident=np.asarray(incident, dtype=np.float32).reshape(-1),
            detector=detector,
            particle=particle,
            metadata=dict(metadata or {}),
        )

    def sorted_by_energy(self) -> SparseShowers:
        """Hits of each shower ordered by falling energy, ties by rising voxel index (deterministic)."""
        order = np.lexsort((self.voxels, -self.energies, self.shower_index()))
        return SparseShowers(
            offsets=self.offsets,
            voxels=self.voxels[order],
            energies=self.energies[order],
            incident=self.incident,
            detector=self.detector,
            particle=self.particle,
            metadata=dict(self.metadata),
        )


def concatenate(parts: list[SparseShowers]) -> SparseShowers:
    """Join showers of the same class and detector."""
    if not parts:
        raise CalofmError("showers: nothing to concatenate")
    first = parts[0]
    for p in parts[1:]:
        if p.detector != first.detector or p.particle != first.particle:
            raise CalofmError(
                "showers: cannot concatenate showers of different classes or detectors"
            )
    counts = np.concatenate([p.n_hits for p in parts])
    return SparseShowers(
        offsets=np.concatenate([[0], np.cumsum(counts)]),
        voxels=np.concatenate([p.voxels for p in parts]),
        energies=np.concatenate([p.energies for p in parts]),
        incident=np.concatenate([p.incident for p in parts]),
        detector=first.detector,
        particle=first.particle,
        metadata=dict(first.metadata),
    )


def validate_energies(values: np.ndarray, what: str) -> None:
    """Reject NaN, infinite or negative energies with one clear message."""
    values = np.asarray(values)
    if values.size == 0:
        return
    if not np.all(np.isfinite(values)):
        raise CalofmError(f"{what} contain NaN or infinite values")
    if np.any(values < 0):
        raise CalofmError(f"{what} contain negative values")
