"""Token vocabularies: a shower becomes two parallel sequences, voxels and binned energies.

Spatial ids ``0 .. n_voxels-1`` are flat voxel indices; energy ids ``0 .. n_bins-1`` are energy bins.
Each vocabulary then has SOS, EOS and PAD, in that order. Hits below ``threshold_mev`` are dropped,
identically for training, generation and evaluation (it is also the lower edge of bin 0).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import ClassVar

import numpy as np

from calofm.configs import FromDict
from calofm.data.showers import SparseShowers
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError

SCHEMES = ("linear", "log")


@dataclass(frozen=True)
class TokenizerConfig(FromDict):
    """Everything needed to turn showers into tokens and back; saved with every model."""

    config_name: ClassVar[str] = "tokens"

    n_voxels: int = 27000
    scheme: str = "linear"
    n_bins: int = 49929  # linear: 1.4 keV bins from 0.1 to 70 MeV
    threshold_mev: float = 0.1
    max_mev: float = 70.0
    max_hits: int = 1200
    incident_min_gev: float = 10.0
    incident_max_gev: float = 100.0

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise CalofmError(f"tokens: unknown energy scheme {self.scheme!r}; choose {SCHEMES}")
        if self.n_voxels <= 0 or self.n_bins <= 0 or self.max_hits <= 0:
            raise CalofmError("tokens: vocabulary sizes and max_hits must be positive")
        if not 0 < self.threshold_mev < self.max_mev:
            raise CalofmError("tokens: need 0 < threshold_mev < max_mev")
        if not 0 < self.incident_min_gev < self.incident_max_gev:
            raise CalofmError("tokens: need 0 < incident_min_gev < incident_max_gev")

    @classmethod
    def for_detector(cls, detector: DetectorConfig, **kwargs: object) -> TokenizerConfig:
        return cls(n_voxels=detector.n_voxels, **kwargs)  # type: ignore[arg-type]

    @classmethod
    def linear(
        cls, detector: DetectorConfig, bin_kev: float = 1.4, **kwargs: float
    ) -> TokenizerConfig:
        """The paper's scheme: linear bins of ``bin_kev`` between the threshold and ``max_mev``."""
        lo = float(kwargs.get("threshold_mev", cls.threshold_mev))
        hi = float(kwargs.get("max_mev", cls.max_mev))
        n_bins = int(np.ceil((hi - lo) / (bin_kev * 1e-3)))
        return cls(n_voxels=detector.n_voxels, scheme="linear", n_bins=n_bins, **kwargs)  # type: ignore[arg-type]

    # Special tokens follow the regular ids.
    @property
    def spatial_sos(self) -> int:
        return self.n_voxels

    @property
    def spatial_eos(self) -> int:
        return self.n_voxels + 1

    @property
    def spatial_pad(self) -> int:
        return self.n_voxels + 2

    @property
    def spatial_vocab(self) -> int:
        return self.n_voxels + 3

    @property
    def energy_sos(self) -> int:
        return self.n_bins

    @property
    def energy_eos(self) -> int:
        return self.n_bins + 1

    @property
    def energy_pad(self) -> int:
        return self.n_bins + 2

    @property
    def energy_vocab(self) -> int:
        return self.n_bins + 3

    @property
    def seq_len(self) -> int:
        """Tokens per stream for the longest allowed shower: SOS + hits + EOS."""
        return self.max_hits + 2

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def fit_max_mev(energies: np.ndarray, margin: float = 1.25, step: float = 5.0) -> float:
    """An upper bin edge from data: the largest cell energy times ``margin``, rounded up to ``step``.

    With the reference photon data (largest cells about 55 MeV) this gives 70 MeV, so clipping is rare.
    """
    top = float(np.max(energies)) if len(energies) else step
    return float(np.ceil(top * margin / step) * step)


@dataclass
class EncodedShowers:
    """Token sequences in CSR layout (without SOS/EOS), plus what encoding had to change."""

    offsets: np.ndarray  # (N+1,) int64
    spatial: np.ndarray  # (H,) int64 voxel ids
    energy: np.ndarray  # (H,) int64 bin ids
    incident: np.ndarray  # (N,) float32, scaled to [-1, 1]
    n_clipped: int  # hits above max_mev, put into the top bin
    too_long: np.ndarray  # (N,) bool, showers with more than max_hits hits (kept, flagged)

    def __len__(self) -> int:
        return len(self.incident)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


