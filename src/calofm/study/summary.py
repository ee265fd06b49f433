"""The study's numbers: every run's showers evaluated together against the test file (reused when
nothing changed), the mean and spread over repeats of every score, and their bar chart.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from calofm.files import atomic_output
from calofm.study.config import StudyConfig
from calofm.study.runs import run_name


def evaluate_runs(
    reference: str, candidates: dict[str, Path], out: Path, config: StudyConfig
) -> dict:
    """``calofm evaluate``'s metrics, with every shower of the reference: its halves give the
    floor, and while they are at least as large as a run's sample, every run is compared with all
    of its showers (so identical showers get identical numbers). Reused when the same files were
    evaluated after they were last written (a study run again after it finished)."""
    from calofm.evaluation.metrics import MetricConfig
    from calofm.evaluation.report import METRICS_FILE, evaluate

    metric_config = MetricConfig(n_splits=config.eval_splits, seed=config.seed)
    files = {"reference": str(reference), **{k: str(v) for k, v in candidates.items()}}
    done = out / METRICS_FILE
    if done.is_file():
        old = json.loads(done.read_text())
        newest = max(Path(f).stat().st_mtime for f in files.values())
        settings = old.get("settings", {})
        if (
            settings.get("files") == files
            and settings.get("metric_config") == json.loads(json.dumps(metric_config.to_dict()))
            and settings.get("max_showers") is None
            and done.stat().st_mtime > newest
        ):
            return old
    # no event displays: one row of dozens of runs' showers says little; figures/ compares them
    return evaluate(reference, candidates, out, metric_config=metric_config, event_displays=False)


def run_scores(entry: dict) -> dict[str, float]:
    """Every observable's W1x100 and the classifier AUC of one entry of metrics.json."""
    out = {name: o["w1x100"] for name, o in entry["observables"].items()}
    out["classifier_auc"] = entry["classifier_auc"]
    return out


def aggregate(config: StudyConfig, metrics: dict) -> dict[str, dict]:
    """Per 'method n=N': mean and spread (std over repeats) of every score."""
    out = {}
    for method in config.methods:
        for n in config.n_events:
            per_run = [
                run_scores(metrics["candidates"][run_name(method, n, r)])
                for r in range(config.repeats)
                if run_name(method, n, r) in metrics["candidates"]
            ]
            if not per_run:
                continue
            out[f"{method} n={n}"] = {key: _spread([s[key] for s in per_run]) for key in per_run[0]}
    return out


def _spread(values: list[float | None]) -> dict:
    """Mean and std over the repeats with a finite value (None where a metric is undefined)."""
    finite = [v for v in values if v is not None and np.isfinite(v)]
    if not finite:
        return {"mean": None, "std": None, "repeats": 0}
    return {"mean": float(np.mean(finite)), "std": float(np.std(finite)), "repeats": len(finite)}


def plot_summary(summary: dict, path: Path) -> None:
    """Each group's mean W1x100 per observable (std over repeats) beside the floor, as a bare
    ``Figure`` (no pyplot): no global backend or figure state is touched."""
    from matplotlib.figure import Figure

    groups = summary["groups"]
    keys = [k for k in summary["floor"] if k != "classifier_auc"]
    x = np.arange(len(keys))
    width = 0.8 / max(len(groups), 1)
    fig = Figure(figsize=(max(8, 0.5 * len(keys)), 4.5))
    ax = fig.subplots()
    for i, (name, scores) in enumerate(groups.items()):
        ax.bar(
            x + i * width,
            [_nan(scores[k]["mean"]) for k in keys],
            width,
            yerr=[_nan(scores[k]["std"]) for k in keys],
            label=name,
            capsize=2,
        )
    ax.scatter(
        x + 0.4 - width / 2,
        [_nan(summary["floor"][k]) for k in keys],
        color="k",
        marker="_",
        s=200,
        label="floor (Geant4 vs Geant4)",
        zorder=3,
    )
    ax.set_xticks(x + 0.4 - width / 2, keys, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("W1 x 100 (mean, std over repeats)")
    ax.set_yscale("log")
    ax.set_title(f"{summary['class']}: fine-tuning methods against the test showers")
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")


def _nan(value: float | None) -> float:
    return float("nan") if value is None else value
