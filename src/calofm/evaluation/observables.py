"""Physics observables of showers (the standard ILD ECAL set), vectorised over showers.

Every per-shower quantity is computed with ``np.bincount`` on the CSR hit arrays, never with a
Python loop per shower, and files are read chunk by chunk so only the observables stay in memory.

Conventions (the field's, see ``shared/research/field-standards.md``):
- hits count only strictly above ``threshold_mev`` (0.1 MeV, half a MIP, the tokenizer's threshold),
  the cell-energy spectrum included: a generator cannot make cells below the threshold, so a
  spectrum of Geant4's cells below it would compare something only one sample can have;
- the shower axis is the beam axis at the grid centre; x/y are cell centres in mm from it;
- the longitudinal centre of gravity is in layer units (layer 0 first in the beam);
- a shower without any hit above threshold has centres of gravity 0 (there is nothing to weigh).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

import numpy as np
from tqdm import tqdm

from calofm.data.formats import file_info, iter_showers
from calofm.data.showers import SparseShowers
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.tokens import TokenizerConfig

SCALAR = "scalar"  # one number per shower, histogrammed
PROFILE = "profile"  # one vector per shower (energy per layer or radial bin), drawn as the mean
SPECTRUM = "spectrum"  # one number per cell, histogrammed over all cells of all showers


@dataclass(frozen=True)
class ObservableConfig:
    """What is measured: hit threshold, cell-spectrum binning, incident-energy slices."""

    threshold_mev: float = TokenizerConfig().threshold_mev
    spectrum_min_mev: float = TokenizerConfig().threshold_mev
    spectrum_max_mev: float = 70.0
    spectrum_bins: int = 60
    energy_slices_gev: tuple[tuple[float, float], ...] = ((10.0, 20.0), (45.0, 55.0), (90.0, 100.0))
    slice_observables: tuple[str, ...] = ("energy_sum", "n_hits", "cog_z", "response")

    def __post_init__(self) -> None:
        object.__setattr__(
            self,
            "energy_slices_gev",
            tuple((float(lo), float(hi)) for lo, hi in self.energy_slices_gev),
        )
        if self.threshold_mev < 0:
            raise CalofmError("evaluation: the hit threshold must not be negative")
        if not 0 < self.spectrum_min_mev < self.spectrum_max_mev or self.spectrum_bins < 1:
            raise CalofmError("evaluation: need 0 < spectrum_min_mev < spectrum_max_mev, bins >= 1")
        for lo, hi in self.energy_slices_gev:
            if not 0 <= lo < hi:
                raise CalofmError(f"evaluation: energy slice {lo:g}-{hi:g} GeV needs LO < HI")
        unknown = set(self.slice_observables) - set(SCALAR_LABELS)
        if unknown:
            raise CalofmError(f"evaluation: no scalar observable named {sorted(unknown)}")

    def spectrum_edges(self) -> np.ndarray:
        return np.geomspace(self.spectrum_min_mev, self.spectrum_max_mev, self.spectrum_bins + 1)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def radial_edges_mm(detector: DetectorConfig) -> np.ndarray:
    """Rings one cell wide around the beam axis, the last one still holding the corner cells."""
    xs, ys = detector.cell_centres_mm()
    r_max = float(np.hypot(np.abs(xs).max(), np.abs(ys).max()))
    n_rings = int(np.floor(r_max / detector.cell_mm)) + 1
    return detector.cell_mm * np.arange(n_rings + 1, dtype=np.float64)


@dataclass
class ShowerObservables:
    """Per-shower observables of one sample, plus the spectrum's cell energies (CSR by shower)."""

    incident: np.ndarray  # (N,) GeV
    energy_sum: np.ndarray  # (N,) MeV, visible energy above threshold
    n_hits: np.ndarray  # (N,) hits above threshold
    cog_x: np.ndarray  # (N,) mm
    cog_y: np.ndarray  # (N,) mm
    cog_z: np.ndarray  # (N,) layers
    response: np.ndarray  # (N,) visible / incident energy
    max_cell: np.ndarray  # (N,) MeV, the hottest cell above threshold
    energy_per_layer: np.ndarray  # (N, n_layers) MeV
    radial_profile: np.ndarray  # (N, n_rings) MeV
    cell_offsets: np.ndarray  # (N+1,) into cell_energies
    cell_energies: np.ndarray  # (H,) MeV, every cell above threshold (the spectrum)
    radial_edges: np.ndarray  # (n_rings+1,) mm, the radial profile's bin edges

    def __len__(self) -> int:
        return len(self.incident)

    def select(self, index: np.ndarray) -> ShowerObservables:
        """The showers at ``index`` taken as a set (sorted, no duplicates), cells included."""
        index = np.unique(np.asarray(index, dtype=np.int64))
        counts = np.diff(self.cell_offsets)
        keep = np.zeros(len(self), dtype=bool)
        keep[index] = True
        values = {
            f.name: getattr(self, f.name)[index]
            for f in fields(self)
            if f.name not in ("cell_offsets", "cell_energies", "radial_edges")
        }
        return ShowerObservables(
            **values,
            cell_offsets=np.concatenate([[0], np.cumsum(counts[index])]),
            cell_energies=self.cell_energies[np.repeat(keep, counts)],
            radial_edges=self.radial_edges,
        )

    def in_slice(self, lo_gev: float, hi_gev: float) -> np.ndarray:
        """Indices of the showers with incident energy in [lo, hi) GeV."""
        return np.flatnonzero((self.incident >= lo_gev) & (self.incident < hi_gev))


