"""The quickstart's generation step: every class in one mixed call, one showerdata file per class.

Rows of all classes are interleaved (row r is class r mod K) and go to ``generate`` in tasks of
``task_rows`` rows, so every call holds every class, each row routed to its own expert (the
engine decodes all classes in one batch, ``slots`` of it per class, refilled as showers end).
Row r draws from its own seeded stream, so the showers do not depend on which worker process
decodes which task. Each task's showers are saved under ``PARTIAL_DIR/batch_NNNN.npz``
(atomically) as it finishes: an interrupted run resumes at the first missing task.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from calofm.cli._quickstart_plan import Plan
from calofm.data.showers import SparseShowers
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.files import atomic_output

_models: dict[tuple, object] = {}  # a process's model, loaded by its first batch


def incident_energies(seed: int, n: int, energy_gev: tuple[float, float]) -> np.ndarray:
    """The incident energies of rows 0..n-1 (GeV), the same for any batching or worker count."""
    from calofm.generation.engine import INCIDENT, seeded_rng

    return seeded_rng(seed, INCIDENT).uniform(*energy_gev, n).astype(np.float32)


def row_classes(classes: list[str], n_per_class: int) -> list[str]:
    """Class of every row: interleaved, so each batch mixes all classes."""
    return [classes[r % len(classes)] for r in range(n_per_class * len(classes))]


def _init_worker(parent: int) -> None:
    """Each worker process decodes on one core (several processes use the cores without the
    oversubscription that two-thread processes suffer on a shared machine); like a Geant4
    worker, it ends at once on Ctrl-C and when its parent is killed (finished batches are on
    disk)."""
    import torch

    from calofm.simulation.runner import init_worker

    init_worker(parent)
    torch.set_num_threads(1)


def _decode_batch(task: tuple) -> tuple[int, dict[str, dict[str, np.ndarray]], float, float]:
    """Generate one batch of rows in a worker; return its showers per class as arrays, and the
    wall and CPU seconds it took (the worker's model loading included)."""
    from calofm.adapters import load_model_with_adapters
    from calofm.generation.engine import generate

    index, model_dir, adapters, classes, incident, seed, first_row, max_hits, slots = task
    start, cpu = time.perf_counter(), time.process_time()
    key = (model_dir, tuple(adapters))
    if key not in _models:
        _models.clear()
        _models[key] = load_model_with_adapters(model_dir, adapters, "cpu")
    showers, stats = generate(
        _models[key],
        classes,
        incident,
        seed=seed,
        batch_size=slots * len(set(classes)),
        max_hits=max_hits,
        first_row=first_row,
    )
    arrays = {c: shower_arrays(s) for c, s in showers.items()}
    arrays["_stats"] = {k: np.array(stats[k]) for k in ("n_hits", "n_duplicates", "n_truncated")}
    return index, arrays, time.perf_counter() - start, time.process_time() - cpu


def shower_arrays(showers: SparseShowers) -> dict[str, np.ndarray]:
    """A set's arrays by name, as the batch and probe files store them."""
    return {
        "offsets": showers.offsets,
        "voxels": showers.voxels,
        "energies": showers.energies,
        "incident": showers.incident,
    }


@contextmanager
def _in_process() -> Iterator[Callable[[list[tuple]], Iterator[tuple]]]:
    """One worker: this process on one thread, without a process's start-up."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield lambda tasks: map(_decode_batch, tasks)
    finally:
        torch.set_num_threads(threads)
        _models.clear()


@contextmanager
def _pool(workers: int) -> Iterator[Callable[[list[tuple]], Iterator[tuple]]]:
    """``workers`` processes decoding batches, results in task order."""
    if workers <= 1:
        with _in_process() as decode:
            yield decode
        return
    executor = ProcessPoolExecutor(
        workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(os.getpid(),),
    )
    try:
        yield lambda tasks: executor.map(_decode_batch, tasks)
    except BrokenProcessPool:
        executor.shutdown(wait=False, cancel_futures=True)
        raise CalofmError(
            "a generation worker process died (out of memory? its message is above); run the "
            "same command again to resume"
        ) from None
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown()


def _save_batch(
    path: Path, arrays: dict[str, dict[str, np.ndarray]], seconds: float, cpu: float
) -> None:
    flat = {f"{c}|{k}": v for c, parts in arrays.items() for k, v in parts.items()}
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, seconds=np.array(seconds), cpu_seconds=np.array(cpu), **flat)


def _load_batch(path: Path) -> tuple[dict[str, dict[str, np.ndarray]], float, float]:
    arrays: dict[str, dict[str, np.ndarray]] = {}
    with np.load(path) as f:
        seconds, cpu = float(f["seconds"]), float(f["cpu_seconds"])
        for key in f.files:
            if "|" in key:
                c, k = key.split("|")
                arrays.setdefault(c, {})[k] = f[key]
    return arrays, seconds, cpu


def generate_mixed(
    model_dir: str,
    adapters: list[str],
    classes: list[str],
    n_per_class: int,
    energy_gev: tuple[float, float],
    seed: int,
    max_hits: int | None,
    task_rows: int,
    slots: int,
    workers: int,
    partial_dir: Path,
    progress: Callable[[int], object] | None = None,
) -> tuple[dict[str, list[dict[str, np.ndarray]]], dict]:
    """Decode every task not yet in ``partial_dir`` (``workers`` processes), then return each
    class's showers task by task in row order and the statistics (summed over all tasks,
    resumed or not)."""
    per_row = row_classes(classes, n_per_class)
    incident = incident_energies(seed, len(per_row), energy_gev)
    starts = list(range(0, len(per_row), task_rows))
    partial_dir.mkdir(parents=True, exist_ok=True)
    paths = [partial_dir / f"batch_{k:04d}.npz" for k in range(len(starts))]
    todo = [k for k, p in enumerate(paths) if not p.exists()]
    if progress is not None:
        progress(len(starts) - len(todo))
    tasks = [
        (
            k,
            model_dir,
            adapters,
            per_row[starts[k] : starts[k] + task_rows],
            incident[starts[k] : starts[k] + task_rows],
            seed,
            starts[k],
            max_hits,
            slots,
        )
        for k in todo
    ]
    with _pool(min(workers, len(tasks))) as decode:
        for k, arrays, seconds, cpu in decode(tasks):
            _save_batch(paths[k], arrays, seconds, cpu)
            if progress is not None:
                progress(1)
    per_class: dict[str, list[dict[str, np.ndarray]]] = {c: [] for c in classes}
    stats = {"n_hits": 0, "n_duplicates": 0, "n_truncated": 0}
    stats |= {"worker_seconds": 0.0, "worker_cpu_seconds": 0.0}
    for path in paths:
        arrays, seconds, cpu = _load_batch(path)
        stats["worker_seconds"] += seconds
        stats["worker_cpu_seconds"] += cpu
        for key, value in arrays.pop("_stats").items():
            stats[key] += int(value)
        for c, parts in arrays.items():
            per_class[c].append(parts)
    missing = [c for c, parts in per_class.items() if not parts]
    if missing:
        raise CalofmError(f"{partial_dir}: no showers of {', '.join(missing)} (stale batches?)")
    return per_class, stats


def to_showers(
    parts: list[dict[str, np.ndarray]], detector: DetectorConfig, particle: str
) -> SparseShowers:
    """One class's batches as one set of showers."""
    from calofm.data.showers import concatenate

    return concatenate(
        [
            SparseShowers(
                p["offsets"], p["voxels"], p["energies"], p["incident"], detector, particle
            )
            for p in parts
        ]
    )


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
        per_class, stats = generate_mixed(
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
        showers = to_showers(per_class[cls], model.detector.with_material(material), particle)
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
