"""The validation report: observables of a reference and candidates, metrics, PNGs, an HTML page.

``evaluate`` is the library entry point (``calofm evaluate`` is a thin layer over it). It writes
into ``out_dir``: one PNG per observable, event displays (a reference shower beside each
candidate's shower of the nearest incident energy), ``metrics.json`` and ``report.html``, each
under a temporary name then renamed, the PNGs first and ``report.html`` last, so a complete
``report.html`` means a complete report. The verdicts come from ``verdicts``, the HTML from
``page``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from calofm import __version__
from calofm.data.formats import file_info
from calofm.errors import CalofmError
from calofm.evaluation.metrics import (
    MetricConfig,
    compare_samples,
    format_number,
    histogram,
    reference_edges,
)
from calofm.evaluation.observables import (
    Observable,
    ObservableConfig,
    ShowerObservables,
    observable_list,
    read_observables,
)
from calofm.evaluation.page import report_html
from calofm.evaluation.plots import plot_observable
from calofm.evaluation.verdicts import FLOOR, floor_ratio, metric_value, verdict
from calofm.files import atomic_output, check_output_dir

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
DISPLAY_CANDIDATES = 4


def _check_inputs(reference: Path, candidates: dict[str, Path]) -> None:
    """Fail fast, before any heavy work, on unreadable files or an incompatible detector grid."""
    if not candidates:
        raise CalofmError("evaluate: give at least one candidate file")
    for name in candidates:
        if not name or name == FLOOR or "/" in name or name != name.strip():
            raise CalofmError(f"evaluate: {name!r} is not usable as a candidate name")
    ref = file_info(reference).detector
    for path in candidates.values():
        det = file_info(path).detector
        if det.shape != ref.shape or det.cell_mm != ref.cell_mm:
            raise CalofmError(
                f"{path}: detector grid {det.shape} with {det.cell_mm:g} mm cells differs from the"
                f" reference's {ref.shape} with {ref.cell_mm:g} mm cells"
            )


def _finite(value: object) -> object:
    """JSON without NaN: undefined metrics (e.g. an empty energy slice) become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


def _origin(path: Path) -> str:
    """What a file holds, in words: where its showers come from, and its seed if recorded."""
    from calofm.evaluation.display import sample_origin

    info = file_info(path)
    seed = info.metadata.get("seed")
    return sample_origin(info) + (f", seed {seed}" if seed is not None else "")


def _legend(obs: Observable, sample: ShowerObservables, entry: dict, floor: dict | None) -> str:
    """'(31 showers; W1×100 12.3 = 9.14× floor, separation 0.0500)': the shower count only for
    an energy slice (whose statistics are small); the reference's numbers are the floor's."""
    w1, s = metric_value(entry, obs.name), metric_value(entry, obs.name, "separation_power")
    count = f"{len(obs.values(sample))} showers; " if obs.energy_slice else ""
    if floor is None:
        return f"({count}floor: W1×100 {format_number(w1)}, separation {format_number(s)})"
    ratio = floor_ratio(entry, floor, obs.name)
    times = f" = {format_number(ratio)}× floor" if ratio is not None else ""
    return f"({count}W1×100 {format_number(w1)}{times}, separation {format_number(s)})"


def _write_plots(
    out_dir: Path,
    reference_label: str,
    reference: ShowerObservables,
    candidates: dict[str, ShowerObservables],
    edges: dict[str, np.ndarray],
    metrics: dict,
    observable_config: ObservableConfig,
) -> dict[str, str]:
    files = {}
    floor = metrics[FLOOR]
    for obs in observable_list(observable_config):
        legend = {reference_label: _legend(obs, reference, floor, None)}
        for name, sample in candidates.items():
            legend[name] = _legend(obs, sample, metrics["candidates"][name], floor)
        files[obs.name] = f"{obs.name}.png"
        with atomic_output(out_dir / files[obs.name]) as tmp:
            plot_observable(
                obs,
                edges[obs.name],
                histogram(obs, reference, edges[obs.name]),
                {n: histogram(obs, c, edges[obs.name]) for n, c in candidates.items()},
                tmp,
                legend=legend,
                reference_name=reference_label,
            )
    return files


def _display_energies(reference: ShowerObservables, config: ObservableConfig) -> list[float]:
    """The incident energies to show showers at: each slice's centre where the reference has
    showers in that slice, else the reference's median."""
    centres = [
        (lo + hi) / 2 for lo, hi in config.energy_slices_gev if len(reference.in_slice(lo, hi))
    ]
    return centres or [float(np.median(reference.incident))]


def _write_displays(
    out_dir: Path,
    reference: tuple[str, Path, ShowerObservables],
    candidates: dict[str, tuple[Path, ShowerObservables]],
    config: ObservableConfig,
) -> list[dict]:
    """One figure per display energy: the reference's shower nearest it beside each candidate's
    (the first ``DISPLAY_CANDIDATES`` of them: a row of more is too small to read)."""
    from calofm.evaluation.display import event_display, load_shower, save_figure

    ref_label, ref_path, ref_obs = reference
    candidates = dict(list(candidates.items())[:DISPLAY_CANDIDATES])
    displays = []
    for energy in _display_energies(ref_obs, config):
        chosen = {ref_label: int(np.argmin(np.abs(ref_obs.incident - energy)))}
        views = [load_shower(ref_path, chosen[ref_label], ref_label)]
        for name, (path, obs) in candidates.items():
            chosen[name] = int(np.argmin(np.abs(obs.incident - energy)))
            views.append(load_shower(path, chosen[name], name))
        file = f"event_display_{energy:g}GeV.png"
        with atomic_output(out_dir / file) as tmp:
            save_figure(event_display(views, config.threshold_mev), tmp)
        displays.append({"file": file, "energy_gev": energy, "showers": chosen})
    return displays


