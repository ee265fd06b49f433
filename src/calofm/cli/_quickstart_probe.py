"""The proof that the expert leaves the base classes alone: the same generation (seed, rows,
incident energies) before and after the expert is added, compared byte for byte.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from calofm.cli._quickstart_generate import incident_energies, row_classes, shower_arrays
from calofm.cli._quickstart_plan import Plan
from calofm.files import atomic_output


def compare_probes(plan: Plan, settings: tuple) -> None:
    """Generate the probe with the expert attached and compare it with the one made before."""
    probe_dir = plan.out / "probe"
    after = probe(plan.model, [str(plan.expert)], *settings)
    save_arrays(probe_dir / "after.npz", after)
    before = load_arrays(probe_dir / "before.npz")
    same = identical(before, after)
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


def probe(
    model_dir: str,
    adapters: list[str],
    classes: list[str],
    n_per_class: int,
    energy_gev: tuple[float, float],
    seed: int,
    max_hits: int | None,
) -> dict[str, np.ndarray]:
    """The showers of ``classes`` for one fixed batch (seed, rows, energies), generated on one
    thread: the same call before and after a stage must give the same bytes."""
    import torch

    from calofm.adapters import load_model_with_adapters
    from calofm.generation.engine import generate

    per_row = row_classes(classes, n_per_class)
    incident = incident_energies(seed, len(per_row), energy_gev)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = load_model_with_adapters(model_dir, adapters, "cpu")
        showers, _ = generate(
            model, per_row, incident, seed=seed, batch_size=len(per_row), max_hits=max_hits
        )
    finally:
        torch.set_num_threads(threads)
    return {f"{c}|{k}": v for c, s in showers.items() for k, v in shower_arrays(s).items()}


def save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)


def load_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, bool]:
    """Per class: whether its showers are the same bytes in ``a`` and ``b``."""
    classes = sorted({k.split("|")[0] for k in (*a, *b)})
    return {
        c: all(
            f"{c}|{k}" in a
            and f"{c}|{k}" in b
            and a[f"{c}|{k}"].dtype == b[f"{c}|{k}"].dtype
            and np.array_equal(a[f"{c}|{k}"], b[f"{c}|{k}"])
            for k in ("offsets", "voxels", "energies", "incident")
        )
        for c in classes
    }
