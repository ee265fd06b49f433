"""The quickstart's one page, report/report.html beside each class's own evaluation: the verdicts,
the metrics against the Geant4 floor, event displays, plots, speed, the expert, the proof that the
base classes did not change, and the wall time of every step.
"""

from __future__ import annotations

import html

from calofm.cli._quickstart_plan import Plan
from calofm.cli._quickstart_summary import build_summary
from calofm.files import atomic_output

PLOTS = ("energy_sum", "n_hits", "energy_per_layer", "radial_profile", "cog_z", "cell_energy")


def _num(value: float | None, spec: str = ".3g") -> str:
    return "&ndash;" if value is None else format(value, spec)


def _ratio(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.1f}&times;"


def _headings() -> dict[str, str]:
    """Observable names in words, as the evaluation report titles them."""
    from calofm.evaluation.observables import ObservableConfig, observable_list

    return {o.name: o.heading for o in observable_list(ObservableConfig())}


def _metrics_table(summary: dict, plan: Plan) -> str:
    headings = _headings()
    observables = list(
        dict.fromkeys(o for m in summary["classes"].values() for o in m["observables"])
    )
    head = "".join(f"<th>{html.escape(headings.get(o, o))}</th>" for o in observables)
    rows = []
    for cls, m in summary["classes"].items():
        role = "new class (expert)" if cls == plan.new_class else "base class"
        cells = "".join(
            f"<td>{_num((m['observables'].get(o) or {}).get('w1x100'))}<br>"
            f"<small>floor {_num((m['observables'].get(o) or {}).get('floor'))}<br>"
            f"{_ratio((m['observables'].get(o) or {}).get('ratio'))}</small></td>"
            for o in observables
        )
        link = f'<a href="{plan.stem(cls)}/report.html">{html.escape(cls)}</a>'
        rows.append(
            f"<tr><th>{link}<br><small>{role}</small></th>{cells}"
            f"<td>{_num(m['classifier_auc'], '.3f')}<br><small>floor "
            f"{_num(m['floor_classifier_auc'], '.3f')}</small></td>"
            f"<td>{_ratio(m['median_ratio'])}</td></tr>"
        )
    return (
        f"<table><tr><th>class</th>{head}<th>classifier AUC</th><th>median multiple of the "
        f"floor</th></tr>{''.join(rows)}</table>"
    )


def _speed(t: dict) -> str:
    gen, g4 = t["generation"], t["geant4"]
    if not gen or not g4:
        return "&ndash;"
    factor = g4 / gen
    words = f"{factor:.2g}&times; faster" if factor >= 1 else f"{1 / factor:.2g}&times; slower"
    return (
        f"generation {gen:.3g} s, Geant4 {g4:.3g} s per shower on one core: generation is {words}"
    )


def write_report(plan: Plan, records: dict, titles: dict[str, str]) -> None:
    """report.html beside the per-class evaluations and displays in OUT/report."""
    s = build_summary(plan, records)
    t, e, probe = s["seconds_per_shower"], s["expert"], s["probe"]
    verdicts = "".join(
        f"<li><b>{html.escape(c)}</b> ({'new, its expert trained here' if c == plan.new_class else 'base'}): "
        f"{html.escape(m['verdict'] or _plain_verdict(m))}</li>"
        for c, m in s["classes"].items()
    )
    plots = "".join(
        f"<h3>{html.escape(cls)}</h3><p>"
        + "".join(
            f'<img src="{plan.stem(cls)}/{name}.png" alt="{name}">'
            for name in PLOTS
            if (plan.evaluation(cls) / f"{name}.png").exists()
        )
        + f'</p><p><a href="{plan.stem(cls)}/report.html">every observable and energy slice of '
        f"{html.escape(cls)}</a></p>"
        for cls in plan.tested
    )
    displays = "".join(
        f'<figure><img src="displays/{plan.display(c).name}" alt="{html.escape(c)}">'
        f"<figcaption>{html.escape(c)}</figcaption></figure>"
        for c in plan.classes
        if plan.display(c).exists()
    )
    same = probe.get("classes", {})
    identity = ", ".join(
        f"{html.escape(c)}: {'identical' if v else '<b>CHANGED</b>'}" for c, v in same.items()
    )
    trainable, base = e["trainable_parameters"], e["base_parameters"]
    share = f" ({100 * trainable / base:.1f}% of the base's {base:,})" if trainable and base else ""
    timed = [(k, records[k]) for k in titles if k in records]
    steps = "".join(
        f"<tr><td>{html.escape(titles[k])}</td><td>{_num(r.get('seconds'), '.1f')}</td>"
        f"<td>{_num(r.get('cpu_seconds'), '.1f')}</td></tr>"
        for k, r in timed
    )
    total = sum(r.get("seconds") or 0 for _, r in timed)
    cpu = sum(r.get("cpu_seconds") or 0 for _, r in timed)
    untested = [c for c in plan.classes if c not in plan.tested]
    note = (
        f"<p>{', '.join(untested)}: generated only (no held-out Geant4 sample at this scale).</p>"
        if untested
        else ""
    )
    page = f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>calofm quickstart</title>
