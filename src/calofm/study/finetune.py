"""Fine-tuning study: a new class learnt from few showers, by expert adapter or full fine-tuning.

For every method, training-set size N and repeat r, one run trains with seed ``seed + r`` on
subset r of size N (disjoint subsets while the pool allows, bootstrap resamples after), generates
showers at the incident energies of the test file, and all runs are evaluated against it together.
The summary holds, per method and N, the mean and spread over repeats of every metric
(``study.summary``); ``figures/`` draws every observable as the mean of the repeats with a band
(``study.figures``).
Forgetting: for the classes given in ``forgetting``, the base model's showers and each run's are
compared with that class's test file; an adapter run must reproduce the base model's showers
exactly, which the study checks. Every run has its own directory (``study.runs``) and is skipped
when complete, so a stopped study continues.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from tqdm import tqdm

from calofm.adapters.files import load_model_with_adapters
from calofm.data.formats import file_info, read_showers
from calofm.data.layouts import ShowerFileInfo
from calofm.data.showers import SparseShowers
from calofm.data.subsets import ShowerPool, split_indices, too_few_message
from calofm.detector import material_long
from calofm.errors import CalofmError
from calofm.files import atomic_output, check_output_dir, remove_outputs
from calofm.model.config import parse_class
from calofm.study.config import StudyConfig
from calofm.study.figures import FIGURE_DIR, group_label, plot_study_observables
from calofm.study.runs import (
    file_stem,
    generate_to,
    incident_of,
    is_complete,
    run_name,
    same_showers,
    train_run,
    was_bootstrapped,
)
from calofm.study.summary import aggregate, evaluate_runs, plot_summary, run_scores
from calofm.training.config import TrainConfig
from calofm.training.distributed import resolve_device

SUMMARY = "study.json"
STUDY_CONFIG = "study_config.json"
PLOT = "study.png"


def run_finetune_study(
    model_dir: str,
    config: StudyConfig,
    train_config: TrainConfig,
    out_dir: str | Path,
    device: str | None = None,
    overwrite: bool = False,
) -> dict:
    """Run every (method, N, repeat), evaluate them together; write and return the summary.

    Every input is checked before anything is created. A study directory made with other settings
    is refused (its runs would be mixed with these) unless ``overwrite``, which removes it first.
    """
    train_files = ShowerPool.open(list(config.train_paths))
    _check_class(train_files.infos[0], config.class_name, "--data")
    _check_class(file_info(config.test_path), config.class_name, "--test")
    for cls, path in config.forgetting:
        _check_class(file_info(path), cls, "--forgetting")
    pool = train_files.n
    n_pool = len(split_indices(pool, config.val_fraction, config.seed)[0])
    if max(config.n_events) > n_pool:  # before any run, not after hours of them
        raise CalofmError(too_few_message(max(config.n_events), pool, n_pool, config.val_fraction))
    incident = incident_of(config.test_path, config.n_generate)
    n_forget = config.n_forgetting or config.n_generate
    forget_incident = {c: incident_of(p, n_forget) for c, p in config.forgetting}
    out_dir = check_output_dir(out_dir)
    settings = json.dumps({"study": asdict(config), "train": train_config.to_dict()}, indent=1)
    _claim_study_dir(out_dir, settings, overwrite)
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / STUDY_CONFIG).write_text(settings)
    gen_device = resolve_device(device)
    base_showers: dict[str, SparseShowers] = {}
    if config.forgetting:
        base = load_model_with_adapters(model_dir, list(config.adapter_dirs), gen_device)
        for cls, _ in config.forgetting:
            path = out_dir / "forgetting" / f"base_{file_stem(cls)}.h5"
            path.parent.mkdir(exist_ok=True)
            if not is_complete(path, len(forget_incident[cls])):
                generate_to(base, cls, forget_incident[cls], config, path)
            base_showers[cls] = read_showers(path)
        del base

    candidates: dict[str, Path] = {}
    forgetting: dict[str, dict[str, Path]] = {c: {} for c, _ in config.forgetting}
    identical: dict[str, bool] = {}
    bootstrapped: dict[str, bool] = {}
    runs = tqdm(config.runs(), desc="study", unit="run")
    for method, n, r in runs:
        name = run_name(method, n, r)
        run_dir = runs_dir / file_stem(f"{method}_n{n}_r{r}")
        runs.write(f"study: {name}")
        model = train_run(model_dir, config, train_config, method, n, r, run_dir, device)
        model.to(gen_device)
        showers = run_dir / "showers.h5"
        if not is_complete(showers, len(incident)):
            generate_to(model, config.class_name, incident, config, showers)
        candidates[name] = showers
        bootstrapped[name] = was_bootstrapped(run_dir, method)
        for cls, _ in config.forgetting:
            path = run_dir / f"forgetting_{file_stem(cls)}.h5"
            if not is_complete(path, len(forget_incident[cls])):
                generate_to(model, cls, forget_incident[cls], config, path)
            forgetting[cls][name] = path
            identical[f"{cls} / {name}"] = same_showers(read_showers(path), base_showers[cls])
            if method != "full" and not identical[f"{cls} / {name}"]:
                raise CalofmError(f"{name}: the adapter changed the showers of {cls}")

    metrics = evaluate_runs(config.test_path, candidates, out_dir / "eval", config)
    forget_metrics = {
        cls: evaluate_runs(
            path,
            {"base": out_dir / "forgetting" / f"base_{file_stem(cls)}.h5", **forgetting[cls]},
            out_dir / "eval_forgetting" / file_stem(cls),
            config,
        )
        for cls, path in config.forgetting
    }
    summary = {
        "class": config.class_name,
        "n_compared": metrics["n_compared"],
        "floor": run_scores(metrics["floor"]),
        "groups": aggregate(config, metrics),
        "forgetting": {
            cls: {
                "base": run_scores(m["candidates"]["base"]),
                "groups": aggregate(config, m),
                "floor": run_scores(m["floor"]),
            }
            for cls, m in forget_metrics.items()
        },
        "base_showers_identical": identical,
        "bootstrapped": bootstrapped,
    }
    groups: dict[str, list[Path]] = {}
    n_bootstrapped: dict[str, int] = {}
    for method, n, r in config.runs():
        group = f"{method} n={n}"
        groups.setdefault(group, []).append(candidates[run_name(method, n, r)])
        n_bootstrapped[group] = n_bootstrapped.get(group, 0) + bootstrapped[run_name(method, n, r)]
    full_data = {f"{m} n={n_pool}" for m in config.methods}
    summary["labels"] = {
        g: group_label(g, len(runs), g in full_data, n_bootstrapped[g])
        for g, runs in groups.items()
    }
    figures = plot_study_observables(
        config.test_path,
        groups,
        metrics["settings"]["bin_edges"],
        summary["groups"],
        out_dir / FIGURE_DIR,
        full_data=full_data,
        bootstrapped=n_bootstrapped,
    )
    summary["figures"] = {k: f"{FIGURE_DIR}/{v}" for k, v in figures.items()}
    with atomic_output(out_dir / SUMMARY) as tmp:
        tmp.write_text(json.dumps(summary, indent=1))
    plot_summary(summary, out_dir / PLOT)
    return summary


def _check_class(info: ShowerFileInfo, cls: str, option: str) -> None:
    """Refuse a file whose metadata names another material or particle than ``cls``, before the
    study directory is made (not when the first run reads it, or never for a test file)."""
    material, particle = parse_class(cls)
    meta = info.metadata
    if (meta.get("material") and material_long(str(meta["material"])) != material) or (
        meta.get("particle") and meta["particle"] != particle
    ):
        raise CalofmError(
            f"{option} {info.path}: holds {info.detector.material}:{info.particle} showers, "
            f"not {cls}"
        )


def _claim_study_dir(out_dir: Path, settings: str, overwrite: bool) -> None:
    """Refuse (or with ``overwrite`` clear) a study directory made with other settings."""
    config_path = out_dir / STUDY_CONFIG
    outputs = [STUDY_CONFIG, "runs", "forgetting", "eval", "eval_forgetting", FIGURE_DIR]
    outputs += [SUMMARY, PLOT]
    present = [name for name in outputs if (out_dir / name).exists()]
    if not present:
        return
    same = config_path.is_file() and config_path.read_text() == settings
    if same:
        return  # the same study: finished runs are reused, a stopped one continues
    if not overwrite:
        raise CalofmError(
            f"{out_dir} holds a study made with other settings; rerun it with those, choose "
            "another --out, or add --overwrite to replace it"
        )
    remove_outputs(out_dir, present)
