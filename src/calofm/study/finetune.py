"""Fine-tuning study: a new class learnt from few showers, by expert adapter or full fine-tuning.

For every method, training-set size N and repeat r, one run trains with seed ``seed + r`` on
subset r of size N (disjoint subsets while the pool allows, bootstrap resamples after), generates
showers at the incident energies of the test file, and all runs are evaluated against it together.
The summary holds, per method and N, the mean and spread over repeats of every metric;
``figures/`` draws every observable as the mean of the repeats with a band (``study.figures``).
Forgetting: for the classes given in ``forgetting``, the base model's showers and each run's are
compared with that class's test file; an adapter run must reproduce the base model's showers
exactly, which the study checks. Every run has its own directory and is skipped when complete,
so a stopped study continues.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from calofm.adapters.config import AdapterConfig
from calofm.adapters.files import load_model_with_adapters
from calofm.adapters.stage import run_stage, stage_datasets
from calofm.data.formats import file_info, read_showers, write_showers
from calofm.data.showers import SparseShowers
from calofm.data.subsets import ShowerPool, split_indices, too_few_message
from calofm.errors import CalofmError
from calofm.files import atomic_output, check_output_dir, remove_outputs
from calofm.generation.engine import generate
from calofm.model.io import load_model
from calofm.model.seeding import seeded_init
from calofm.model.transformer import CaloFM
from calofm.study.figures import FIGURE_DIR, group_label, plot_study_observables
from calofm.training.config import TrainConfig
from calofm.training.distributed import resolve_device
from calofm.training.run import CHECKPOINT_DIR, SUMMARY_FILE
from calofm.training.trainer import train

METHODS = ("expert", "expert+condition", "full")
SUMMARY = "study.json"
STUDY_CONFIG = "study_config.json"
PLOT = "study.png"


@dataclass(frozen=True)
class StudyConfig:
    class_name: str
    train_paths: tuple[str, ...]
    test_path: str
    n_events: tuple[int, ...]
    repeats: int = 1
    methods: tuple[str, ...] = ("expert", "full")
    init_from: str | None = None
    n_generate: int | None = None  # None: one shower per test shower
    n_forgetting: int | None = None  # showers per forgetting class (None: n_generate)
    forgetting: tuple[tuple[str, str], ...] = ()  # (class, its test file)
    val_fraction: float = 0.05
    seed: int = 0
    generate_batch: int = 128
    max_hits: int | None = None  # None: the model tokenizer's
    eval_splits: int = 5
    adapter_dirs: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        unknown = set(self.methods) - set(METHODS)
        if unknown or not self.methods:
            raise CalofmError(f"study: methods must be among {', '.join(METHODS)}")
        if not self.n_events or min(self.n_events) < 1 or self.repeats < 1:
            raise CalofmError("study: need training sizes >= 1 and at least one repeat")
        if "full" in self.methods and self.adapter_dirs:
            raise CalofmError("study: full fine-tuning starts from a base model without adapters")

    def runs(self) -> list[tuple[str, int, int]]:
        return [(m, n, r) for m in self.methods for n in self.n_events for r in range(self.repeats)]


def run_name(method: str, n: int, repeat: int) -> str:
    return f"{method} n={n} r={repeat}"


def _file_stem(text: str) -> str:
    return text.replace(":", "_").replace("+", "_").replace(" ", "_").replace("=", "")


def _incident(path: str, n: int | None) -> np.ndarray:
    """The incident energies of the first ``n`` showers of a file (all when None)."""
    return read_showers(path, 0, n).incident


def _generate_to(model: CaloFM, cls: str, incident: np.ndarray, config: StudyConfig, path: Path):
    with tqdm(total=len(incident), desc=f"generate {cls}", unit="shower", leave=False) as bar:
        showers, _ = generate(
            model,
            cls,
            incident,
            seed=config.seed,
            batch_size=config.generate_batch,
            max_hits=config.max_hits,
            progress=bar.update,
        )
    write_showers(showers[cls], path)
    return showers[cls]


def _complete(path: Path, n: int) -> bool:
    """Whether ``path`` holds the ``n`` showers asked for (a changed count regenerates it)."""
    return path.is_file() and file_info(path).n == n


def _same(a: SparseShowers, b: SparseShowers) -> bool:
    return all(
        np.array_equal(x, y)
        for x, y in ((a.offsets, b.offsets), (a.voxels, b.voxels), (a.energies, b.energies))
    )


def _train_run(
    model_dir: str,
    config: StudyConfig,
    train_config: TrainConfig,
    method: str,
    n: int,
    r: int,
    run_dir: Path,
    device: str | None,
) -> CaloFM:
    """Train one run (unless complete: resumed from its checkpoint, or redone) and return it.

    Repeat r trains with seed ``seed + r``; its subset is drawn with the study's seed, so the
    subsets of the repeats stay disjoint.
    """
    train_config = replace(train_config, seed=config.seed + r)
    done = (run_dir / SUMMARY_FILE).is_file()
    resume = not done and (run_dir / CHECKPOINT_DIR).is_dir()
    if not done and not resume and run_dir.exists():
        shutil.rmtree(run_dir)  # stopped before its first checkpoint: start it again
    provenance = {"study": "finetune", "method": method, "n_events": n, "repeat": r}
    if method == "full":
        if not done:
            with seeded_init(train_config.seed):  # a new expert without --init-from is random
                model = load_model(model_dir)
                model.add_class(config.class_name, config.init_from)
            train_set, val_set, data = stage_datasets(
                model,
                config.class_name,
                list(config.train_paths),
                n_events=n,
                val_fraction=config.val_fraction,
                seed=config.seed,
                repeat=r,
            )
            train(
                model,
                train_set,
                val_set,
                train_config,
                None,
                run_dir,
                provenance={**provenance, "data": data},
                resume=resume,
                device=device,
            )
            shutil.rmtree(run_dir / CHECKPOINT_DIR, ignore_errors=True)
        return load_model(run_dir)
    adapters = list(config.adapter_dirs)
    if not done:
        model = load_model_with_adapters(model_dir, adapters)
        adapter = AdapterConfig(
            class_name=config.class_name,
            init_from=config.init_from,
            condition=method == "expert+condition",
        )
        run_stage(
            model,
            adapter,
            list(config.train_paths),
            train_config,
            run_dir,
            n_events=n,
            val_fraction=config.val_fraction,
            repeat=r,
            data_seed=config.seed,
            device=device,
            resume=resume,
            provenance=provenance,
        )
    return load_model_with_adapters(model_dir, [*adapters, str(run_dir)])


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
    pool = ShowerPool.open(list(config.train_paths)).n
    n_pool = len(split_indices(pool, config.val_fraction, config.seed)[0])
    if max(config.n_events) > n_pool:  # before any run, not after hours of them
        raise CalofmError(too_few_message(max(config.n_events), pool, n_pool, config.val_fraction))
    incident = _incident(config.test_path, config.n_generate)
    n_forget = config.n_forgetting or config.n_generate
    forget_incident = {c: _incident(p, n_forget) for c, p in config.forgetting}
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
            path = out_dir / "forgetting" / f"base_{_file_stem(cls)}.h5"
            path.parent.mkdir(exist_ok=True)
            if not _complete(path, len(forget_incident[cls])):
                _generate_to(base, cls, forget_incident[cls], config, path)
            base_showers[cls] = read_showers(path)
        del base

    candidates: dict[str, Path] = {}
    forgetting: dict[str, dict[str, Path]] = {c: {} for c, _ in config.forgetting}
    identical: dict[str, bool] = {}
    bootstrapped: dict[str, bool] = {}
    runs = tqdm(config.runs(), desc="study", unit="run")
    for method, n, r in runs:
        name = run_name(method, n, r)
        run_dir = runs_dir / _file_stem(f"{method}_n{n}_r{r}")
        runs.write(f"study: {name}")
        model = _train_run(model_dir, config, train_config, method, n, r, run_dir, device)
        model.to(gen_device)
        showers = run_dir / "showers.h5"
        if not _complete(showers, len(incident)):
            _generate_to(model, config.class_name, incident, config, showers)
        candidates[name] = showers
        bootstrapped[name] = _bootstrapped(run_dir, method)
        for cls, _ in config.forgetting:
            path = run_dir / f"forgetting_{_file_stem(cls)}.h5"
            if not _complete(path, len(forget_incident[cls])):
                _generate_to(model, cls, forget_incident[cls], config, path)
            forgetting[cls][name] = path
            identical[f"{cls} / {name}"] = _same(read_showers(path), base_showers[cls])
            if method != "full" and not identical[f"{cls} / {name}"]:
                raise CalofmError(f"{name}: the adapter changed the showers of {cls}")

    metrics = _evaluate(config.test_path, candidates, out_dir / "eval", config)
    forget_metrics = {
        cls: _evaluate(
            path,
            {"base": out_dir / "forgetting" / f"base_{_file_stem(cls)}.h5", **forgetting[cls]},
            out_dir / "eval_forgetting" / _file_stem(cls),
            config,
        )
        for cls, path in config.forgetting
    }
    summary = {
        "class": config.class_name,
        "n_compared": metrics["n_compared"],
        "floor": _scores(metrics["floor"]),
        "groups": _aggregate(config, metrics),
        "forgetting": {
            cls: {
                "base": _scores(m["candidates"]["base"]),
                "groups": _aggregate(config, m),
                "floor": _scores(m["floor"]),
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
    _plot(summary, out_dir / PLOT)
    return summary


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


def _bootstrapped(run_dir: Path, method: str) -> bool:
    """Whether a run trained on a bootstrap resample (its data provenance says so)."""
    manifest = run_dir / ("manifest.json" if method == "full" else "adapter.json")
    return bool(json.loads(manifest.read_text())["provenance"]["data"]["bootstrapped"])


def _evaluate(reference: str, candidates: dict[str, Path], out: Path, config: StudyConfig) -> dict:
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


def _scores(entry: dict) -> dict[str, float]:
    out = {name: o["w1x100"] for name, o in entry["observables"].items()}
    out["classifier_auc"] = entry["classifier_auc"]
    return out


def _aggregate(config: StudyConfig, metrics: dict) -> dict[str, dict]:
    """Per 'method n=N': mean and spread (std over repeats) of every score."""
    out = {}
    for method in config.methods:
        for n in config.n_events:
            per_run = [
                _scores(metrics["candidates"][run_name(method, n, r)])
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


def _plot(summary: dict, path: Path) -> None:
    """A bare ``Figure`` (no pyplot): no global backend or figure state is touched."""
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
