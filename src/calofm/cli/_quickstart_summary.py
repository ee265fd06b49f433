"""The quickstart's results as numbers (summary.json) and its headline on the terminal: each
class's metrics next to the Geant4 floor, the time per shower of generation and of Geant4, the
expert's parameters, the before/after probe and the wall time of every step.
"""

from __future__ import annotations

import json
import os
import statistics
from dataclasses import asdict
from pathlib import Path

from calofm.cli._quickstart_plan import Plan
from calofm.files import atomic_output


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
