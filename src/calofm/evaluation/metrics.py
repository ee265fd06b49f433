"""Distances between a candidate sample and the Geant4 reference, and the floor they are judged by.

Three measures, as in the field (``shared/research/field-standards.md``):
- **W1 x 100** on standardised observables (CaloClouds II): values minus the reference mean,
  divided by the reference standard deviation (both from the whole reference sample), then
  ``scipy.stats.wasserstein_distance``. For a profile (energy per layer, per radial ring) the
  per-shower energy in each bin is one such observable and the W1 is averaged over the bins; for
  the cell-energy spectrum the cells inside the plotted range are the values.
- **Separation power** S = 1/2 sum (h1 - h2)^2 / (h1 + h2) on the unit-normalised histograms that
  the report draws (for a profile: the mean profile, the energy-weighted layer/radius histogram).
- **Classifier AUC**: a HistGradientBoostingClassifier told to separate candidate from reference
  showers on high-level features, stratified k-fold, equal class counts; 0.5 = indistinguishable.

Batch convention (the floor): ``n_splits`` random splits of the reference into halves A and B of
``n`` showers each. In every split the floor compares A with B and each candidate compares the same
A with ``n`` showers drawn at random from the candidate, so every number, floor or candidate, is an
``n`` vs ``n`` comparison; the reported value is the mean over splits (and its std).
``n`` = min(reference // 2, smallest candidate).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
from tqdm import tqdm

from calofm.errors import CalofmError
from calofm.evaluation.observables import (
    PROFILE,
    SCALAR,
    Observable,
    ObservableConfig,
    ShowerObservables,
    classifier_features,
)


@dataclass(frozen=True)
class MetricConfig:
    """How the distances are computed: splits, histogram bins, classifier."""

    n_splits: int = 5
    n_bins: int = 40
    range_quantiles: tuple[float, float] = (0.001, 0.999)
    range_margin: float = 0.1  # widen the reference's quantile range by this fraction per side
    n_folds: int = 5
    classifier_max_iter: int = 100
    classifier_max_leaf_nodes: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "range_quantiles", tuple(float(q) for q in self.range_quantiles))
        if min(self.n_splits, self.n_bins, self.classifier_max_iter) < 1:
            raise CalofmError("evaluation: splits, bins and classifier iterations must be >= 1")
        if self.classifier_max_leaf_nodes < 2:
            raise CalofmError("evaluation: classifier trees need at least 2 leaves")
        if self.n_folds < 2:
            raise CalofmError("evaluation: the classifier needs at least 2 folds")
        lo, hi = self.range_quantiles
        if not 0 <= lo < hi <= 1 or self.range_margin < 0:
            raise CalofmError("evaluation: need 0 <= low < high quantile <= 1 and margin >= 0")

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def format_number(value: float | None) -> str:
    """The report's one number format: three significant digits, never an exponent
    (0.00123, 0.500, 9.14, 123, 1230); "-" for an undefined value."""
    if value is None or not np.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    value = float(f"{float(value):.3g}")  # round first: 9.996 becomes 10.0, not 10.00
    decimals = max(0, 2 - int(np.floor(np.log10(abs(value)))))
    return f"{value:.{decimals}f}"


class Histogram(NamedTuple):
    """Bin contents and their statistical uncertainties; for scalars also the fractions of showers
    below and above the range (counted in the outer bins, and marked so in the plots)."""

    values: np.ndarray
    errors: np.ndarray
    underflow: float = 0.0
    overflow: float = 0.0


def reference_edges(
    obs: Observable,
    reference: ShowerObservables,
    observable_config: ObservableConfig,
    metric_config: MetricConfig,
) -> np.ndarray:
    """Bin edges: the field's fixed range for the spectrum, the detector's bins for profiles, and
    for scalars the reference's quantile range widened by a margin (never a hard-coded range)."""
    if obs.kind == PROFILE:
        if obs.attr == "radial_profile":
            return reference.radial_edges
        return np.arange(reference.energy_per_layer.shape[1] + 1) - 0.5
    if obs.kind != SCALAR:
        return observable_config.spectrum_edges()
    values = obs.values(reference)
    # At most sqrt(entries) bins: with fewer entries a bin's statistical noise alone would
    # make the separation power of two samples of the same distribution large.
    n_bins = max(1, min(metric_config.n_bins, int(np.sqrt(len(values)))))
    if len(values) == 0:
        return np.linspace(0.0, 1.0, n_bins + 1)
    lo, hi = np.quantile(values, metric_config.range_quantiles)
    pad = metric_config.range_margin * (hi - lo)
    lo, hi = lo - pad, hi + pad
    if obs.symmetric:  # the axis is centred: a shift to one side is then visible at a glance
        hi = max(abs(lo), abs(hi))
        lo = -hi
    if obs.integer:
        width = max(1, int(np.ceil((hi - lo) / n_bins)))
        start = np.floor(lo) - 0.5
        n = max(1, int(np.ceil((hi - start) / width)))
        return start + width * np.arange(n + 1)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    return np.linspace(lo, hi, n_bins + 1)


