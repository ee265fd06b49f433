"""The validation report: observables of a reference and candidates, metrics, PNGs, an HTML page.

``evaluate`` is the library entry point (``calofm evaluate`` is a thin layer over it). It writes
into ``out_dir``: one PNG per observable, event displays (a reference shower beside each
candidate's shower of the nearest incident energy), ``metrics.json`` and ``report.html``, each
under a temporary name then renamed, the PNGs first and ``report.html`` last, so a complete
``report.html`` means a complete report.

The page is written for a physicist who did not write the code: a verdict per candidate at the top
(how far from the Geant4 floor, in words and numbers), what each sample is, what each metric means
and which way is better, then the tables, event displays and plots; every number in one format.
"""

from __future__ import annotations

import html
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
from calofm.evaluation.plots import plot_observable
from calofm.files import atomic_output, check_output_dir

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.html"
FLOOR = "floor"
# A candidate's W1x100 up to this multiple of the floor counts as "at the floor".
AT_FLOOR = 1.5
# Verdict levels: the worse of the level of the median floor ratio and that of the classifier.
VERDICTS = (
    "indistinguishable from {ref} at this sample size",
    "close to {ref}",
    "clearly different from {ref}",
    "far from {ref}",
)
RATIO_LEVELS = (AT_FLOOR, 3.0, 10.0)  # median W1x100 / floor below each: level 0, 1, 2
AUC_LEVELS = (0.75, 0.95)  # AUC below each (and above the floor's + 0.05): level 1, 2
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


def _value(entry: dict, obs: str, key: str = "w1x100") -> float | None:
    value = entry["observables"][obs].get(key)
    return None if value is None or not math.isfinite(value) else float(value)


def floor_ratio(candidate: dict, floor: dict, obs: str) -> float | None:
    """A candidate's W1x100 over the floor's for one observable (None where undefined)."""
    cand, base = _value(candidate, obs), _value(floor, obs)
    return cand / base if cand is not None and base else None


def _level(value: float, levels: tuple[float, ...]) -> int:
    return next((k for k, edge in enumerate(levels) if value <= edge), len(levels))


def verdict(
    name: str, metrics: dict, headings: Mapping[str, str], reference_word: str = "Geant4"
) -> dict:
    """How far one candidate is from the reference, in numbers and in one sentence.

    Judged on the observables that are not energy slices: the median of their W1x100 over the
    floor's, how many are within ``AT_FLOOR`` times it, the three furthest, and the classifier.
    """
    entry, floor = metrics["candidates"][name], metrics[FLOOR]
    ratios = {
        obs: r
        for obs in metrics["observables"]
        if obs in headings and (r := floor_ratio(entry, floor, obs)) is not None
    }
    median = float(np.median(list(ratios.values()))) if ratios else None
    at_floor = sum(r <= AT_FLOOR for r in ratios.values())
    furthest = sorted(ratios.items(), key=lambda kv: -kv[1])[:3]
    auc, floor_auc = entry["classifier_auc"], floor["classifier_auc"]
    auc_level = 0 if auc <= floor_auc + 0.05 else 1 + _level(auc, AUC_LEVELS)
    ratio_level = _level(median, RATIO_LEVELS) if median is not None else len(RATIO_LEVELS)
    level = max(auc_level, ratio_level)
    words = VERDICTS[level].format(ref=reference_word)
    details = (
        f"A classifier tells its showers from the reference's with AUC {format_number(auc)}"
        f" (0.5 would be indistinguishable; two halves of the reference give"
        f" {format_number(floor_auc)})."
    )
    if median is not None:
        details += (
            f" Its W1×100 is a median {format_number(median)}× the floor over {len(ratios)}"
            f" observables, {at_floor} of them within {AT_FLOOR:g}× the floor; furthest: "
            + ", ".join(f"{headings[o].lower()} ({format_number(r)}×)" for o, r in furthest)
            + "."
        )
    return {
        "level": level,
        "words": words,
        "details": details,
        "text": f"{name}: {words}. {details}",
        "median_floor_ratio": median,
        "n_at_floor": at_floor,
        "n_observables": len(ratios),
        "furthest": [[o, r] for o, r in furthest],
        "classifier_auc": auc,
        "floor_classifier_auc": floor_auc,
    }


def _legend(obs: Observable, sample: ShowerObservables, entry: dict, floor: dict | None) -> str:
    """'(31 showers; W1×100 12.3 = 9.14× floor, separation 0.0500)': the shower count only for
    an energy slice (whose statistics are small); the reference's numbers are the floor's."""
    w1, s = _value(entry, obs.name), _value(entry, obs.name, "separation_power")
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