class Tokenizer:
    """Encode showers to tokens and decode tokens to showers, with unbiased energy decoding."""

    def __init__(self, config: TokenizerConfig):
        self.config = config
        c = config
        if c.scheme == "linear":
            self.edges = np.linspace(c.threshold_mev, c.max_mev, c.n_bins + 1)
        else:
            self.edges = np.geomspace(c.threshold_mev, c.max_mev, c.n_bins + 1)

    def encode_energy(self, energies_mev: np.ndarray) -> tuple[np.ndarray, int]:
        """Bin ids for energies above the threshold; energies above ``max_mev`` go to the top bin."""
        e = np.asarray(energies_mev, dtype=np.float64)
        c = self.config
        if c.scheme == "linear":
            bins = np.floor((e - c.threshold_mev) / (c.max_mev - c.threshold_mev) * c.n_bins)
        else:
            bins = np.floor(
                np.log(e / c.threshold_mev) / np.log(c.max_mev / c.threshold_mev) * c.n_bins
            )
        n_clipped = int(np.sum(e >= c.max_mev))
        return np.clip(bins, 0, c.n_bins - 1).astype(np.int64), n_clipped

    def decode_energy(self, bins: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """A uniform draw inside each bin, so that decode(encode(E)) is unbiased."""
        bins = np.asarray(bins, dtype=np.int64)
        lo, hi = self.edges[bins], self.edges[bins + 1]
        return (lo + rng.random(bins.shape) * (hi - lo)).astype(np.float32)

    def scale_incident(self, incident_gev: np.ndarray) -> np.ndarray:
        """Incident energy mapped linearly to [-1, 1] over the configured range."""
        c = self.config
        e = np.asarray(incident_gev, dtype=np.float32)
        return (
            2 * (e - c.incident_min_gev) / (c.incident_max_gev - c.incident_min_gev) - 1
        ).astype(np.float32)

    def encode(self, showers: SparseShowers) -> EncodedShowers:
        """Threshold, order by falling energy (ties by voxel index) and bin a set of showers."""
        if showers.detector.n_voxels != self.config.n_voxels:
            raise CalofmError(
                f"tokens: showers have {showers.detector.n_voxels} voxels, tokenizer expects "
                f"{self.config.n_voxels}"
            )
        s = showers.threshold(self.config.threshold_mev).sorted_by_energy()
        bins, n_clipped = self.encode_energy(s.energies)
        return EncodedShowers(
            offsets=s.offsets,
            spatial=s.voxels.astype(np.int64),
            energy=bins,
            incident=self.scale_incident(s.incident),
            n_clipped=n_clipped,
            too_long=s.n_hits > self.config.max_hits,
        )

    def decode(
        self,
        spatial: list[np.ndarray],
        energy: list[np.ndarray],
        incident_gev: np.ndarray,
        detector: DetectorConfig,
        particle: str,
        rng: np.random.Generator,
    ) -> tuple[SparseShowers, int]:
        """Hits (regular tokens only) to showers; duplicate voxels in a shower are merged.

        Returns the showers and the number of duplicate hits that were merged.
        """
        c = self.config
        counts, voxels, energies, n_dup = [], [], [], 0
        for s, e in zip(spatial, energy, strict=True):
            s = np.asarray(s, dtype=np.int64)
            e = np.asarray(e, dtype=np.int64)
            if np.any((s < 0) | (s >= c.n_voxels)) or np.any((e < 0) | (e >= c.n_bins)):
                raise CalofmError("tokens: special or out-of-range token among the hits")
            mev = self.decode_energy(e, rng)
            uniq, inverse = np.unique(s, return_inverse=True)
            n_dup += len(s) - len(uniq)
            summed = np.zeros(len(uniq), dtype=np.float64)
            np.add.at(summed, inverse, mev)
            order = np.lexsort((uniq, -summed))
            counts.append(len(uniq))
            voxels.append(uniq[order])
            energies.append(summed[order])
        showers = SparseShowers(
            offsets=np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]),
            voxels=np.concatenate(voxels) if voxels else np.zeros(0, np.int32),
            energies=np.concatenate(energies) if energies else np.zeros(0, np.float32),
            incident=np.asarray(incident_gev, dtype=np.float32),
            detector=detector,
            particle=particle,
        )
        return showers, n_dup
