"""The validation report: observables of a reference and candidates, metrics, PNGs, an HTML page.

``evaluate`` is the library entry point (``calofm evaluate`` is a thin layer over it). It writes
into ``out_dir``: one PNG per observable, ``metrics.json`` and ``report.html``, each under a
temporary name then renamed, the PNGs first and ``report.html`` last, so a complete
``report.html`` means a complete report.
"""

from __future__ import annotations

import html
import json
import math
import os
import time
from pathlib import Path

import numpy as np

from calofm import __version__
from calofm.data.formats import file_info
from calofm.errors import CalofmError
from calofm.evaluation.metrics import MetricConfig, compare_samples, histogram, reference_edges
from calofm.evaluation.observables import (
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


def _legend(entry: dict, name: str) -> str:
    m = entry["observables"][name]
    return f"(W1x100 {m['w1x100']:.3g}, S {m['separation_power']:.2g})"


def _write_plots(
    out_dir: Path,
    reference_name: str,
    reference: ShowerObservables,
    candidates: dict[str, ShowerObservables],
    edges: dict[str, np.ndarray],
    metrics: dict,
    observable_config: ObservableConfig,
) -> dict[str, str]:
    files = {}
    for obs in observable_list(observable_config):
        legend = {f"{reference_name} (reference)": "floor " + _legend(metrics[FLOOR], obs.name)}
        legend.update({n: _legend(metrics["candidates"][n], obs.name) for n in candidates})
        files[obs.name] = f"{obs.name}.png"
        with atomic_output(out_dir / files[obs.name]) as tmp:
            plot_observable(
                obs,
                edges[obs.name],
                histogram(obs, reference, edges[obs.name]),
                {n: histogram(obs, c, edges[obs.name]) for n, c in candidates.items()},
                tmp,
                legend=legend,
                reference_name=f"{reference_name} (reference)",
            )
    return files


def _cell(entry: dict, obs: str, key: str) -> str:
    value = entry["observables"][obs].get(key)
    spread = entry["observables"][obs].get(f"{key}_std")
    if value is None:
        return "&ndash;"
    spec = ".2f" if key == "w1x100" else ".2g"
    return f"{value:{spec}} &plusmn; {spread:{spec}}" if spread is not None else f"{value:{spec}}"


def _html(metrics: dict) -> str:
    names = list(metrics["candidates"])
    columns = [FLOOR, *names]

    def entry(name: str) -> dict:
        return metrics[FLOOR] if name == FLOOR else metrics["candidates"][name]

    def td(name: str, text: str) -> str:
        return f'<td class="floor">{text}</td>' if name == FLOOR else f"<td>{text}</td>"

    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    rows = []
    for obs in metrics["observables"]:
        cells = "".join(td(c, _cell(entry(c), obs, "w1x100")) for c in columns)
        cells += "".join(td(c, _cell(entry(c), obs, "separation_power")) for c in columns)
        rows.append(f"<tr><th>{html.escape(obs)}</th>{cells}</tr>")
    auc = "".join(
        td(c, f"{entry(c)['classifier_auc']:.3f} &plusmn; {entry(c)['classifier_auc_std']:.3f}")
        for c in columns
    )
    settings = metrics["settings"]
    slices = ", ".join(
        f"{lo:g}-{hi:g}" for lo, hi in settings["observable_config"]["energy_slices_gev"]
    )
    images = "".join(
        f'<figure><img src="{html.escape(f)}" alt="{html.escape(o)}"></figure>'
        for o, f in metrics["plots"].items()
    )
    files = "".join(
        f"<li>{html.escape(n)}: {html.escape(str(settings['files'][n]))}"
        f" ({entry(n)['n_showers']} showers)</li>"
        for n in names
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>calofm validation report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
td, th {{ border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }}
thead th {{ background: #eee; }}
.floor {{ background: #f4f4f4; }}
figure {{ display: inline-block; margin: 0.4em; }}
img {{ width: 560px; }}
</style></head><body>
<h1>calofm validation report</h1>
<ul><li>reference: {html.escape(str(settings["files"]["reference"]))}
({metrics[FLOOR]["n_showers"]} showers)</li>{files}</ul>
<p>{html.escape(settings["caveat"])}</p>
<table><thead>
<tr><th rowspan="2">observable</th><th colspan="{len(columns)}">W1 &times; 100 (standardised)</th>
<th colspan="{len(columns)}">separation power</th></tr>
<tr>{head}{head}</tr></thead><tbody>
{"".join(rows)}
<tr><th>classifier AUC</th>{auc}<td colspan="{len(columns)}"></td></tr>
</tbody></table>
<p>Mean &plusmn; std over {settings["metric_config"]["n_splits"]} random splits.
Classifier: {html.escape(settings["classifier"])}; features:
{html.escape(", ".join(metrics["classifier_features"]))}.</p>
<p>Hit threshold {settings["observable_config"]["threshold_mev"]:g} MeV (strictly above) for all
observables but the cell-energy spectrum (all cells &gt; 0). Energy slices (GeV):
{html.escape(slices)}.
Written by calofm {html.escape(settings["calofm_version"])} in {settings["elapsed_s"]:.1f} s.</p>
{images}
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
) -> dict:
    """Compare each candidate file with the reference file; write the report; return metrics.json.

    ``candidates`` maps a display name to a shower file (either format). ``max_showers`` reads only
    the first N showers of every file.
    """
    start = time.perf_counter()
    observable_config = observable_config or ObservableConfig()
    metric_config = metric_config or MetricConfig()
    reference = Path(reference)
    paths = {name: Path(p) for name, p in candidates.items()}
    _check_inputs(reference, paths)
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
    out.mkdir(parents=True, exist_ok=True)
    metrics["plots"] = _write_plots(
        out, reference.stem, ref_obs, cand_obs, edges, metrics, observable_config
    )
    metrics["settings"] = {
        "files": {"reference": str(reference), **{k: str(v) for k, v in paths.items()}},
        "max_showers": max_showers,
        "observable_config": observable_config.to_dict(),
        "metric_config": metric_config.to_dict(),
        "bin_edges": {k: v.tolist() for k, v in edges.items()},
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
