"""The shower-totals model alone: its hit count and visible energy at fixed incident energies.

A model with shower totals (``ModelConfig.totals``) draws each shower's hit count and visible energy
first and generates the shower to have them, so the generated showers' totals are only as good as
this small density model. This benchmark refits the totals networks of a trained model several
times (different seeds, the transformer untouched) on the training showers, and for each fit and for
the model's own networks reports the held-out NLL and, at fixed incident energies, W1x100 of the hit
count and of the visible energy against ``calofm simulate`` samples, as ratios to the Geant4 floor
(two halves of the reference file). Both sides' totals are counted from tokens, as the model counts
them, so the numbers measure the totals model and nothing downstream of it:

    python benchmarks/bench_totals.py --model small-w-ta --fits 5 --fixed-dir FIXED \\
        --out benchmarks/results/totals_refit.json

``--fixed-dir`` holds ``W_gamma_10GeV.h5`` ... as made by ``calofm simulate``. Prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from calofm.data.batches import TokenDataset
from calofm.data.formats import read_all
from calofm.evaluation.metrics import Standardiser, w1x100
from calofm.files import atomic_output
from calofm.model import load_model
from calofm.model.conditions import Conditions
from calofm.model.totals import from_point, to_point
from calofm.model.transformer import CaloFM
from calofm.tokens import Tokenizer
from calofm.training.data import build_datasets, load_classes
from calofm.training.totals import dataset_totals, fit_totals

ROOT = Path(__file__).resolve().parents[1]
SHORT = {"G4_W:gamma": "W", "G4_Ta:gamma": "Ta"}


def held_out_nll(model: CaloFM, dataset: TokenDataset, class_id: int, seed: int) -> float:
    """Mean NLL per shower of the class's held-out totals (the count dequantised by a uniform)."""
    assert model.totals is not None
    rows = np.flatnonzero(dataset.class_id == class_id)
    n_hits, visible = dataset_totals(model, dataset)
    incident = torch.from_numpy(dataset.incident[rows])
    features = Conditions(incident).features(torch.float32)
    u = torch.rand(len(rows), generator=torch.Generator().manual_seed(seed))
    point = to_point(torch.from_numpy(n_hits[rows]), torch.from_numpy(visible[rows]), u)
    routing = model.routing(torch.full((len(rows),), class_id))
    with torch.no_grad():
        return float(-model.totals.log_prob(features, routing, point).mean())


def draw(model: CaloFM, class_id: int, energy_gev: float, n: int, seed: int) -> np.ndarray:
    """(n, 2): hit counts and visible MeV drawn from the class's totals at one incident energy."""
    assert model.totals is not None
    tok = Tokenizer(model.tokenizer)
    scaled = torch.from_numpy(tok.scale_incident(np.full(n, energy_gev, np.float32)))
    features = Conditions(scaled).features(torch.float32)
    u = torch.rand(n, 3, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        point = model.totals.sample(features, model.routing(torch.full((n,), class_id)), u)
    hits, visible = from_point(point, model.tokenizer.max_hits)
    return np.stack([hits.numpy().astype(np.float64), visible.numpy().astype(np.float64)], 1)


def ratios(reference: np.ndarray, candidate: np.ndarray, splits: int, seed: int) -> dict:
    """W1x100 / floor of hits and visible energy, over random halves of the reference."""
    rng = np.random.default_rng(seed)
    n = len(reference) // 2
    out = {}
    for k, name in enumerate(("n_hits", "visible")):
        scale = Standardiser.fit(reference[:, k])
        floor, cand = [], []
        for _ in range(splits):
            perm = rng.permutation(len(reference))
            a, b = reference[perm[:n], k], reference[perm[n : 2 * n], k]
            pick = rng.choice(len(candidate), n, replace=False)
            floor.append(w1x100(a, b, scale))
            cand.append(w1x100(a, candidate[pick, k], scale))
        out[name] = float(np.mean(cand) / np.mean(floor))
    return out


def evaluate_fit(model: CaloFM, val_set: TokenDataset, fixed: dict, args) -> dict:
    result = {}
    for cls in SHORT:
        c = model.classes.index(cls)
        entry = {"held_out_nll": held_out_nll(model, val_set, c, args.seed), "fixed": {}}
        for energy, reference in fixed.get(cls, {}).items():
            sample = draw(model, c, energy, args.n_draw, args.seed + int(energy))
            entry["fixed"][f"{energy:g}"] = ratios(reference, sample, args.splits, args.seed)
        result[cls] = entry
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small-w-ta")
    parser.add_argument("--fits", type=int, default=5, help="refits with seeds 0, 1, ...")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/sim")
    parser.add_argument("--fixed-dir", type=Path, required=True)
    parser.add_argument("--fixed-energies", type=float, nargs="+", default=[10, 50, 90])
    parser.add_argument("--val-fraction", type=float, default=0.05)
    parser.add_argument("--n-draw", type=int, default=2000, help="totals drawn per energy")
    parser.add_argument("--splits", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/totals_refit.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not args.data_dir.is_dir():
        raise SystemExit(f"bench_totals: no data directory {args.data_dir}")
    model = load_model(args.model).eval()
    if model.totals is None:
        raise SystemExit(f"bench_totals: {args.model} has no shower totals")
    tok = Tokenizer(model.tokenizer)
    specs = {cls: [str(args.data_dir / f"{s}_gamma_train_*.h5")] for cls, s in SHORT.items()}
    classes = load_classes(specs, n_train=None, val_fraction=args.val_fraction, seed=args.seed)
    train_set, val_set = build_datasets(classes, tok, model.classes)
    fixed: dict[str, dict[float, np.ndarray]] = {}
    for cls, short in SHORT.items():
        for energy in args.fixed_energies:
            path = args.fixed_dir / f"{short}_gamma_{energy:g}GeV.h5"
            if path.exists():
                ds = TokenDataset([(cls, read_all(path))], tok, model.classes)
                hits, visible = dataset_totals(model, ds)
                fixed.setdefault(cls, {})[energy] = np.stack([hits, visible], 1).astype(float)

    fits = {"shipped": evaluate_fit(model, val_set, fixed, args)}
    classes_ids = [model.classes.index(c) for c in SHORT]
    for seed in range(args.fits):
        refit = copy.deepcopy(model)
        nll = fit_totals(refit, train_set, classes_ids, seed=seed)
        fits[f"seed {seed}"] = {"train_nll": nll, **evaluate_fit(refit, val_set, fixed, args)}
        print(table(fits), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp:
        payload = {"benchmark": "totals", "model": args.model, "n_draw": args.n_draw}
        tmp.write_text(json.dumps({**payload, "fits": fits, "table": table(fits)}, indent=1))
    print(table(fits))


def table(fits: dict) -> str:
    head = "fit        class          held-out NLL  " + "  ".join(
        f"{e:>5} GeV hits/vis" for e in ("10", "50", "90")
    )
    lines = [head]
    for name, fit in fits.items():
        for cls in SHORT:
            entry = fit[cls]
            cells = [
                f"{entry['fixed'][e]['n_hits']:5.1f} / {entry['fixed'][e]['visible']:5.1f}"
                if e in entry["fixed"]
                else "      -      "
                for e in ("10", "50", "90")
            ]
            lines.append(f"{name:10} {cls:14} {entry['held_out_nll']:12.4f}  " + "    ".join(cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
