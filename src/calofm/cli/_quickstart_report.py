"""The quickstart's library steps and its one report (HTML and summary.json).

The report gathers what the steps wrote: each class's ``calofm evaluate`` metrics (W1x100 of the
generated showers next to the Geant4 floor, the classifier AUC), its plots and event displays, the
time per shower of generation and of Geant4 on this machine, the expert's trainable parameters,
the byte-for-byte comparison of the base classes' showers before and after the expert, and the
wall time of every step.
"""

from __future__ import annotations

import html
import json
import math
import os
import statistics
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from calofm.cli import _quickstart_generate as qg
from calofm.files import atomic_output

if TYPE_CHECKING:
    from calofm.cli.quickstart import Plan

PLOTS = ("energy_sum", "n_hits", "energy_per_layer", "radial_profile", "cog_z", "cell_energy")


def compare_probes(plan: Plan, settings: tuple) -> None:
    """Generate the probe with the expert attached and compare it with the one made before."""
    probe_dir = plan.out / "probe"
    after = qg.probe(plan.model, [str(plan.expert)], *settings)
    qg.save_arrays(probe_dir / "after.npz", after)
    before = qg.load_arrays(probe_dir / "before.npz")
    same = qg.identical(before, after)
    hits = {c: int(after[f"{c}|offsets"][-1]) for c in same}
    result = {
        "identical": all(same.values()),
        "classes": same,
        "showers_per_class": plan.scale.n_probe,
        "hits_per_class": hits,
        "seed": plan.seed,
        "compared": "offsets, voxels, cell energies and incident energies, as float32/int bytes",
    }
    with atomic_output(probe_dir / "comparison.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    verdict = "identical" if result["identical"] else "CHANGED"
    print(f"base classes before and after the expert: {verdict} ({', '.join(same)})")


def generate_all(plan: Plan) -> None:
    """Every class in one mixed call, into one showerdata file per class."""
    from tqdm import tqdm

    from calofm.adapters import load_model_with_adapters
    from calofm.data.formats import write_showers
    from calofm.generation.sampler import SamplingConfig
    from calofm.model.config import parse_class
    from calofm.pretrained import resolve_model

    s = plan.scale
    model_dir = str(resolve_model(plan.model).resolve())
    model = load_model_with_adapters(model_dir, [str(plan.expert)], "cpu")
    composition = model.describe()
    max_hits = s.max_hits or model.tokenizer.max_hits
    n_total = s.n_test * len(plan.classes)
    batches = plan.out / "calofm" / "batches"
    with tqdm(total=math.ceil(n_total / s.task_rows), unit="task", desc="generate") as bar:
        per_class, stats = qg.generate_mixed(
            model_dir,
            [str(plan.expert)],
            plan.classes,
            s.n_test,
            s.energy_gev,
            plan.seed,
            max_hits,
            s.task_rows,
            s.slots,
            plan.workers,
            batches,
            progress=bar.update,
        )
    for cls in plan.classes:
        material, particle = parse_class(cls)
        showers = qg.to_showers(per_class[cls], model.detector.with_material(material), particle)
        generator = {
            "program": "calofm quickstart",
            "model_sha256": composition["base_weights_sha256"],
            "adapters": composition["adapters"],
            "class": cls,
            "sampling": SamplingConfig().to_dict(),
            "max_hits": max_hits,
            "seed": plan.seed,
            "energy_range_gev": list(s.energy_gev),
            "model": model_dir,
            "mixed_batch": plan.classes,
        }
        write_showers(
            showers,
            plan.generated(cls),
            simulator="calofm-generate",
            seed=plan.seed,
            generator=generator,
        )
    result = {
        "classes": plan.classes,
        "showers_per_class": s.n_test,
        "task_rows": s.task_rows,
        "slots": s.slots,
        "max_hits": max_hits,
        "files": {c: str(plan.generated(c)) for c in plan.classes},
        "seconds_per_shower_one_core": stats["worker_cpu_seconds"] / n_total,
        **stats,
    }
    with atomic_output(plan.out / "calofm" / "generation.json") as tmp:
        tmp.write_text(json.dumps(result, indent=1) + "\n")
    for path in sorted(batches.iterdir()):
        path.unlink()
    batches.rmdir()
    print(
        f"generated {n_total} showers ({', '.join(plan.classes)}; {stats['n_truncated']} reached "
        f"{max_hits} hits) at {result['seconds_per_shower_one_core']:.2f} s per shower per core"
    )


def _json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _w1(entry: dict, obs: str) -> float | None:
    value = (entry.get("observables", {}).get(obs) or {}).get("w1x100")
    return value if isinstance(value, (int, float)) else None


def class_metrics(path: Path) -> dict:
    """One class's headline: each observable's W1x100 and its multiple of the Geant4 floor."""
    metrics = _json(path)
    floor, cand = metrics.get("floor", {}), metrics.get("candidates", {}).get("calofm", {})
    rows = {}
    for obs in cand.get("observables", {}):
        if "GeV" in obs:  # energy slices: in the class's own report
            continue
        value, base = _w1(cand, obs), _w1(floor, obs)
        rows[obs] = {
            "w1x100": value,
            "floor": base,
            "ratio": value / base if value is not None and base else None,
        }
    ratios = [r["ratio"] for r in rows.values() if r["ratio"] is not None]
    return {
        "n_compared": metrics.get("n_compared"),
        "observables": rows,
        "median_ratio": statistics.median(ratios) if ratios else None,
        "verdict": _verdict_words((metrics.get("verdicts") or {}).get("calofm") or {}),
        "classifier_auc": cand.get("classifier_auc"),
        "floor_classifier_auc": floor.get("classifier_auc"),
    }


def _verdict_words(verdict: dict) -> str | None:
    """The evaluation's verdict on the generated showers, where it gives one."""
    words, details = verdict.get("words"), verdict.get("details")
    return f"{words}. {details}" if words and details else None


def _geant4_seconds(plan: Plan, records: dict) -> float | None:
    """Geant4's time per shower on one core: the CPU time of the new class's simulation steps
    (their Geant4 worker processes included, with their start-up) over their showers."""
    from calofm.data.formats import file_info

    cpu, n = 0.0, 0
    for part in ("train", "test"):
        seconds = records.get(f"geant4_{plan.stem(plan.new_class)}_{part}", {}).get("cpu_seconds")
        path = plan.geant4(plan.new_class, part)
        if seconds and path.exists():
            cpu += seconds
            n += file_info(path).n
    return cpu / n if n else None


def build_summary(plan: Plan, records: dict) -> dict:
    """Everything the report says, as numbers."""
    generation = _json(plan.out / "calofm" / "generation.json")
    adapter = _json(plan.expert / "adapter.json")
    training = _json(plan.expert / "training.json")
    probe = _json(plan.out / "probe" / "comparison.json")
    trainable = (adapter.get("n_parameters") or {}).get("total")
    base = adapter.get("n_base_parameters")
    steps = {k: v.get("seconds") for k, v in records.items()}
    cpu = {k: v.get("cpu_seconds") for k, v in records.items()}
    return {
        "report": str(plan.report / "report.html"),
        "scale_name": plan.scale_name,
        "scale": asdict(plan.scale),
        "model": plan.model,
        "base_classes": plan.base_classes,
        "new_class": plan.new_class,
        "init_from": plan.init_from,
        "step_seconds": steps,
        "step_cpu_seconds": cpu,
        "total_minutes": round(sum(v or 0 for v in steps.values()) / 60, 2),
        "load_average": list(os.getloadavg()),
        "cores": os.cpu_count(),
        "classes": {c: class_metrics(plan.evaluation(c) / "metrics.json") for c in plan.tested},
        "seconds_per_shower": {
            "geant4": _geant4_seconds(plan, records),
            "generation": generation.get("seconds_per_shower_one_core"),
        },
        "generation": {k: generation.get(k) for k in ("n_hits", "n_truncated", "max_hits")},
        "expert": {
            "trainable_parameters": trainable,
            "base_parameters": base,
            "steps": training.get("step"),
            "epochs": training.get("epoch"),
            "training_seconds": training.get("elapsed_s"),
            "best_val_loss": training.get("best_val_loss"),
            "n_train_showers": training.get("n_train_showers"),
        },
        "base_classes_identical": bool(probe.get("identical")),
        "probe": probe,
    }


def write_summary(plan: Plan, records: dict, path: Path) -> dict:
    summary = build_summary(plan, records)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _num(value: float | None, spec: str = ".3g") -> str:
    return "&ndash;" if value is None else format(value, spec)


def _ratio(value: float | None) -> str:
    return "&ndash;" if value is None else f"{value:.1f}&times;"


def print_headline(summary: dict) -> None:
    print(f"\nreport: {summary['report']}  ({summary['total_minutes']:.1f} min in all)")
    print("W1x100 as a multiple of the Geant4 floor (1 = as close as Geant4 to itself), AUC:")
    for cls, m in summary["classes"].items():
        ratio = m["median_ratio"]
        auc, floor = m["classifier_auc"], m["floor_classifier_auc"]
        print(
            f"  {cls:14s} median {'-' if ratio is None else f'{ratio:.1f}x'} the floor; "
            f"classifier AUC {'-' if auc is None else f'{auc:.2f}'} "
            f"(floor {'-' if floor is None else f'{floor:.2f}'}, 0.5 = indistinguishable)"
        )
    t = summary["seconds_per_shower"]
    if t["geant4"] and t["generation"]:
        print(
            f"time per shower on one core: generation {t['generation']:.2f} s, Geant4 "
            f"{t['geant4']:.2f} s ({t['geant4'] / t['generation']:.1f}x)"
        )
    verdict = "bit-identical" if summary["base_classes_identical"] else "CHANGED"
    print(f"base classes' showers before and after the expert: {verdict}")


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