def compute_observables(showers: SparseShowers, config: ObservableConfig) -> ShowerObservables:
    """All observables of a set of showers, in one vectorised pass over the hits."""
    det = showers.detector
    n, n_layers = len(showers), det.n_layers
    edges = radial_edges_mm(det)
    n_rings = len(edges) - 1

    hits = showers.threshold(config.threshold_mev)
    sid = hits.shower_index()
    e = hits.energies.astype(np.float64)
    layer, ix, iy = det.voxel_to_lxy(hits.voxels)
    xs, ys = det.cell_centres_mm()
    x, y = xs[ix], ys[iy]
    ring = np.minimum(np.digitize(np.hypot(x, y), edges) - 1, n_rings - 1)

    energy_sum = np.bincount(sid, e, minlength=n)
    weight = np.divide(1.0, energy_sum, out=np.zeros(n), where=energy_sum > 0)
    max_cell = np.zeros(n)
    np.maximum.at(max_cell, sid, e)
    incident = showers.incident.astype(np.float64)
    return ShowerObservables(
        incident=incident,
        energy_sum=energy_sum,
        n_hits=hits.n_hits.astype(np.float64),
        cog_x=np.bincount(sid, e * x, minlength=n) * weight,
        cog_y=np.bincount(sid, e * y, minlength=n) * weight,
        cog_z=np.bincount(sid, e * layer, minlength=n) * weight,
        response=np.divide(energy_sum, incident * 1e3, out=np.zeros(n), where=incident > 0),
        max_cell=max_cell,
        energy_per_layer=np.bincount(sid * n_layers + layer, e, minlength=n * n_layers).reshape(
            n, n_layers
        ),
        radial_profile=np.bincount(sid * n_rings + ring, e, minlength=n * n_rings).reshape(
            n, n_rings
        ),
        cell_offsets=hits.offsets.copy(),
        cell_energies=hits.energies,
        radial_edges=edges,
    )


def concatenate_observables(parts: list[ShowerObservables]) -> ShowerObservables:
    if not parts:
        raise CalofmError("evaluation: no observables to concatenate")
    values = {
        f.name: np.concatenate([getattr(p, f.name) for p in parts])
        for f in fields(ShowerObservables)
        if f.name not in ("cell_offsets", "radial_edges")
    }
    counts = np.concatenate([np.diff(p.cell_offsets) for p in parts])
    values["cell_offsets"] = np.concatenate([[0], np.cumsum(counts)])
    return ShowerObservables(**values, radial_edges=parts[0].radial_edges)


def read_observables(
    path: str | os.PathLike[str],
    config: ObservableConfig,
    max_showers: int | None = None,
    chunk_size: int = 500,
    progress: bool = True,
) -> ShowerObservables:
    """Observables of (the first ``max_showers``) showers of a file, read chunk by chunk."""
    info = file_info(path)
    n = info.n if max_showers is None else min(info.n, max_showers)
    if n == 0:
        raise CalofmError(f"{path}: holds no showers")
    parts = []
    desc = f"observables {info.path.name}"
    with tqdm(total=n, desc=desc, unit="shower", disable=None if progress else True) as bar:
        for chunk in iter_showers(path, chunk_size=chunk_size, limit=n):
            parts.append(compute_observables(chunk, config))
            bar.update(len(chunk))
    return concatenate_observables(parts)


SCALAR_LABELS = {
    "energy_sum": "visible energy sum [MeV]",
    "n_hits": "number of hits",
    "cog_z": "longitudinal centre of gravity [layer]",
    "cog_x": "centre of gravity x [mm]",
    "cog_y": "centre of gravity y [mm]",
    "response": "response (visible / incident energy)",
}
SCALAR_TITLES = {
    "energy_sum": "Visible energy",
    "n_hits": "Number of hits",
    "cog_z": "Longitudinal centre of gravity",
    "cog_x": "Centre of gravity in x",
    "cog_y": "Centre of gravity in y",
    "response": "Response",
}


