"""Does a reduced-precision decode step distort showers? fp32 against bf16 and fp16 on the metrics.

``calofm generate --precision bf16|fp16`` runs the step's matrix products in that type (RoPE,
attention scores, the KV cache and sampling stay fp32). Here a trained model generates the same
showers (same seed: same incident energies and uniforms) in each precision, for each class, at the
incident energies of the first ``--n`` showers of the class's Geant4 test file:

- paired: the share of showers a reduced precision puts in exactly the cells fp32 does, and the
  share of its cells that fp32's shower also has (one changed draw changes the draws after it);
- against Geant4: each precision's W1 x 100 per observable over the Geant4 floor at the same sample
  size, and the classifier AUC, all from one ``calofm evaluate`` per class. Paired samples differ
  only where the precision changed a draw, so a difference between precisions is the precision's,
  not a seed's.

    python benchmarks/bench_precision.py --model small-w-ta --data-dir ../shared/data/sim \\
        --n 200 --out benchmarks/results/precision_small_w_ta.json

On a CPU without bf16 or fp16 arithmetic the reduced precisions run several times slower than
fp32 (what is measured here is fidelity, not speed). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from calofm.data.formats import incident_energies, write_showers
from calofm.data.showers import SparseShowers
from calofm.evaluation.report import evaluate
from calofm.files import atomic_output
from calofm.generation.decoder import PRECISIONS, EngineConfig
from calofm.generation.engine import generate
from calofm.model import load_model
from calofm.model.config import parse_class

CLASSES = {"G4_W:gamma": "W_gamma", "G4_Ta:gamma": "Ta_gamma"}
OBSERVABLES = ("energy_sum", "n_hits", "cell_energy", "cog_z", "cog_x", "cog_y",
               "energy_per_layer", "radial_profile")  # fmt: skip


def paired(a: SparseShowers, b: SparseShowers) -> dict:
    """How many showers ``b`` puts in exactly the cells ``a`` does, and the share of its cells
    that ``a``'s shower also has (energies are compared by the metrics: a shower's drawn visible
    energy rescales all of them, so one changed draw changes every energy)."""
    same, shared, total = 0, 0, 0
    for i in range(len(a)):
        va = set(a.voxels[a.offsets[i] : a.offsets[i + 1]].tolist())
        vb = set(b.voxels[b.offsets[i] : b.offsets[i + 1]].tolist())
        same += int(va == vb)
        shared += len(va & vb)
        total += len(vb)
    return {"identical_cells": same / len(a), "cells_shared": shared / max(total, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small-w-ta")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/sim"))
    parser.add_argument("--n", type=int, default=200, help="showers per class and precision")
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path("runs/precision"))
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if "fp32" not in args.precisions:
        args.precisions.insert(0, "fp32")
    model = load_model(args.model)
    result: dict = {
        "model": args.model,
        "n_per_class": args.n,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
        "classes": {},
    }
    for cls, stem in CLASSES.items():
        if cls not in model.classes:
            continue
        reference = args.data_dir / f"{stem}_test.h5"
        incident = incident_energies(reference)[: args.n]
        work = args.work / parse_class(cls)[0]
        work.mkdir(parents=True, exist_ok=True)
        showers, files, seconds = {}, {}, {}
        for p in args.precisions:
            t0 = time.process_time()
            out, _ = generate(
                model, cls, incident, seed=args.seed, batch_size=100,
                engine=EngineConfig(precision=p),
            )  # fmt: skip
            seconds[p] = time.process_time() - t0
            showers[p] = out[cls]
            files[p] = write_showers(showers[p], work / f"gen_{p}.h5")
        metrics = evaluate(reference, files, work / "eval", progress=False)
        floor = metrics["floor"]
        per = {}
        for p in args.precisions:
            cand = metrics["candidates"][p]
            per[p] = {
                "cpu_seconds_per_shower": seconds[p] / args.n,
                "classifier_auc": cand["classifier_auc"],
                "w1_over_floor": {
                    o: cand["observables"][o]["w1x100"] / floor["observables"][o]["w1x100"]
                    for o in OBSERVABLES
                },
                **({} if p == "fp32" else paired(showers["fp32"], showers[p])),
            }
        result["classes"][cls] = {
            "reference": str(reference),
            "auc_floor": floor["classifier_auc"],
            "precisions": per,
        }
        print(f"{cls}: {args.n} generated showers per precision against {reference.name}")
        print(f"{'':>6} | AUC (floor {floor['classifier_auc']:.3f}) | same cells | shared | "
              + " | ".join(OBSERVABLES))  # fmt: skip
        for p, r in per.items():
            ratios = " | ".join(f"{r['w1_over_floor'][o]:.2f}" for o in OBSERVABLES)
            same = f"{r['identical_cells']:.2f}" if "identical_cells" in r else "-"
            kept = f"{r['cells_shared']:.2f}" if "identical_cells" in r else "-"
            print(f"{p:>6} | {r['classifier_auc']:.3f} | {same} | {kept} | {ratios}")
    if args.out:
        with atomic_output(args.out) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
