"""Fidelity at a fixed training budget: how close to Geant4 each model design gets on 2 CPU cores.

For every arm (a set of ``ModelConfig`` options on the ``small`` sizes): train on W and Ta photons of
one generator (``../shared/data/sim``, 5000 + 5000 showers, 5% held out) for the same wall-clock
budget, generate as many showers per class as asked at the incident energies of the test files'
first showers, evaluate against the whole test file (``calofm evaluate``: W1x100 per observable
with the Geant4 floor at equal sample sizes, classifier AUC), and optionally at fixed incident
energies against ``calofm simulate`` samples (``--fixed-dir``, files ``W_gamma_50GeV.h5`` ...).
Prints a table and writes JSON (one object per arm, rewritten after each arm; an arm already in the
output file is skipped, so an interrupted run resumes):

    python benchmarks/bench_fidelity.py --arms today all --minutes 10 --threads 1 \\
        --n-generate 300 --out benchmarks/results/fidelity_ablation.json --work runs/fidelity

Arms: ``today`` (the design before these options), one per option alone (``+head``, ``+cond``,
``+state``, ``+unique``, ``+falling``), each other option on top of the factorised head
(``+head+cond`` ...), ``all`` (the five options above together) and ``small`` (the small
preset's choice: all but falling energies, with one stop decision). Runs of different arms on one machine compare
only at equal thread counts and equal load: run them one after the other, or two at a time with
one thread each.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from calofm.data.formats import read_all, write_showers
from calofm.evaluation.report import evaluate
from calofm.files import atomic_output
from calofm.generation.engine import generate
from calofm.model import CaloFM, ModelConfig, load_model, preset
from calofm.model.config import DESIGN
from calofm.tokens import Tokenizer
from calofm.training.config import TrainConfig, preset_defaults
from calofm.training.data import build_datasets, fit_tokenizer, load_classes
from calofm.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {
    "+head": {"voxel_head": "factorised"},
    "+cond": {"condition_every_position": True},
    "+state": {"shower_state": True},
    "+unique": {"exclude_used_voxels": True},
    "+falling": {"falling_energy": True},
}
# The paper's design: every option the small preset sets, at its default.
TODAY = {name: getattr(ModelConfig(), name) for name in [*DESIGN, "relative_energy"]}
# The previous shipped base's design, which the arms below change one lever at a time.
OCCUPANCY = {
    **DESIGN,
    "ring_occupancy": False,
    "centre_occupancy": False,
    "own_occupancy": False,
    "full_rings": False,
}
# The base shipped before full-ring flags, which the last arms change one lever at a time.
OWN = {**DESIGN, "relative_energy": True, "full_rings": False}
# Each option alone on the paper's design, each on top of the factorised head (which alone makes
# a CPU budget buy ~10x more steps, so the others are measured where they can act), and all.
ARMS = {
    "today": {},
    **OPTIONS,
    **{f"+head{k}": {**OPTIONS["+head"], **v} for k, v in OPTIONS.items() if k != "+head"},
    "all": {k: v for o in OPTIONS.values() for k, v in o.items()},
    "small": {**DESIGN, "relative_energy": True},  # the small preset (and the shipped base)
    # the base before occupancy: totals, the factorised head without occupancy
    "small+totals": {**OCCUPANCY, "voxel_occupancy": False},
    # the factorised head's sub-heads see the shower's hits per layer, row and column
    "small+occupancy": OCCUPANCY,
    # layer, then (x, y) among the layer's cells: used cells leave their layer's distribution
    "small+layered": {**OCCUPANCY, "voxel_head": "layered", "voxel_occupancy": False},
    # the occupancy-aware layer head also sees how full each layer's inner rings are
    "small+rings": {**OCCUPANCY, "ring_occupancy": True},
    # ... and the x head which central columns of each row are taken
    "small+rings+centre": {**OCCUPANCY, "ring_occupancy": True, "centre_occupancy": True},
    # energy bins counted from the drawn visible energy
    "small+relative": {**OCCUPANCY, "relative_energy": True},
    "small+rings+centre+relative": {**OWN, "own_occupancy": False},
    # ... and each layer's and row's own occupancy as a gated term of its logit (the base shipped
    # before full-ring flags)
    "small+own": OWN,
    # ... and the layer head sees each layer's energy so far over the last hit's
    "small+own+layer-energy": {**OWN, "layer_energy": True},
    # ... or the layer head sees, per layer, whether each inner ring is full (the small preset)
    "small+own+full-rings": {**OWN, "full_rings": True},
    # the small preset, and every position sees which way the shower so far leans
    "small+transverse": {**DESIGN, "relative_energy": True, "transverse_state": True},
    # the small preset, and the x and y heads tilt each position's next hit towards that lean
    "small+pull": {**DESIGN, "relative_energy": True, "centre_pull": True},
    # ... its tilt growing up to one cell from the axis, not two
    "small+pull-reach1": {
        **DESIGN,
        "relative_energy": True,
        "centre_pull": True,
        "centre_pull_reach": 1.0,
    },
    # the layered head, and every position sees the mean energy per hit still to come
    "small+layered+perhit": {
        **OCCUPANCY,
        "voxel_head": "layered",
        "voxel_occupancy": False,
        "energy_left_per_hit": True,
    },
}
# Arms that change the training, not the model: their TrainConfig settings.
TRAINING = {"small+self-drawn": {"self_drawn_energy": 0.25}}
# the small preset, trained feeding a quarter of the hits' energies from its own draws
ARMS["small+self-drawn"] = ARMS["small"]
CLASSES = {"G4_W:gamma": "W", "G4_Ta:gamma": "Ta"}
HEADLINE = ("energy_sum", "response", "n_hits", "cog_z", "cog_x", "energy_per_layer")


def arm_config(name: str, preset_name: str) -> dict:
    return {**dataclasses.asdict(preset(preset_name)), **TODAY, **ARMS[name]}


def summarise(metrics: dict) -> dict:
    """Per observable: W1x100, the floor's and their ratio; the AUCs; the worst ratio."""
    cand = metrics["candidates"]["calofm"]
    floor = metrics["floor"]
    out: dict = {"n_compared": metrics["n_compared"], "observables": {}}
    for name, values in cand["observables"].items():
        w, f = values["w1x100"], floor["observables"][name]["w1x100"]
        ratio = w / f if w is not None and f else None
        out["observables"][name] = {"w1x100": w, "floor": f, "ratio": ratio}
    ratios = {k: v["ratio"] for k, v in out["observables"].items() if v["ratio"] is not None}
    worst = max(ratios, key=ratios.get)
    out.update(
        classifier_auc=cand["classifier_auc"],
        classifier_auc_floor=floor["classifier_auc"],
        worst_observable=worst,
        worst_ratio=ratios[worst],
    )
    return out