def evaluate(
    reference: str | os.PathLike[str],
    candidates: dict[str, str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    observable_config: ObservableConfig | None = None,
    metric_config: MetricConfig | None = None,
    max_showers: int | None = None,
    progress: bool = True,
    descriptions: Mapping[str, str] | None = None,
    reference_description: str | None = None,
    event_displays: bool = True,
) -> dict:
    """Compare each candidate file with the reference file; write the report; return metrics.json.

    ``candidates`` maps a display name to a shower file (either format). ``max_showers`` reads only
    the first N showers of every file. ``descriptions`` says in words what a candidate is (for
    example "Geant4, the model's training sample") and ``reference_description`` what the
    reference is; by default both come from the files' metadata (Geant4 or generated, seed).
    ``event_displays`` draws a reference shower beside each candidate's at a few energies.
    """
    start = time.perf_counter()
    observable_config = observable_config or ObservableConfig()
    metric_config = metric_config or MetricConfig()
    reference = Path(reference)
    paths = {name: Path(p) for name, p in candidates.items()}
    _check_inputs(reference, paths)
    unknown = set(descriptions or {}) - set(paths)
    if unknown:
        raise CalofmError(f"evaluate: descriptions of unknown candidates {sorted(unknown)}")
    out = check_output_dir(out_dir)  # created only once there is something to write (below)

    ref_obs = read_observables(reference, observable_config, max_showers, progress=progress)
    cand_obs = {
        name: read_observables(p, observable_config, max_showers, progress=progress)
        for name, p in paths.items()
    }
    observables = observable_list(observable_config)
    edges = {
        o.name: reference_edges(o, ref_obs, observable_config, metric_config) for o in observables
    }
    metrics = compare_samples(ref_obs, cand_obs, observables, edges, metric_config, progress)
    n = metrics["n_compared"]
    metrics["observables"] = [o.name for o in observables]
    reference_label = f"reference: {reference.stem}"
    metrics["samples"] = {
        "reference": {
            "label": reference_label,
            "file": str(reference),
            "description": reference_description or _origin(reference),
            "n_showers": len(ref_obs),
        },
        **{
            name: {
                "label": name,
                "file": str(path),
                "description": (descriptions or {}).get(name) or _origin(path),
                "n_showers": len(cand_obs[name]),
            }
            for name, path in paths.items()
        },
    }
    metrics["slice_showers"] = {
        f"{lo:g}-{hi:g}": {
            "reference": len(ref_obs.in_slice(lo, hi)),
            **{name: len(c.in_slice(lo, hi)) for name, c in cand_obs.items()},
        }
        for lo, hi in observable_config.energy_slices_gev
    }
    headings = {o.name: o.heading for o in observables}
    main = {o.name: o.heading for o in observables if o.energy_slice is None}
    reference_word = (
        "Geant4"
        if "Geant4" in metrics["samples"]["reference"]["description"]
        else ("the reference")
    )
    metrics["verdicts"] = {name: verdict(name, metrics, main, reference_word) for name in paths}
    out.mkdir(parents=True, exist_ok=True)
    metrics["plots"] = _write_plots(
        out, reference_label, ref_obs, cand_obs, edges, metrics, observable_config
    )
    metrics["event_displays"] = (
        _write_displays(
            out,
            (reference_label, reference, ref_obs),
            {name: (paths[name], cand_obs[name]) for name in paths},
            observable_config,
        )
        if event_displays
        else []
    )
    metrics["settings"] = {
        "files": {"reference": str(reference), **{k: str(v) for k, v in paths.items()}},
        "max_showers": max_showers,
        "observable_config": observable_config.to_dict(),
        "metric_config": metric_config.to_dict(),
        "bin_edges": {k: v.tolist() for k, v in edges.items()},
        "headings": headings,
        "caveat": (
            f"Every metric compares {n} vs {n} showers: the floor compares two disjoint halves of"
            f" the reference ({n} vs {n}), each candidate the same first half against {n} of its"
            f" own showers, averaged over {metric_config.n_splits} random split(s). W1 falls with"
            " sample size, so compare numbers at equal n only; w1x100_full_sample (candidates"
            " only, in metrics.json) uses every shower of both files."
        ),
        "classifier": (
            "scikit-learn HistGradientBoostingClassifier (max_iter"
            f" {metric_config.classifier_max_iter}, max_leaf_nodes"
            f" {metric_config.classifier_max_leaf_nodes}), {metric_config.n_folds}-fold stratified,"
            f" {n} vs {n} showers; AUC averaged over folds, then mean and std over splits"
        ),
        "calofm_version": __version__,
        "seed": metric_config.seed,
        "elapsed_s": time.perf_counter() - start,
    }
    metrics = _finite(metrics)
    with atomic_output(out / METRICS_FILE) as tmp:
        tmp.write_text(json.dumps(metrics, indent=2))
    with atomic_output(out / REPORT_FILE) as tmp:
        tmp.write_text(report_html(metrics))
    return metrics
