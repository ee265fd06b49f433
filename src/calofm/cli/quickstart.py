"""``calofm quickstart``: the whole workflow on embedded defaults, as the documented commands.

simulate (reference and training samples with the embedded Geant4) -> train -> generate ->
evaluate (generated and an independent Geant4 sample against the reference) -> report.
Each step is the ordinary sub-command, printed before it runs, so the quickstart doubles as a
tutorial. Each step's output is recorded in ``OUT/quickstart_steps.json`` with a fingerprint of the
arguments that made it (and of the steps it reads), so a rerun with the same settings skips the
finished steps and resumes an interrupted one, while a rerun with other settings is refused (or,
with ``--overwrite``, recomputes what they change) instead of reporting stale results.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

from calofm.cli._args import incident_energy, non_negative_int, positive_float, positive_int
from calofm.errors import CalofmError

RECORD_FILE = "quickstart_steps.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="simulate, train, generate and evaluate on embedded defaults; writes a report",
        description="Run the whole calofm workflow on a fresh machine with the embedded Geant4: "
        "simulate photon showers in a tungsten calorimeter, train a model for a few minutes, "
        "generate showers with it and write a validation report comparing the generated "
        "showers and an independent Geant4 sample against a Geant4 reference. Run again with "
        "the same settings, it skips finished steps and resumes an interrupted one.",
    )
    p.add_argument("--out", default="quickstart", help="output directory (default: quickstart)")
    p.add_argument("--material", default="G4_W", help="absorber material (default G4_W)")
    p.add_argument("--particle", default="gamma", help="particle (default gamma)")
    p.add_argument("-n", type=positive_int, default=300, help="showers per sample (default 300)")
    p.add_argument(
        "--energy-range",
        type=incident_energy,
        nargs=2,
        default=(10.0, 100.0),
        metavar=("LO", "HI"),
        help="incident energy range in GeV (default 10 100)",
    )
    p.add_argument("--preset", default="tiny", help="model preset (default tiny)")
    p.add_argument(
        "--train-minutes",
        type=positive_float,
        default=3.0,
        help="training time budget in minutes (default 3)",
    )
    p.add_argument("--workers", type=positive_int, default=2, help="simulation processes")
    p.add_argument("--seed", type=non_negative_int, default=1, help="base seed (default 1)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute the steps whose outputs were made with other settings",
    )
    p.set_defaults(func=run)


@dataclass
class Step:
    """One sub-command, the output that says it finished, and the steps whose outputs it reads."""

    key: str
    title: str
    argv: list[str]
    output: Path
    started: Path  # exists once the step has begun (its partial file or directory)
    deps: tuple[str, ...] = ()


def _fingerprints(steps: list[Step], ignore: tuple[str, ...]) -> dict[str, str]:
    """Each step's arguments and its inputs' fingerprints, hashed: a change anywhere upstream
    changes every step downstream of it. Options that do not change the outputs are left out."""
    prints: dict[str, str] = {}
    for step in steps:
        argv = [a for i, a in enumerate(step.argv) if not _ignored(step.argv, i, ignore)]
        text = json.dumps([argv, [prints[d] for d in step.deps]])
        prints[step.key] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return prints


def _ignored(argv: list[str], i: int, ignore: tuple[str, ...]) -> bool:
    return argv[i] in ignore or (i > 0 and argv[i - 1] in ignore)


def _steps(args: argparse.Namespace, out: Path) -> list[Step]:
    from calofm.files import partial_path

    lo, hi = (f"{e:g}" for e in args.energy_range)
    sim = ["--material", args.material, "--particle", args.particle, "-n", str(args.n)]
    sim += ["--energy-range", lo, hi, "--workers", str(args.workers)]
    reference, training, generated = (
        out / "geant4_reference.h5",
        out / "geant4_train.h5",
        out / "calofm.h5",
    )
    model, report = out / "model", out / "report"
    return [
        Step(
            "reference",
            "simulate the Geant4 reference",
            ["simulate", *sim, "--seed", str(args.seed), "--out", str(reference)],
            reference,
            partial_path(reference),
        ),
        Step(
            "training",
            "simulate an independent Geant4 training sample",
            ["simulate", *sim, "--seed", str(args.seed + 1), "--out", str(training)],
            training,
            partial_path(training),
        ),
        Step(
            "model",
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
            model / "training.json",
            model,
            ("training",),
        ),
        Step(
            "generated",
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
            partial_path(generated),
            ("model",),
        ),
        Step(
            "report",
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
            report,
            ("reference", "training", "generated"),
        ),
    ]


def _check_settings(args: argparse.Namespace) -> None:
    """Everything a step would refuse, checked before the first step creates anything."""
    from calofm.detector import material_long
    from calofm.files import check_output_dir
    from calofm.model.config import preset
    from calofm.particles import pdg_code
    from calofm.simulation import geant4

    lo, hi = args.energy_range
    if lo >= hi:
        raise CalofmError(f"--energy-range {lo:g} {hi:g}: LO must be below HI")
    pdg_code(args.particle)
    geant4.check_material(material_long(args.material))
    preset(args.preset)
    check_output_dir(args.out)


def _read_records(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CalofmError(f"{path}: malformed JSON; remove it or add --overwrite") from None
    return records if isinstance(records, dict) else {}


def _write_records(path: Path, records: dict) -> None:
    from calofm.files import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")


def _plan(steps: list[Step], prints: dict[str, str], records: dict, overwrite: bool) -> dict:
    """For each step: 'skip' (finished with these settings), 'run' (new, or resuming its own
    interrupted run) or 'redo' (made with other settings: only with --overwrite)."""
    plan = {}
    for step in steps:
        begun = step.output.exists() or step.started.exists()
        same = records.get(step.key) == prints[step.key]
        if not begun:
            plan[step.key] = "run"
        elif same:
            plan[step.key] = "skip" if step.output.exists() else "run"
        elif overwrite:
            plan[step.key] = "redo"
        else:
            raise CalofmError(
                f"{step.started} was made by other settings than these (or by an unknown "
                "command); rerun with the settings that made it, choose another --out, or add "
                "--overwrite to recompute it"
            )
    return plan


def _run_step(step: Step, action: str) -> None:
    from calofm.cli import Terminated, main

    argv = list(step.argv)
    if action == "redo":
        argv.append("--overwrite")
    elif step.key == "model" and step.started.exists():
        argv.append("--resume")  # the same training, interrupted: continue it
    print(f"\n== {step.title}\n$ calofm {shlex.join(argv)}", flush=True)
    if action == "skip":
        print(f"   (skipped: {step.output} was made with these settings)")
        return
    code = main(argv)
    if code == 143:
        raise Terminated
    if code >= 128:
        raise KeyboardInterrupt
    if code != 0:
        raise CalofmError(f"step '{step.title}' failed (exit {code}; its message is above)")


def run(args: argparse.Namespace) -> int:
    from calofm.files import atomic_output

    _check_settings(args)
    out = Path(args.out)
    steps = _steps(args, out)
    prints = _fingerprints(steps, ignore=("--workers",))  # workers do not change the showers
    record_path = out / RECORD_FILE
    records = _read_records(record_path)
    plan = _plan(steps, prints, records, args.overwrite)
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for step in steps:
        if plan[step.key] != "skip":
            records[step.key] = prints[step.key]  # before it starts: its partial output is ours
            _write_records(record_path, records)
        _run_step(step, plan[step.key])

    report = out / "report"
    metrics = json.loads((report / "metrics.json").read_text())
    summary = {
        "report": str(report / "report.html"),
        "minutes": round((time.time() - started) / 60, 2),
        "classifier_auc": {
            name: entry.get("classifier_auc") for name, entry in metrics["candidates"].items()
        },
        "floor_classifier_auc": metrics["floor"].get("classifier_auc"),
    }
    with atomic_output(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nreport: {report / 'report.html'}\nclassifier AUC (0.5 = indistinguishable):")
    for name, auc in summary["classifier_auc"].items():
        print(f"  {name:10s} {auc:.3f}   (Geant4 floor {summary['floor_classifier_auc']:.3f})")
    return 0