def generate_and_evaluate(
    model: CaloFM, name: str, reference: Path, incident: np.ndarray, work: Path, seed: int, tag: str
) -> tuple[dict, dict]:
    showers, stats = generate(model, name, incident, seed=seed, batch_size=100)
    path = write_showers(showers[name], work / f"gen_{tag}.h5")
    metrics = evaluate(reference, {"calofm": path}, work / f"eval_{tag}", progress=False)
    return summarise(metrics), {
        k: stats[k] for k in ("duplicate_rate", "n_truncated", "showers_per_s", "n_hits")
    }


def run_arm(name: str, args: argparse.Namespace, classes: list, train_set, val_set, tok) -> dict:
    work = args.work / name.replace("+", "plus_")
    config = arm_config(name, args.preset)
    defaults = preset_defaults(args.preset)
    torch.manual_seed(args.seed)
    model = CaloFM(ModelConfig(**config), tok, classes[0].selection.train.detector, list(CLASSES))
    train_config = TrainConfig(
        time_limit_min=args.minutes,
        max_steps=args.max_steps,
        batch_size=defaults.batch_size,
        lr=defaults.lr,
        warmup_steps=defaults.warmup_steps,
        seed=args.seed,
        checkpoint_minutes=1e6,
        **TRAINING.get(name, {}),
    )
    t0 = time.time()
    summary_file = work / "model" / "training.json"
    if summary_file.exists():  # trained by an earlier run: evaluate again only
        done = json.loads(summary_file.read_text())
        steps, best_val, train_s = done["step"], done["best_val_loss"], done["elapsed_s"]
    else:
        result = train(
            model,
            train_set,
            val_set,
            train_config,
            None,
            work / "model",
            device="cpu",
            resume=(work / "model" / "checkpoints").exists(),
            progress=not args.quiet,
        )
        steps, best_val, train_s = result.steps, result.best_val_loss, time.time() - t0
    log = [
        json.loads(line) for line in (work / "model" / "train_log.jsonl").read_text().splitlines()
    ]
    rates = [r["tokens_per_s"] for r in log if r["kind"] == "train"]
    model = load_model(work / "model").eval()
    entry: dict = {
        "arm": name,
        "model_config": config,
        "training": TRAINING.get(name, {}),
        "parameters": model.n_parameters(),
        "minutes": args.minutes,
        "max_steps": args.max_steps,
        "threads": torch.get_num_threads(),
        "steps": steps,
        "epochs": steps / max(1, len(train_set) // defaults.batch_size),
        "best_val_loss": best_val,
        "train_tokens_per_s": float(np.median(rates)) if rates else None,
        "train_wall_s": train_s,
        "classes": {},
    }
    for cls, short in CLASSES.items():
        test = args.data_dir / f"{short}_gamma_test.h5"
        incident = read_all(test, limit=args.n_generate).incident
        t1 = time.time()
        summary, stats = generate_and_evaluate(
            model, cls, test, incident, work, args.seed, f"{short}_test"
        )
        per_class = {"test": {**summary, **stats, "seconds": time.time() - t1}, "fixed": {}}
        for energy in args.fixed_energies:
            ref = args.fixed_dir / f"{short}_gamma_{energy:g}GeV.h5" if args.fixed_dir else None
            if ref is None or not ref.exists():
                continue
            n = min(args.n_generate, len(read_all(ref).incident))
            summary, stats = generate_and_evaluate(
                model,
                cls,
                ref,
                np.full(n, energy, np.float32),
                work,
                args.seed + 1,
                f"{short}_{energy:g}GeV",
            )
            per_class["fixed"][f"{energy:g}"] = {**summary, **stats}
        entry["classes"][cls] = per_class
    return entry


def table(results: dict) -> str:
    cols = ["arm", "steps", "tok/s", "val loss"]
    for short in CLASSES.values():
        cols += [f"{short} {o}" for o in ("sum", "resp", "hits", "cogz", "cogx")] + [f"{short} AUC"]
    lines = [" | ".join(cols)]
    for name, e in results.items():
        row = [
            name,
            str(e["steps"]),
            f"{e['train_tokens_per_s'] or 0:.0f}",
            f"{e['best_val_loss']:.3f}",
        ]
        for cls in CLASSES:
            obs = e["classes"][cls]["test"]["observables"]
            for o in ("energy_sum", "response", "n_hits", "cog_z", "cog_x"):
                row.append(f"{obs[o]['ratio']:.1f}x" if o in obs else "-")
            row.append(f"{e['classes'][cls]['test']['classifier_auc']:.3f}")
        lines.append(" | ".join(row))
    return "\n".join(lines)


MARKDOWN_OBSERVABLES = (
    "energy_sum",
    "response",
    "n_hits",
    "cell_energy",
    "cog_z",
    "cog_x",
    "cog_y",
    "energy_per_layer",
    "radial_profile",
)


def markdown(results: dict) -> str:
    """Tables for docs/results.md: W1x100 over the floor per observable, AUC, per arm and class."""
    lines = []
    for cls in CLASSES:
        head = ["arm", "steps", "tok/s", *MARKDOWN_OBSERVABLES, "AUC (floor)", "dup."]
        lines += [f"**{cls}** (W1x100 / Geant4 floor)", "", "| " + " | ".join(head) + " |"]
        lines.append("|" + "---|" * len(head))
        for name, e in results.items():
            t = e["classes"][cls]["test"]
            cells = [
                f"{t['observables'][o]['ratio']:.1f}"
                if t["observables"].get(o, {}).get("ratio")
                else "-"
                for o in MARKDOWN_OBSERVABLES
            ]
            auc = f"{t['classifier_auc']:.3f} ({t['classifier_auc_floor']:.3f})"
            lines.append(
                f"| {name} | {e['steps']} | {e['train_tokens_per_s'] or 0:.0f} | "
                + " | ".join(cells)
                + f" | {auc} | {100 * t['duplicate_rate']:.1f}% |"
            )
        lines.append("")
    fixed = [
        (n, c, e)
        for n, r in results.items()
        for c in CLASSES
        for e in [r["classes"][c]["fixed"]]
        if e
    ]
    if fixed:
        lines += ["**Fixed incident energies** (W1x100 / floor: energy sum, hits, cog z; AUC)", ""]
        lines += [
            "| arm | class | GeV | energy sum | n hits | cog z | AUC (floor) |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, cls, per_energy in fixed:
            for energy, t in per_energy.items():
                o = t["observables"]
                lines.append(
                    f"| {name} | {cls} | {energy} | {o['energy_sum']['ratio']:.1f} | "
                    f"{o['n_hits']['ratio']:.1f} | {o['cog_z']['ratio']:.1f} | "
                    f"{t['classifier_auc']:.3f} ({t['classifier_auc_floor']:.3f}) |"
                )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--minutes", type=float, default=20.0, help="training budget per arm")
    parser.add_argument(
        "--max-steps",
        type=int,
        help="also stop at this many steps: arms of equal cost per step compared at equal steps "
        "stay comparable on a machine whose load changes",
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--n-generate", type=int, default=1000, help="showers per class")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared/data/sim")
    parser.add_argument("--fixed-dir", type=Path, help="calofm simulate files at fixed energies")
    parser.add_argument("--fixed-energies", type=float, nargs="+", default=[10, 50, 90])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.05, help="held out per class")
    parser.add_argument("--work", type=Path, default=ROOT / "runs/fidelity")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/fidelity.json")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--markdown", action="store_true", help="print --out's tables and stop")
    args = parser.parse_args()
    if args.markdown:
        print(markdown(json.loads(args.out.read_text())["arms"]))
        return
    torch.set_num_threads(args.threads)
    if not args.data_dir.is_dir():
        raise SystemExit(f"bench_fidelity: no data directory {args.data_dir}")

    results = json.loads(args.out.read_text())["arms"] if args.out.exists() else {}
    specs = {cls: [str(args.data_dir / f"{m}_gamma_train_*.h5")] for cls, m in CLASSES.items()}
    classes = load_classes(specs, n_train=None, val_fraction=args.val_fraction, seed=args.seed)
    detector = classes[0].selection.train.detector
    tok = fit_tokenizer(
        [c.selection.train for c in classes], detector, preset_defaults(args.preset)
    )
    train_set, val_set = build_datasets(classes, Tokenizer(tok), list(CLASSES))
    for name in args.arms:
        if name in results:
            continue
        results[name] = run_arm(name, args, classes, train_set, val_set, tok)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_output(args.out) as tmp:
            tmp.write_text(
                json.dumps(
                    {
                        "benchmark": "fidelity",
                        "data": str(args.data_dir),
                        "n_train_showers": len(train_set),
                        "n_val_showers": len(val_set),
                        "n_generate_per_class": args.n_generate,
                        "torch": torch.__version__,
                        "arms": results,
                        "table": table(results),
                    },
                    indent=1,
                )
            )
        print(table(results), flush=True)


if __name__ == "__main__":
    main()