def _cell(metrics: dict, column: str, obs: str, key: str) -> str:
    """A table cell: mean +- std over splits; a candidate's W1x100 also as a multiple of the floor,
    coloured by how far it is."""
    entry = metrics[FLOOR] if column == FLOOR else metrics["candidates"][column]
    value, spread = _value(entry, obs, key), _value(entry, obs, f"{key}_std")
    if value is None:
        return f'<td class="{"floor" if column == FLOOR else ""}">&ndash;</td>'
    text = format_number(value) + (f" &plusmn; {format_number(spread)}" if spread else "")
    if column == FLOOR:
        return f'<td class="floor">{text}</td>'
    ratio = floor_ratio(entry, metrics[FLOOR], obs) if key == "w1x100" else None
    if ratio is None:
        return f"<td>{text}</td>"
    return (
        f'<td class="level{_level(ratio, RATIO_LEVELS)}">{text}'
        f' <span class="ratio">({format_number(ratio)}&times;)</span></td>'
    )


STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em auto; max-width: 1250px; color: #222;
       line-height: 1.4; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.15em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.6em 0; }
td, th { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
td { white-space: nowrap; }
th { background: #eee; }
tbody th { text-align: left; font-weight: normal; background: #f7f7f7; }
td.left, table.samples thead th { text-align: left; }
.floor { background: #f0f0f0; }
.ratio { color: #555; font-size: 0.9em; }
.level0 { background: #e3f4e1; } .level1 { background: #fbf5d4; }
.level2 { background: #fde6cf; } .level3 { background: #f9d5d2; }
ul.verdicts { list-style: none; padding: 0; }
ul.verdicts li { margin: 0.5em 0; padding: 0.55em 0.8em; border-left: 6px solid #999; }
ul.verdicts li.level0 { border-color: #3a9a3a; } ul.verdicts li.level1 { border-color: #c9a400; }
ul.verdicts li.level2 { border-color: #e07b00; } ul.verdicts li.level3 { border-color: #c0392b; }
dl dt { font-weight: bold; margin-top: 0.4em; }
dl dd { margin-left: 1.5em; }
figure { display: inline-block; margin: 0.4em; vertical-align: top; }
figure.plot img { width: 560px; }
figure.display img { max-width: 100%; }
figcaption { font-size: 0.85em; color: #444; max-width: 560px; }
figure.display figcaption { max-width: none; }
.small { font-size: 0.85em; color: #444; }
"""


def _samples_table(metrics: dict) -> str:
    samples = metrics["samples"]
    rows = []
    for name, sample in samples.items():
        role = "reference" if name == "reference" else "candidate"
        rows.append(
            f'<tr><th>{html.escape(sample["label"])}</th><td class="left">{role}</td>'
            f'<td class="left">{html.escape(sample["description"])}</td>'
            f'<td class="left">{html.escape(sample["file"])}</td>'
            f"<td>{sample['n_showers']}</td></tr>"
        )
    return (
        '<table class="samples"><thead><tr><th>sample</th><th>role</th><th>what it is</th>'
        f"<th>file</th><th>showers</th></tr></thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _metrics_table(metrics: dict, headings: dict[str, str]) -> str:
    names = list(metrics["candidates"])
    columns = [FLOOR, *names]
    head = "".join(
        "<th>Geant4 floor</th>" if c == FLOOR else f"<th>{html.escape(c)}</th>" for c in columns
    )
    rows = []
    for obs in metrics["observables"]:
        cells = "".join(_cell(metrics, c, obs, "w1x100") for c in columns)
        cells += "".join(_cell(metrics, c, obs, "separation_power") for c in columns)
        rows.append(f"<tr><th>{html.escape(headings[obs])}</th>{cells}</tr>")
    aucs = []
    for c in columns:
        entry = metrics[FLOOR] if c == FLOOR else metrics["candidates"][c]
        text = (
            f"{format_number(entry['classifier_auc'])} &plusmn;"
            f" {format_number(entry['classifier_auc_std'])}"
        )
        aucs.append(f'<td class="{"floor" if c == FLOOR else ""}">{text}</td>')
    return f"""<table><thead>
<tr><th rowspan="2">observable</th>
<th colspan="{len(columns)}">W1&times;100, standardised (lower is better; &times; = times the floor)</th>
<th colspan="{len(columns)}">separation power (0 = identical, 1 = disjoint)</th></tr>
<tr>{head}{head}</tr></thead><tbody>
{"".join(rows)}
<tr><th>classifier AUC (0.5 is ideal)</th>{"".join(aucs)}<td colspan="{len(columns)}"></td></tr>
</tbody></table>"""


def _html(metrics: dict) -> str:
    settings = metrics["settings"]
    headings = settings["headings"]
    ref = metrics["samples"]["reference"]
    verdicts = "".join(
        f'<li class="level{v["level"]}"><b>{html.escape(name)}</b>'
        f" ({html.escape(metrics['samples'][name]['description'])}):"
        f" <b>{html.escape(v['words'])}</b>. {html.escape(v['details'])}</li>"
        for name, v in metrics["verdicts"].items()
    )
    oc = settings["observable_config"]
    slices = ", ".join(
        f"{lo:g}-{hi:g} GeV ({', '.join(f'{html.escape(k)} {v}' for k, v in counts.items())})"
        for (lo, hi), counts in zip(
            oc["energy_slices_gev"], metrics["slice_showers"].values(), strict=True
        )
    )
    displays = "".join(
        f'<figure class="display"><figcaption><b>Incident energy nearest {d["energy_gev"]:g}'
        " GeV</b>: "
        + ", ".join(f"{html.escape(k)} shower {i}" for k, i in d["showers"].items())
        + ". Cells above the hit threshold as points sized and coloured by energy, and the"
        " energy per cell layer by layer; one colour scale for the whole row (click to enlarge)."
        f'</figcaption><a href="{html.escape(d["file"])}"><img src="{html.escape(d["file"])}"'
        f' alt="event display at {d["energy_gev"]:g} GeV"></a></figure>'
        for d in metrics["event_displays"]
    )
    plots = "".join(
        f'<figure class="plot"><a href="{html.escape(f)}"><img src="{html.escape(f)}"'
        f' alt="{html.escape(headings[o])}"></a></figure>'
        for o, f in metrics["plots"].items()
    )
    mc = settings["metric_config"]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>calofm validation report</title>
<style>{STYLE}</style></head><body>
<h1>calofm validation report</h1>
<p>Each candidate sample of showers is compared with the reference sample
<b>{html.escape(ref["label"])}</b> ({html.escape(ref["description"])}, {ref["n_showers"]} showers)
on the standard ECAL observables. Every distance is shown next to the <b>Geant4 floor</b>: the same
distance between two halves of the reference, the smallest difference statistics alone allow.</p>

<h2>Verdict</h2>
<ul class="verdicts">{verdicts}</ul>
<p class="small">Verdict: the worse of the median W1&times;100 over the floor (at most
{AT_FLOOR:g}&times;: indistinguishable; 3&times;: close; 10&times;: clearly different; more: far)
and the classifier AUC (within 0.05 of the floor's; up to 0.75; up to 0.95; more), over the
observables that are not energy slices.</p>

<h2>What was compared</h2>
{_samples_table(metrics)}
<p>{html.escape(settings["caveat"])}</p>

<h2>How to read the numbers</h2>
<dl>
<dt>W1&times;100 (lower is better, 0 = identical)</dt>
<dd>The Wasserstein-1 (earth mover's) distance between a candidate's and the reference's
distribution of an observable, after <b>standardising</b> both: subtracting the reference's mean
and dividing by the reference's standard deviation (both from the whole reference sample), times
100. A W1&times;100 of 10 means the distributions differ, on average, by a tenth of the reference's
spread. For a profile (energy per layer, per ring) it is the mean over the bins. The published
Geant4-against-Geant4 values are about 1 at 500k showers; the floor here is for this sample
size.</dd>
<dt>&times; floor</dt>
<dd>A candidate's W1&times;100 divided by the floor's: 1 is as close as two Geant4 samples of the
same size, 10 is ten times further. Cells are coloured green (at most {AT_FLOOR:g}&times;),
yellow (3&times;), orange (10&times;) and red (more).</dd>
<dt>Separation power (0 = identical, 1 = disjoint)</dt>
<dd>&frac12; &Sigma; (h<sub>1</sub> &minus; h<sub>2</sub>)&sup2; / (h<sub>1</sub> +
h<sub>2</sub>) over the bins of the two unit-normalised histograms drawn below.</dd>
<dt>Classifier AUC (0.5 is ideal)</dt>
<dd>A boosted-tree classifier trained to tell the candidate's showers from the reference's on
{len(metrics["classifier_features"])} high-level features; the area under its ROC curve on
held-out showers. 0.5: it cannot tell them apart; 1.0: it always can.</dd>
<dt>Geant4 floor</dt>
<dd>The same metrics between two disjoint halves of the reference. A candidate at the floor is as
close to the reference as another Geant4 sample would be.</dd>
<dt>&plusmn;</dt>
<dd>Standard deviation over {mc["n_splits"]} random splits of the reference.</dd>
</dl>
<p>Numbers have three significant digits. Hits are cells strictly above
{oc["threshold_mev"]:g} MeV (half a MIP) in every observable, the cell-energy spectrum included:
a generator cannot make cells below the threshold.</p>

<h2>Metrics</h2>
{_metrics_table(metrics, headings)}
<p class="small">Energy slices (showers in each, whole samples): {slices}. The classifier is
{html.escape(settings["classifier"])}.</p>
<details class="small"><summary>The classifier's {len(metrics["classifier_features"])} features</summary>
{html.escape(", ".join(metrics["classifier_features"]))}</details>

<h2>Event displays</h2>
{displays}

<h2>Observables</h2>
<p class="small">Top: the reference (grey, with its statistical band) and each candidate; bottom:
ratio to the reference. Hatched outer bins also hold the showers beyond the axis range (the
legend gives their fractions). Profiles show the mean energy per shower in each bin.</p>
{plots}

<h2>Settings</h2>
<p class="small">Reference {html.escape(str(settings["files"]["reference"]))}; seed
{settings["seed"]}; written by calofm {html.escape(settings["calofm_version"])} in
{format_number(settings["elapsed_s"])} s. Every number is also in metrics.json.</p>
</body></html>
"""


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
        tmp.write_text(_html(metrics))
    return metrics
