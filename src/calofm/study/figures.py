"""The study's observable figures: per method and size, the mean histogram of the repeats.

As in the paper's fine-tuning figures, each group (method, N) is drawn as the mean of its repeats'
histograms with a band that combines the spread between repeats (their standard deviation) and the
statistical uncertainty of one repeat (quadrature sum), against the Geant4 test showers; the group
with the most training showers is the full-data result.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path

import numpy as np

from calofm.evaluation.metrics import Histogram, histogram
from calofm.evaluation.observables import ObservableConfig, observable_list, read_observables
from calofm.evaluation.plots import plot_observable
from calofm.files import atomic_output

FIGURE_DIR = "figures"


def repeat_band(hists: list[Histogram]) -> Histogram:
    """Mean of the repeats; error = sqrt(std over repeats^2 + mean statistical variance)."""
    values = np.stack([h.values for h in hists])
    variances = np.stack([h.errors**2 for h in hists])
    spread = values.std(axis=0, ddof=1) if len(hists) > 1 else np.zeros(values.shape[1])
    return Histogram(values.mean(axis=0), np.sqrt(spread**2 + variances.mean(axis=0)))


def plot_study_observables(
    test_path: str | Path,
    groups: dict[str, list[Path]],
    bin_edges: dict[str, list[float]],
    summary_groups: dict[str, dict],
    out_dir: Path,
    full_data: Collection[str] = (),
    bootstrapped: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """One PNG per observable in ``out_dir``; returns observable name -> file name.

    ``groups`` maps 'method n=N' to its repeats' shower files; ``bin_edges`` are the evaluation's
    (from the test file), so the figures and the metrics bin alike; groups in ``full_data``
    trained on every training shower and are labelled so, as are groups with repeats that
    trained on bootstrap resamples (``bootstrapped``: how many per group).
    """
    config = ObservableConfig()
    reference = read_observables(test_path, config, progress=False)
    samples = {
        name: [read_observables(p, config, progress=False) for p in paths]
        for name, paths in groups.items()
    }
    labels = {
        name: group_label(name, len(runs), name in full_data, (bootstrapped or {}).get(name, 0))
        for name, runs in samples.items()
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for obs in observable_list(config):
        edges = np.asarray(bin_edges[obs.name])
        bands = {
            labels[name]: repeat_band([histogram(obs, s, edges) for s in runs])
            for name, runs in samples.items()
        }
        legend = {
            labels[name]: _w1_text(summary_groups.get(name, {}).get(obs.name)) for name in samples
        }
        files[obs.name] = f"{obs.name}.png"
        with atomic_output(out_dir / files[obs.name]) as tmp:
            plot_observable(
                obs,
                edges,
                histogram(obs, reference, edges),
                bands,
                tmp,
                legend=legend,
                reference_name=f"{Path(test_path).stem} (Geant4)",
            )
    return files


def group_label(name: str, repeats: int, full_data: bool, bootstrapped: int = 0) -> str:
    """A group's label: 'expert n=1000, mean of 5 (3 bootstrap resamples)'."""
    label = f"{name} (all training showers)" if full_data else name
    if repeats > 1:
        label = f"{label}, mean of {repeats}"
    if bootstrapped:
        label += f" ({bootstrapped} bootstrap resample{'s' if bootstrapped > 1 else ''})"
    return label


def _w1_text(score: dict | None) -> str:
    if not score or score.get("mean") is None:
        return ""
    return f"(W1x100 {score['mean']:.3g} ± {score['std']:.2g})"
