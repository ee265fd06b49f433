"""From ``--data CLASS=PATH`` specs to token datasets: select showers, fit the tokenizer, encode.

Shared by ``calofm train`` and the adaptation stages, which differ only in the tokenizer they
start from (fitted here for a new model, the base model's for an adapter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from calofm.data.batches import TokenDataset
from calofm.data.showers import SparseShowers
from calofm.data.subsets import Selection, expand_paths, select_showers
from calofm.detector import DetectorConfig, material_long
from calofm.errors import CalofmError
from calofm.model.config import class_name
from calofm.tokens import Tokenizer, TokenizerConfig, fit_max_mev
from calofm.training.config import PresetDefaults


def parse_data_specs(specs: list[str]) -> dict[str, list[str]]:
    """``["G4_W:gamma=a.h5", "W:gamma=b*.h5"]`` -> ``{"G4_W:gamma": ["a.h5", "b*.h5"]}``.

    Classes keep the order of their first appearance (it fixes the class ids).
    """
    out: dict[str, list[str]] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        material, colon, particle = name.partition(":")
        if not sep or not colon or not material or not particle or not path:
            raise CalofmError(
                f"--data {spec!r}: expected MATERIAL:particle=PATH, e.g. G4_W:gamma=showers.h5"
            )
        out.setdefault(class_name(material, particle), []).append(path)
    return out


@dataclass
class ClassData:
    name: str
    selection: Selection


def load_classes(
    specs: dict[str, list[str]],
    *,
    n_train: int | None,
    val_fraction: float,
    seed: int,
    repeat: int = 0,
) -> list[ClassData]:
    """Select each class's training and validation showers; files must agree with their class."""
    out = []
    detector = None
    for name, patterns in specs.items():
        material, particle = name.split(":")
        paths = expand_paths(patterns)
        sel = select_showers(
            paths, n_train=n_train, val_fraction=val_fraction, seed=seed, repeat=repeat
        )
        meta = sel.train.metadata
        if meta.get("material") and material_long(str(meta["material"])) != material:
            raise CalofmError(f"{paths[0]}: holds {meta['material']} showers, not {material}")
        if meta.get("particle") and meta["particle"] != particle:
            raise CalofmError(f"{paths[0]}: holds {meta['particle']} showers, not {particle}")
        for part in (sel.train, sel.val):
            part.detector = part.detector.with_material(material)
            part.particle = particle
        geometry = {k: v for k, v in sel.train.detector.to_dict().items() if k != "material"}
        if detector is not None and geometry != detector:
            raise CalofmError(f"{paths[0]}: detector geometry differs from the other classes'")
        detector = geometry
        out.append(ClassData(name, sel))
    return out


def fit_tokenizer(
    train: list[SparseShowers],
    detector: DetectorConfig,
    defaults: PresetDefaults,
    *,
    scheme: str | None = None,
    n_bins: int | None = None,
    max_hits: int | None = None,
    incident_range: tuple[float, float] | None = None,
) -> TokenizerConfig:
    """A tokenizer for a new model: preset defaults, overridden by flags, edges from the data.

    The top energy edge comes from the largest training cell (``fit_max_mev``), the incident range
    from the training showers rounded outwards to whole GeV, unless given.
    """
    threshold = TokenizerConfig.threshold_mev
    energies = np.concatenate([s.energies for s in train])
    max_mev = fit_max_mev(energies[energies > threshold])
    if incident_range is None:
        incident = np.concatenate([s.incident for s in train])
        lo, hi = math.floor(float(incident.min())), math.ceil(float(incident.max()))
        incident_range = (max(lo, 1e-3), hi if hi > lo else lo + 1)
    lo, hi = incident_range
    scheme = scheme or defaults.energy_scheme
    kwargs = {
        "max_mev": max_mev,
        "max_hits": max_hits or defaults.max_hits,
        "incident_min_gev": float(lo),
        "incident_max_gev": float(hi),
    }
    bins = n_bins or defaults.energy_bins
    if scheme == "linear" and bins is None:
        return TokenizerConfig.linear(detector, bin_kev=defaults.bin_kev, **kwargs)
    if bins is None:
        raise CalofmError(f"the {scheme} energy scheme needs a number of bins (--energy-bins)")
    return TokenizerConfig.for_detector(detector, scheme=scheme, n_bins=bins, **kwargs)


def build_datasets(
    classes: list[ClassData], tokenizer: Tokenizer, class_names: list[str]
) -> tuple[TokenDataset, TokenDataset]:
    """Training and validation token datasets over all classes."""
    train = TokenDataset([(c.name, c.selection.train) for c in classes], tokenizer, class_names)
    val = TokenDataset([(c.name, c.selection.val) for c in classes], tokenizer, class_names)
    return train, val
