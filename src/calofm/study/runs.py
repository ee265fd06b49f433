"""One run of a fine-tuning study: trained (or resumed, or reused when complete) in its own
directory, and the showers it generates; what the study compares between runs.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from calofm.adapters.config import AdapterConfig
from calofm.adapters.files import load_model_with_adapters
from calofm.adapters.stage import run_stage, stage_datasets
from calofm.data.formats import file_info, read_showers, write_showers
from calofm.data.showers import SparseShowers
from calofm.generation.engine import generate
from calofm.model.io import load_model
from calofm.model.seeding import seeded_init
from calofm.model.transformer import CaloFM
from calofm.study.config import StudyConfig
from calofm.training.config import TrainConfig
from calofm.training.run import CHECKPOINT_DIR, SUMMARY_FILE
from calofm.training.trainer import train


def run_name(method: str, n: int, repeat: int) -> str:
    """A run's name in the summary and the evaluation: 'expert n=1000 r=0'."""
    return f"{method} n={n} r={repeat}"


def file_stem(text: str) -> str:
    """``text`` (a run or class name) as a file or directory name."""
    return text.replace(":", "_").replace("+", "_").replace(" ", "_").replace("=", "")


def incident_of(path: str, n: int | None) -> np.ndarray:
    """The incident energies of the first ``n`` showers of a file (all when None)."""
    return read_showers(path, 0, n).incident


def generate_to(
    model: CaloFM, cls: str, incident: np.ndarray, config: StudyConfig, path: Path
) -> SparseShowers:
    """One shower of ``cls`` per incident energy, with the study's seed, written to ``path``."""
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


def is_complete(path: Path, n: int) -> bool:
    """Whether ``path`` holds the ``n`` showers asked for (a changed count regenerates it)."""
    return path.is_file() and file_info(path).n == n


def same_showers(a: SparseShowers, b: SparseShowers) -> bool:
    """Whether two sets hold the same hits, bit for bit (an adapter must not change a class)."""
    return all(
        np.array_equal(x, y)
        for x, y in ((a.offsets, b.offsets), (a.voxels, b.voxels), (a.energies, b.energies))
    )


def train_run(
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


def was_bootstrapped(run_dir: Path, method: str) -> bool:
    """Whether a run trained on a bootstrap resample (its data provenance says so)."""
    manifest = run_dir / ("manifest.json" if method == "full" else "adapter.json")
    return bool(json.loads(manifest.read_text())["provenance"]["data"]["bootstrapped"])