def histogram(obs: Observable, sample: ShowerObservables, edges: np.ndarray) -> Histogram:
    """The histogram the report draws.

    Scalars: unit-normalised counts, values outside the range counted in the outer bins (and their
    fractions returned as under- and overflow), Poisson errors. Spectrum: cells per shower in each bin (cells outside the range are not part of the
    spectrum), Poisson errors. Profiles: mean energy per bin per shower, standard error of the mean.
    """
    values = obs.values(sample)
    if obs.kind == PROFILE:
        n = len(values)
        if n == 0:
            return Histogram(np.zeros(len(edges) - 1), np.zeros(len(edges) - 1))
        sem = values.std(axis=0, ddof=1) / np.sqrt(n) if n > 1 else np.zeros(values.shape[1])
        return Histogram(values.mean(axis=0), sem)
    if obs.kind == SCALAR:
        scale = max(len(values), 1)
        under = float(np.sum(values < edges[0])) / scale
        over = float(np.sum(values > edges[-1])) / scale
        counts = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)[0]
        counts = counts.astype(np.float64)
        return Histogram(counts / scale, np.sqrt(counts) / scale, under, over)
    scale = max(len(sample), 1)
    counts = np.histogram(values, bins=edges)[0].astype(np.float64)
    return Histogram(counts / scale, np.sqrt(counts) / scale)


def separation_power(h1: np.ndarray, h2: np.ndarray) -> float:
    """S = 1/2 sum (h1-h2)^2/(h1+h2) after normalising both to unit sum; 0 same, 1 disjoint."""
    h1 = np.asarray(h1, dtype=np.float64)
    h2 = np.asarray(h2, dtype=np.float64)
    if h1.sum() <= 0 or h2.sum() <= 0:
        return float("nan")
    h1, h2 = h1 / h1.sum(), h2 / h2.sum()
    total = h1 + h2
    nonzero = total > 0
    return float(0.5 * np.sum((h1[nonzero] - h2[nonzero]) ** 2 / total[nonzero]))


