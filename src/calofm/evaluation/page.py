"""The report's HTML page, written from metrics.json alone, for a physicist who did not write the
code: a verdict per candidate at the top (how far from the Geant4 floor, in words and numbers),
what each sample is, what each metric means and which way is better, then the tables, event
displays and plots; every number in one format.
"""

from __future__ import annotations

import html

from calofm.evaluation.metrics import format_number
from calofm.evaluation.verdicts import (
    AT_FLOOR,
    FLOOR,
    RATIO_LEVELS,
    floor_ratio,
    level_of,
    metric_value,
)


def _cell(metrics: dict, column: str, obs: str, key: str) -> str:
    """A table cell: mean +- std over splits; a candidate's W1x100 also as a multiple of the floor,
    coloured by how far it is."""
    entry = metrics[FLOOR] if column == FLOOR else metrics["candidates"][column]
    value, spread = metric_value(entry, obs, key), metric_value(entry, obs, f"{key}_std")
    if value is None:
        return f'<td class="{"floor" if column == FLOOR else ""}">&ndash;</td>'
    text = format_number(value) + (f" &plusmn; {format_number(spread)}" if spread else "")
    if column == FLOOR:
        return f'<td class="floor">{text}</td>'
    ratio = floor_ratio(entry, metrics[FLOOR], obs) if key == "w1x100" else None
    if ratio is None:
        return f"<td>{text}</td>"
    return (
        f'<td class="level{level_of(ratio, RATIO_LEVELS)}">{text}'
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


def report_html(metrics: dict) -> str:
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
