"""Where the hottest hits go: the central columns against the halo, by energy rank.

A photon at normal incidence on the grid's centre puts its hottest cells in the central columns
(the 2 x 2 columns around the axis of a 30 x 30 grid): in Geant4, the 50 hottest hits of a 90 GeV
W shower all lie there, and a hit leaves them only once the central cells of its layer are taken.
This benchmark measures that for shower files, and for a model it compares what the model
predicts (teacher-forced on the reference showers, the voxels already used excluded as in
sampling) with what the reference does:

    python benchmarks/bench_placement.py REFERENCE.h5 [GENERATED.h5 ...] [--model DIR --class
        G4_W:gamma] [--n 100] [--out FILE]

Per rank bucket: the fraction of hits in the central columns, and per shower the number of hits
among the 100 hottest that left them while a central cell of their layer was still free. Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from calofm.data.formats import read_all
from calofm.data.showers import SparseShowers
from calofm.files import atomic_output
from calofm.model import load_model
from calofm.model.conditions import Conditions
from calofm.model.transformer import CaloFM
from calofm.tokens import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
BUCKETS = ((0, 4), (4, 20), (20, 50), (50, 100))


def central(detector) -> np.ndarray:
    """(voxels,) bool: the columns within one cell of the grid's centre, in every layer."""
    _, x, y = detector.voxel_to_lxy(np.arange(detector.n_voxels))
    cx, cy = (detector.nx - 1) / 2, (detector.ny - 1) / 2
    return (np.abs(x - cx) < 1) & (np.abs(y - cy) < 1)


def placement(showers: SparseShowers) -> dict:
    """Fractions in the central columns by rank; early escapes per shower."""
    det = showers.detector
    core = central(det)
    layer_of = det.voxel_to_lxy(np.arange(det.n_voxels))[0]
    per_layer = np.bincount(layer_of[core], minlength=det.n_layers)
    inside = {b: [] for b in BUCKETS}
    escapes = 0
    for i in range(len(showers)):
        v, e = showers.shower(i)
        v = v[np.argsort(-e, kind="stable")][: BUCKETS[-1][1]]
        taken = np.zeros(det.n_layers, int)
        for k, voxel in enumerate(v):
            layer = layer_of[voxel]
            if core[voxel]:
                taken[layer] += 1
            elif k >= BUCKETS[0][1] and taken[layer] < per_layer[layer]:
                escapes += 1
        for a, b in BUCKETS:
            inside[(a, b)].extend(core[v[a:b]])
    return {
        "central_fraction": {f"{a}-{b}": float(np.mean(inside[(a, b)])) for a, b in BUCKETS},
        "escapes_per_shower": escapes / max(len(showers), 1),
    }


@torch.no_grad()
def predicted(model: CaloFM, showers: SparseShowers, class_name: str) -> dict:
    """The model's probability that the next hit is central, teacher-forced, by rank."""
    tokenizer, config = Tokenizer(model.tokenizer), model.tokenizer
    encoded = tokenizer.encode(showers)
    core = torch.from_numpy(central(model.detector))
    routing = model.routing(torch.tensor([model.class_index(class_name)]))
    depth = BUCKETS[-1][1]
    probs = {b: [] for b in BUCKETS}
    for i in range(len(encoded)):
        a, b = encoded.offsets[i], encoded.offsets[i + 1]
        s = torch.tensor(np.r_[config.spatial_sos, encoded.spatial[a:b], config.spatial_eos])
        e = torch.tensor(np.r_[config.energy_sos, encoded.energy[a:b], config.energy_eos])
        s, e = s[None], e[None]
        cond = Conditions(torch.from_numpy(encoded.incident[i : i + 1]))
        if model.totals is not None:
            cond = cond.with_totals(*model.totals_of(s[:, 1:], e[:, 1:]))
        n = min(depth, b - a)
        target = s[:, 1 : n + 1]
        h = model.ln_f(model.hidden_states(s[:, :n], e[:, :n], cond, routing)[-1])
        history = s[:, :n] if model.config.exclude_used_voxels else None
        centre = torch.nonzero(core)[:, 0]
        # log P(centre voxel c at position j) for every central voxel, as the loss scores it
        lp = torch.stack(
            [
                model.spatial_head.log_prob(h, torch.full_like(target, int(c)), history)
                for c in centre
            ],
            dim=-1,
        )
        p = lp.exp()[0]  # (n, central voxels); taken voxels score ~0 after exclusion
        if history is not None:
            used = torch.zeros(config.n_voxels, dtype=torch.bool)
            mask = torch.ones_like(p, dtype=torch.bool)
            for j in range(n):
                mask[j] = ~used[centre]
                used[int(target[0, j])] = True
            p = p * mask
        for lo, hi in BUCKETS:
            probs[(lo, hi)].extend(p[lo:hi].sum(-1).tolist())
    return {f"{a}-{b}": float(np.mean(probs[(a, b)])) for a, b in BUCKETS if probs[(a, b)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference", type=Path)
    parser.add_argument("generated", type=Path, nargs="*")
    parser.add_argument("--model", help="model directory or shipped name")
    parser.add_argument("--class", dest="class_name", default="G4_W:gamma")
    parser.add_argument("--n", type=int, default=100, help="showers per file")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/placement.json")
    args = parser.parse_args()

    rows = {"reference": placement(read_all(args.reference, limit=args.n))}
    for path in args.generated:
        name = path.stem if path.stem not in rows else f"{path.parent.name}/{path.stem}"
        rows[name] = placement(read_all(path, limit=args.n))
    result: dict = {"reference": str(args.reference), "n_showers": args.n, "files": rows}
    if args.model:
        model = load_model(args.model).float().eval()
        reference = read_all(args.reference, limit=args.n)
        result["model"] = {
            "name": args.model,
            "predicted_central": predicted(model, reference, args.class_name),
        }
    names = [f"{a}-{b}" for a, b in BUCKETS]
    print(f"| sample | {' | '.join(f'central, ranks {k}' for k in names)} | early escapes |")
    print("|---" * (len(names) + 2) + "|")
    for name, row in rows.items():
        cells = " | ".join(f"{row['central_fraction'][k]:.3f}" for k in names)
        print(f"| {name} | {cells} | {row['escapes_per_shower']:.1f} |")
    if "model" in result:
        cells = " | ".join(f"{result['model']['predicted_central'][k]:.3f}" for k in names)
        print(f"| model's P(central), teacher-forced | {cells} | |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
