"""``calofm quickstart``: the whole workflow on embedded defaults, as the documented commands.

simulate (reference and training samples with the embedded Geant4) -> train -> generate ->
evaluate (generated and an independent Geant4 sample against the reference) -> report.
Each step is the ordinary sub-command, printed before it runs, so the quickstart doubles as a
tutorial; a step whose output already exists is skipped, so an interrupted quickstart resumes.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

from calofm.cli._args import positive_int
from calofm.errors import CalofmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="simulate, train, generate and evaluate on embedded defaults; writes a report",
        description="Run the whole calofm workflow on a fresh machine with the embedded Geant4: "
        "simulate photon showers in a tungsten calorimeter, train a model for a few minutes, "
        "generate showers with it and write a validation report comparing the generated "
        "showers and an independent Geant4 sample against a Geant4 reference.",
    )
    p.add_argument("--out", default="quickstart", help="output directory (default: quickstart)")
    p.add_argument("--material", default="G4_W", help="absorber material (default G4_W)")
    p.add_argument("--particle", default="gamma", help="particle (default gamma)")
    p.add_argument("-n", type=positive_int, default=300, help="showers per sample (default 300)")
    p.add_argument(
        "--energy-range",
        type=float,
        nargs=2,
        default=(10.0, 100.0),
        metavar=("LO", "HI"),
        help="incident energy range in GeV (default 10 100)",
    )
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument(
        "--train-minutes",
        type=float,
        default=3.0,
        help="training time budget in minutes (default 3)",
    )
    p.add_argument("--workers", type=positive_int, default=2, help="simulation processes")
    p.add_argument("--seed", type=int, default=1, help="base seed (default 1)")
    p.set_defaults(func=run)


def _step(title: str, argv: list[str], output: Path) -> None:
    from calofm.cli import main

    print(f"\n== {title}\n$ calofm {shlex.join(argv)}", flush=True)
    if output.exists():
        print(f"   (skipped: {output} exists)")
        return
    code = main(argv)
    if code != 0:
        raise CalofmError(f"step '{title}' failed (exit {code})")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = (f"{e:g}" for e in args.energy_range)
    sim = ["--material", args.material, "--particle", args.particle, "-n", str(args.n)]
    sim += ["--energy-range", lo, hi, "--workers", str(args.workers)]
    reference, training, generated = (
        out / "geant4_reference.h5",
        out / "geant4_train.h5",
        out / "calofm.h5",
    )
    model = out / "model"
    started = time.time()

    _step(
        "simulate the Geant4 reference",
        ["simulate", *sim, "--seed", str(args.seed), "--out", str(reference)],
        reference,
    )
    _step(
        "simulate an independent Geant4 training sample",
        ["simulate", *sim, "--seed", str(args.seed + 1), "--out", str(training)],
        training,
    )
    _step(
        "train a model",
        [
            "train",
            "--data",
            f"{args.material}:{args.particle}={training}",
            "--preset",
            args.preset,
            "--time-limit",
            f"{args.train_minutes:g}",
            "--incident-range",
            lo,
            hi,
            "--seed",
            str(args.seed),
            "--out",
            str(model),
        ],
        model / "manifest.json",
    )
    _step(
        "generate showers",
        [
            "generate",
            "--model",
            str(model),
            "--material",
            args.material,
            "--particle",
            args.particle,
            "-n",
            str(args.n),
            "--energy-range",
            lo,
            hi,
            "--seed",
            str(args.seed),
            "--out",
            str(generated),
        ],
        generated,
    )
    report = out / "report"
    _step(
        "evaluate against the Geant4 reference",
        [
            "evaluate",
            str(reference),
            str(training),
            str(generated),
            "--names",
            "Geant4",
            "calofm",
            "--out",
            str(report),
        ],
        report / "report.html",
    )
    metrics = json.loads((report / "metrics.json").read_text())
    summary = {
        "report": str(report / "report.html"),
        "minutes": round((time.time() - started) / 60, 2),
        "classifier_auc": {
            name: entry.get("classifier_auc") for name, entry in metrics["candidates"].items()
        },
        "floor_classifier_auc": metrics["floor"].get("classifier_auc"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nreport: {report / 'report.html'}\nclassifier AUC (0.5 = indistinguishable):")
    for name, auc in summary["classifier_auc"].items():
        print(f"  {name:10s} {auc:.3f}   (Geant4 floor {summary['floor_classifier_auc']:.3f})")
    return 0