<style>body{{font-family:sans-serif;max-width:1200px;margin:auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px;text-align:right}}
p img{{width:380px}}figure{{margin:8px 0}}figure img{{width:100%}}
.key{{background:#f4f4f4;padding:0.5em 1em}}</style>
</head><body>
<h1>calofm quickstart: {html.escape(plan.new_class)} added to {html.escape(plan.model)}</h1>
<p>The shipped base model ({html.escape(", ".join(plan.base_classes))}) got one new expert for
{html.escape(plan.new_class)}, a class it had never seen, trained on {e["n_train_showers"]} Geant4
showers for {e["steps"]} steps ({_num(e["training_seconds"], ".0f")} s) with every base weight
frozen{f", starting from a copy of the {html.escape(plan.init_from)} expert" if plan.init_from else ""}.
Then every class was generated together (rows of all classes interleaved in each call, each
row routed to its own expert) and compared with held-out Geant4 showers
({plan.scale.n_test} per class, {plan.scale.energy_gev[0]:g}-{plan.scale.energy_gev[1]:g} GeV
photons, simulated here with seeds other than the training samples').</p>
<div class="key"><ul>{verdicts}
<li>{_speed(t)}</li>
<li>the expert: {_num(trainable, ",")} trainable parameters{share}</li>
<li>the base classes' showers before and after the expert: {identity or "&ndash;"}</li>
<li>wall time: {total / 60:.1f} minutes, {cpu / 60:.1f} minutes of CPU time (scale
"{html.escape(s["scale_name"])}", {s["cores"]} cores, load average {s["load_average"][0]:.1f})</li>
</ul></div>
<h2>Against Geant4</h2>
<p>W1x100: the Wasserstein-1 distance between the generated and the held-out Geant4
distribution of an observable, standardised by the Geant4 sample's spread, times 100; lower is
better. The floor is the same distance between two halves of the Geant4 sample at the same size:
what Geant4 scores against itself, so a multiple of 1 is as good as it gets. Classifier AUC: 0.5
means a classifier cannot tell the generated showers from Geant4's, 1 that it always can.</p>
{_metrics_table(s, plan)}{note}
<h2>Event displays</h2><p>A Geant4 and a generated shower of about the same incident energy, on
one colour scale (<code>calofm show</code>).</p>{displays}
<h2>Observables</h2>{plots}
<h2>Speed</h2><p>{_speed(t)}: CPU time per shower, measured in this run on this machine
({s["cores"]} cores, load average {s["load_average"][0]:.1f} at the end), Geant4's with its
start-up, generation's with the model loading, both on one thread per process.</p>
<h2>The expert</h2><p>{_num(trainable, ",")} trainable parameters{share}: one feed-forward
expert per block; {e["steps"]} steps, {e["epochs"]} epochs over {e["n_train_showers"]} showers;
best validation loss {_num(e["best_val_loss"], ".4f")} nats per token.</p>
<h2>Base classes unchanged</h2><p>{probe.get("showers_per_class")} showers per base class
generated with the same seed, rows and incident energies before and after the expert was added,
compared byte for byte ({html.escape(str(probe.get("compared", "")))}): {identity or "&ndash;"}.</p>
<h2>Wall time per step</h2><table><tr><th>step</th><th>wall [s]</th><th>CPU [s]</th></tr>
{steps}<tr><th>in all, before this report</th><td>{total:.1f}</td><td></td></tr></table>
</body></html>
"""
    with atomic_output(plan.report / "report.html") as tmp:
        tmp.write_text(page)


def _plain_verdict(m: dict) -> str:
    """A class's result in words where its evaluation gave no verdict."""
    ratio, auc = m["median_ratio"], m["classifier_auc"]
    return (
        (
            f"W1x100 a median {_ratio(ratio)} the Geant4 floor; classifier AUC "
            f"{_num(auc, '.3f')} (floor {_num(m['floor_classifier_auc'], '.3f')})"
        )
        .replace("&times;", "x")
        .replace("&ndash;", "-")
    )