@dataclass(frozen=True)
class Observable:
    """One row of the report: which quantity, of which showers, and how it is drawn."""

    name: str  # key in metrics.json and the PNG's file stem
    label: str  # x-axis title
    kind: str  # SCALAR, PROFILE or SPECTRUM
    attr: str  # the ShowerObservables field it reads
    energy_slice: tuple[float, float] | None = None
    integer: bool = False  # integer-valued scalars get integer-aligned bins
    log_x: bool = False
    log_y: bool = False
    title: str = ""  # in words, for readers who do not know the code names; default: the label
    symmetric: bool = False  # a range symmetric about 0 (transverse centres of gravity)

    @property
    def heading(self) -> str:
        return self.title or self.label

    def values(self, obs: ShowerObservables) -> np.ndarray:
        """Per-shower values (N,), per-shower profiles (N, K), or every cell energy (H,).

        Slices select showers by incident energy; only scalar observables are sliced.
        """
        values = getattr(obs, self.attr)
        return values if self.energy_slice is None else values[obs.in_slice(*self.energy_slice)]


def observable_list(config: ObservableConfig) -> list[Observable]:
    """Every observable of the report, in report order."""
    lo, hi = config.spectrum_min_mev, config.spectrum_max_mev

    def scalar(name: str, **kwargs: object) -> Observable:
        return Observable(
            name, SCALAR_LABELS[name], SCALAR, name, title=SCALAR_TITLES[name], **kwargs
        )

    items = [
        Observable(
            "cell_energy",
            f"cell energy [MeV] (cells above {config.threshold_mev:g} MeV, {lo:g}-{hi:g} MeV)",
            SPECTRUM,
            "cell_energies",
            log_x=True,
            log_y=True,
            title="Cell energy spectrum",
        ),
        scalar("energy_sum"),
        scalar("n_hits", integer=True),
        scalar("cog_z"),
        Observable(
            "energy_per_layer",
            "layer",
            PROFILE,
            "energy_per_layer",
            log_y=True,
            title="Mean energy per layer",
        ),
        Observable(
            "radial_profile",
            "radius [mm]",
            PROFILE,
            "radial_profile",
            log_y=True,
            title="Mean radial energy profile",
        ),
        scalar("cog_x", symmetric=True),
        scalar("cog_y", symmetric=True),
        scalar("response"),
    ]
    for e_lo, e_hi in config.energy_slices_gev:
        for name in config.slice_observables:
            items.append(
                Observable(
                    f"{name}_{e_lo:g}-{e_hi:g}GeV",
                    f"{SCALAR_LABELS[name]}, incident {e_lo:g}-{e_hi:g} GeV",
                    SCALAR,
                    name,
                    energy_slice=(e_lo, e_hi),
                    integer=name == "n_hits",
                    title=f"{SCALAR_TITLES[name]}, incident energy {e_lo:g}-{e_hi:g} GeV",
                    symmetric=name in ("cog_x", "cog_y"),
                )
            )
    return items


def classifier_features(obs: ShowerObservables) -> tuple[np.ndarray, list[str]]:
    """High-level features per shower for the classifier test, and their names.

    Energy per layer and per ring enter as fractions of the visible energy, so they describe the
    shape; the scale is carried by the energy sum and the incident energy.
    """
    total = np.where(obs.energy_sum > 0, obs.energy_sum, 1.0)[:, None]
    mean_cell = np.divide(obs.energy_sum, obs.n_hits, out=np.zeros(len(obs)), where=obs.n_hits > 0)
    columns = [
        ("incident_gev", obs.incident),
        ("energy_sum", obs.energy_sum),
        ("n_hits", obs.n_hits),
        ("response", obs.response),
        ("mean_cell_energy", mean_cell),
        ("max_cell_energy", obs.max_cell),
        ("cog_x", obs.cog_x),
        ("cog_y", obs.cog_y),
        ("cog_z", obs.cog_z),
    ]
    layers = obs.energy_per_layer / total
    rings = obs.radial_profile / total
    names = [c[0] for c in columns]
    names += [f"layer_fraction_{i:02d}" for i in range(layers.shape[1])]
    names += [f"ring_fraction_{i:02d}" for i in range(rings.shape[1])]
    matrix = np.column_stack([c[1] for c in columns] + [layers, rings])
    return matrix, names