@dataclass(frozen=True)
class Standardiser:
    """Reference mean and standard deviation of one observable (per bin for a profile)."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, values: np.ndarray) -> Standardiser:
        if len(values) == 0:
            return cls(np.zeros(values.shape[1:]), np.ones(values.shape[1:]))
        std = values.std(axis=0)
        return cls(values.mean(axis=0), np.where(std > 0, std, 1.0))

    def __call__(self, values: np.ndarray) -> np.ndarray:
        return (values - self.mean) / self.std


def w1x100(reference: np.ndarray, candidate: np.ndarray, standardise: Standardiser) -> float:
    """100 x W1 of standardised values; for (N, K) profiles the mean over the K bins."""
    from scipy.stats import wasserstein_distance  # imported here: ``calofm --help`` stays fast

    if len(reference) == 0 or len(candidate) == 0:
        return float("nan")
    ref, cand = standardise(reference), standardise(candidate)
    if ref.ndim == 1:
        return 100.0 * float(wasserstein_distance(ref, cand))
    return 100.0 * float(
        np.mean([wasserstein_distance(ref[:, k], cand[:, k]) for k in range(ref.shape[1])])
    )


def classifier_auc(
    reference: np.ndarray, candidate: np.ndarray, config: MetricConfig, seed: int
) -> tuple[float, float]:
    """Mean and std over stratified folds of the ROC AUC of a classifier that separates the two.

    Runs on one thread: the samples are small, and on a shared machine OpenMP threads of the
    boosting cost several times more than they save.
    """
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold
    from threadpoolctl import threadpool_limits

    n_folds = config.n_folds

    if len(reference) != len(candidate):
        raise CalofmError("evaluation: the classifier needs equal class counts")
    if len(reference) < n_folds:
        raise CalofmError(
            f"evaluation: a {n_folds}-fold classifier needs {n_folds}+ showers a class"
        )
    x = np.concatenate([reference, candidate])
    y = np.concatenate([np.zeros(len(reference)), np.ones(len(candidate))])
    aucs = []
    folds = StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(x, y)
    with threadpool_limits(1):
        for train, test in folds:
            model = HistGradientBoostingClassifier(
                max_iter=config.classifier_max_iter,
                max_leaf_nodes=config.classifier_max_leaf_nodes,
                random_state=seed,
            )
            model.fit(x[train], y[train])
            aucs.append(roc_auc_score(y[test], model.predict_proba(x[test])[:, 1]))
    return float(np.mean(aucs)), float(np.std(aucs))


@dataclass(frozen=True)
class Split:
    """One random split: reference halves ``a`` and ``b``, and a subset of each candidate."""

    a: np.ndarray
    b: np.ndarray
    candidates: dict[str, np.ndarray]


def make_splits(
    n_reference: int, n_candidates: dict[str, int], config: MetricConfig
) -> tuple[int, list[Split]]:
    """``n`` and the random splits that make every comparison ``n`` vs ``n`` (see module doc)."""
    n = min([n_reference // 2, *n_candidates.values()])
    if n < config.n_folds:
        raise CalofmError(
            f"evaluation: comparisons would use {n} showers a side; need at least {config.n_folds}"
            f" (reference {n_reference} showers, halves for the floor)"
        )
    # One random stream for the reference and one per candidate, fixed by the candidate's size
    # alone: the floor and each candidate's numbers do not change when other candidates are added,
    # and two candidates with the same showers get the same numbers.
    rng = np.random.default_rng([config.seed, 0])
    cand_rngs = {
        name: np.random.default_rng([config.seed, 1, size]) for name, size in n_candidates.items()
    }
    splits = []
    for _ in range(config.n_splits):
        perm = rng.permutation(n_reference)
        cands = {
            name: np.sort(cand_rngs[name].permutation(size)[:n])
            for name, size in n_candidates.items()
        }
        splits.append(Split(np.sort(perm[:n]), np.sort(perm[n : 2 * n]), cands))
    return n, splits


def _summary(per_split: list[dict[str, float]]) -> dict[str, float]:
    out = {}
    for key in per_split[0]:
        values = np.array([d[key] for d in per_split], dtype=np.float64)
        finite = values[np.isfinite(values)]
        out[key] = float(finite.mean()) if len(finite) else float("nan")
        out[f"{key}_std"] = float(finite.std()) if len(finite) else float("nan")
    return out


def _spectrum_cells(sample: ShowerObservables, edges: np.ndarray) -> np.ndarray:
    cells = sample.cell_energies
    return cells[(cells >= edges[0]) & (cells <= edges[-1])]


def _compare(
    observables: list[Observable],
    reference: ShowerObservables,
    candidate: ShowerObservables,
    edges: dict[str, np.ndarray],
    scalers: dict[str, Standardiser],
) -> dict[str, dict[str, float]]:
    out = {}
    for obs in observables:
        if obs.kind == SCALAR or obs.kind == PROFILE:
            ref_values, cand_values = obs.values(reference), obs.values(candidate)
        else:
            ref_values = _spectrum_cells(reference, edges[obs.name])
            cand_values = _spectrum_cells(candidate, edges[obs.name])
        h_ref = histogram(obs, reference, edges[obs.name]).values
        h_cand = histogram(obs, candidate, edges[obs.name]).values
        out[obs.name] = {
            "w1x100": w1x100(ref_values, cand_values, scalers[obs.name]),
            "separation_power": separation_power(h_ref, h_cand),
        }
    return out


def compare_samples(
    reference: ShowerObservables,
    candidates: dict[str, ShowerObservables],
    observables: list[Observable],
    edges: dict[str, np.ndarray],
    config: MetricConfig,
    progress: bool = True,
) -> dict:
    """Every metric of every candidate and of the floor, averaged over the random splits."""
    scalers = {}
    for obs in observables:
        values = (
            _spectrum_cells(reference, edges[obs.name])
            if obs.kind not in (SCALAR, PROFILE)
            else obs.values(reference)
        )
        scalers[obs.name] = Standardiser.fit(values)

    n, splits = make_splits(len(reference), {k: len(v) for k, v in candidates.items()}, config)
    features_ref, feature_names = classifier_features(reference)
    features = {name: classifier_features(c)[0] for name, c in candidates.items()}
    per_split: dict[str, dict[str, list]] = {
        name: {"observables": [], "auc": []} for name in ["floor", *candidates]
    }
    for k, split in enumerate(
        tqdm(splits, desc="metrics", unit="split", disable=None if progress else True)
    ):
        half_a = reference.select(split.a)
        pairs = {"floor": (reference.select(split.b), features_ref[split.b])}
        for name, idx in split.candidates.items():
            pairs[name] = (candidates[name].select(idx), features[name][idx])
        for name, (other, other_features) in pairs.items():
            per_split[name]["observables"].append(
                _compare(observables, half_a, other, edges, scalers)
            )
            per_split[name]["auc"].append(
                classifier_auc(
                    features_ref[split.a], other_features, config, (config.seed + k) % 2**32
                )[0]  # scikit-learn takes 32-bit seeds
            )

    result: dict = {"candidates": {}, "floor": {}}
    for name, parts in per_split.items():
        entry = {
            "observables": {
                obs.name: _summary([p[obs.name] for p in parts["observables"]])
                for obs in observables
            },
            "classifier_auc": float(np.mean(parts["auc"])),
            "classifier_auc_std": float(np.std(parts["auc"])),
            "n_showers": len(reference) if name == "floor" else len(candidates[name]),
            "n_compared": n,
        }
        if name == "floor":
            result["floor"] = entry
        else:
            full = _compare(observables, reference, candidates[name], edges, scalers)
            for obs in observables:
                entry["observables"][obs.name]["w1x100_full_sample"] = full[obs.name]["w1x100"]
            result["candidates"][name] = entry
    result["n_compared"] = n
    result["classifier_features"] = feature_names
    return result
