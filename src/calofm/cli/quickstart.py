"""``calofm quickstart``: the foundation-model workflow in minutes, on the shipped base model.

Simulate showers of a class the base model has never seen (Pb photons) with the embedded Geant4,
add an expert for it to the shipped base (``calofm extend``: the base weights stay frozen),
generate every class in one mixed call, evaluate each class against held-out Geant4, and write
one report: metrics next to the Geant4 floor, plots, event displays, the time per shower of
generation and of Geant4 on this machine, the stage's trainable parameters, and the base classes'
showers before and after the expert compared byte for byte.

Steps that are sub-commands are printed before they run, so the quickstart doubles as a tutorial.
Each step's output is recorded in ``OUT/quickstart_steps.json`` with a fingerprint of what made it
(its arguments and the steps it reads) and its wall time, so a rerun with the same settings skips
the finished steps and resumes an interrupted one, while a rerun with other settings is refused
(or, with ``--overwrite``, recomputes what they change) instead of reporting stale results.
"""

from __future__ import annotations

import argparse
import sys
import time

from calofm.cli._args import positive_int, random_seed
from calofm.cli._quickstart_plan import SCALES, make_plan
from calofm.cli._quickstart_runner import (
    RECORD_FILE,
    cpu_seconds,
    fingerprints,
    plan_actions,
    read_records,
    run_step,
    write_records,
)
from calofm.cli._quickstart_steps import make_steps

SUMMARY_FILE = "summary.json"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quickstart",
        help="adapt the shipped base model to Pb photons, generate, evaluate; writes a report",
        description="The foundation-model workflow on embedded defaults: simulate Pb photon "
        "showers (a class the shipped base model has never seen) with the embedded Geant4, add "
        "an expert for them to the base model and train only it, generate every class in one "
        "mixed call, evaluate each class against held-out Geant4 and write OUT/report/"
        "report.html. Run again with the same settings, it skips finished steps and resumes an "
        "interrupted one.",
    )
    p.add_argument("--out", default="quickstart", help="output directory (default: quickstart)")
    p.add_argument(
        "--scale",
        choices=list(SCALES),
        default="default",
        help="test: seconds, a smoke test; default: under 10 minutes on 2 cores; large: a real "
        "study (hours; 5000 training and 1000 test showers per class)",
    )
    p.add_argument(
        "--model",
        default="small-w-ta",
        help="the base model, a shipped name or a model directory (default: small-w-ta)",
    )
    p.add_argument(
        "--material",
        default="G4_Pb",
        help="the new material, one the base model lacks (default: G4_Pb)",
    )
    p.add_argument("--workers", type=positive_int, default=2, help="processes (default 2)")
    p.add_argument("--seed", type=random_seed, default=1, help="base seed (default 1)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute the steps whose outputs were made with other settings",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calofm.cli import _quickstart_summary as qs

    plan = make_plan(args)
    steps = make_steps(plan)
    prints = fingerprints(steps, ignore=("--workers",))  # workers do not change the showers
    record_path = plan.out / RECORD_FILE
    records = read_records(record_path)
    actions = plan_actions(steps, prints, records, args.overwrite)
    plan.out.mkdir(parents=True, exist_ok=True)
    for step in steps:
        if actions[step.key] == "skip":
            run_step(step, "skip")
            continue
        previous = records.get(step.key, {})
        resumed = actions[step.key] == "run"
        spent = [(previous.get(k) or 0.0) if resumed else 0.0 for k in ("seconds", "cpu_seconds")]
        records[step.key] = {"fingerprint": prints[step.key], "seconds": spent[0]}
        write_records(record_path, records)  # before it starts: its partial output is ours
        start, cpu = time.monotonic(), cpu_seconds()
        try:
            run_step(step, actions[step.key])
        finally:
            records[step.key]["seconds"] = round(spent[0] + time.monotonic() - start, 1)
            records[step.key]["cpu_seconds"] = round(spent[1] + cpu_seconds() - cpu, 1)
            write_records(record_path, records)

    summary = qs.write_summary(plan, records, plan.out / SUMMARY_FILE)
    qs.print_headline(summary)
    if not summary["base_classes_identical"]:
        print(
            "calofm quickstart: error: the expert changed the base classes' showers (see the "
            "report)",
            file=sys.stderr,
        )
        return 1
    return 0
