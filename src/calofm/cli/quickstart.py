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
import hashlib
import json
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from calofm.cli._args import non_negative_int, positive_int
from calofm.errors import CalofmError

RECORD_FILE = "quickstart_steps.json"
SUMMARY_FILE = "summary.json"
PARTICLE = "gamma"


@dataclass(frozen=True)
class Scale:
    """How much the quickstart simulates, trains and generates: time against statistics."""

    n_train: int  # Geant4 showers of the new class that the expert trains on
    n_test: int  # held-out Geant4 showers, and generated showers, per class
    base_tests: bool  # also held-out Geant4 showers of the base classes (else only generated)
    budget: tuple[str, ...]  # calofm extend's budget and batch flags
    n_probe: int  # showers per base class generated before and after the expert
    energy_gev: tuple[float, float]
    max_hits: int | None = None  # longest generated shower (None: the model's)
    task_rows: int = 150  # rows (all classes interleaved) per generate call, one worker's task
    slots: int = 25  # showers of a class decoded at once (refilled as showers end)


# "default" is sized for under 10 minutes on 2 idle cores from CPU times measured there: Geant4
# 0.40 s per 10-100 GeV Pb photon, generation 0.38 s per shower (small-w-ta, one thread), the
# evaluation 13 s per class; so 600 Geant4 showers (2 min on 2 workers), 2 minutes of expert
# training and 300 generated showers (1 min) take about 7 minutes, 9 minutes of CPU time.
SCALES = {
    "test": Scale(
        12, 10, False, ("--max-steps", "2", "--batch-size", "4"), 1, (10.0, 15.0), 25, 15, 5
    ),
    "default": Scale(300, 100, True, ("--time-limit", "2", "--batch-size", "8"), 4, (10.0, 100.0)),
    "large": Scale(
        5000, 1000, True, ("--time-limit", "30", "--batch-size", "16"), 16, (10.0, 100.0)
    ),
}


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
    p.add_argument("--seed", type=non_negative_int, default=1, help="base seed (default 1)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="recompute the steps whose outputs were made with other settings",
    )
    p.set_defaults(func=run)


@dataclass
class Step:
    """One step: a sub-command (``argv``) or a library call (``action``, for what no sub-command
    does), the output that says it finished, and the steps whose outputs it reads."""

    key: str
    title: str
    output: Path
    started: Path  # exists once the step has begun (its partial file or directory)
    deps: tuple[str, ...] = ()
    argv: list[str] | None = None
    action: Callable[[], None] | None = None
    settings: tuple = ()  # what decides the output besides argv (a model's weights)
    note: str = ""  # what a library step does, printed in place of a command


@dataclass(frozen=True)
class Plan:
    """The quickstart's inputs, settings and file names."""

    out: Path
    scale_name: str
    model: str
    model_sha256: str
    base_classes: list[str]
    new_class: str
    init_from: str | None
    seed: int
    workers: int

    @property
    def scale(self) -> Scale:
        return SCALES[self.scale_name]

    @property
    def classes(self) -> list[str]:
        return [*self.base_classes, self.new_class]

    def stem(self, cls: str) -> str:
        from calofm.detector import material_short
        from calofm.model.config import parse_class

        material, particle = parse_class(cls)
        return f"{material_short(material)}_{particle}"

    def geant4(self, cls: str, part: str) -> Path:
        return self.out / "geant4" / f"{self.stem(cls)}_{part}.h5"

    def generated(self, cls: str) -> Path:
        return self.out / "calofm" / f"{self.stem(cls)}.h5"

    @property
    def expert(self) -> Path:
        return self.out / "expert"

    @property
    def report(self) -> Path:
        return self.out / "report"

    def evaluation(self, cls: str) -> Path:
        return self.report / self.stem(cls)

    def display(self, cls: str) -> Path:
        return self.report / "displays" / f"{self.stem(cls)}.png"

    @property
    def tested(self) -> list[str]:
        """Classes compared with held-out Geant4, the new one first."""
        return [self.new_class, *(self.base_classes if self.scale.base_tests else [])]


def _nearest_material(base: list[str], material: str) -> str | None:
    """The base material whose radiation length is nearest the new one's (its expert is the
    closest start), or None where a radiation length is unknown (random start)."""
    from calofm.detector import RADIATION_LENGTH_MM

    if material not in RADIATION_LENGTH_MM or any(m not in RADIATION_LENGTH_MM for m in base):
        return None
    return min(base, key=lambda m: abs(RADIATION_LENGTH_MM[m] - RADIATION_LENGTH_MM[material]))


def _make_plan(args: argparse.Namespace) -> Plan:
    """Everything a step would refuse, checked before the first step creates anything."""
    from calofm.detector import material_long
    from calofm.files import check_output_dir
    from calofm.model.config import class_name, parse_class
    from calofm.pretrained import resolve_model
    from calofm.simulation import geant4

    material = material_long(args.material)
    geant4.check_material(material)
    manifest = resolve_model(args.model) / "manifest.json"
    try:
        header = json.loads(manifest.read_text())
        classes, sha256 = list(header["classes"]), str(header["weights_sha256"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CalofmError(
            f"--model {args.model}: not a model directory or shipped model (see calofm models)"
        ) from None
    new_class = class_name(material, PARTICLE)
    if new_class in classes:
        raise CalofmError(
            f"--material {material}: the base model already has {new_class}; the quickstart "
            "adds a class it has never seen"
        )
    base = [c for c in classes if parse_class(c)[1] == PARTICLE]
    if not base:
        raise CalofmError(f"--model {args.model}: has no {PARTICLE} class to extend")
    init = _nearest_material([parse_class(c)[0] for c in base], material)
    return Plan(
        out=check_output_dir(args.out),
        scale_name=args.scale,
        model=args.model,
        model_sha256=sha256,
        base_classes=base,
        new_class=new_class,
        init_from=init,
        seed=args.seed,
        workers=args.workers,
    )


def _fingerprints(steps: list[Step], ignore: tuple[str, ...]) -> dict[str, str]:
    """Each step's arguments and its inputs' fingerprints, hashed: a change anywhere upstream
    changes every step downstream of it. Options that do not change the outputs are left out."""
    prints: dict[str, str] = {}
    for step in steps:
        what = [step.key] if step.argv is None else step.argv
        what = [a for i, a in enumerate(what) if not _ignored(what, i, ignore)]
        what += map(str, step.settings)
        text = json.dumps([what, [prints[d] for d in step.deps]])
        prints[step.key] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return prints


def _ignored(argv: list[str], i: int, ignore: tuple[str, ...]) -> bool:
    return argv[i] in ignore or (i > 0 and argv[i - 1] in ignore)


def _simulate_steps(plan: Plan) -> list[Step]:
    from calofm.files import partial_path
    from calofm.model.config import parse_class

    lo, hi = (f"{e:g}" for e in plan.scale.energy_gev)
    samples = [(plan.new_class, "train", plan.scale.n_train)]
    samples += [(cls, "test", plan.scale.n_test) for cls in plan.tested]
    steps = []
    for k, (cls, part, n) in enumerate(samples):
        material, particle = parse_class(cls)
        path = plan.geant4(cls, part)
        what = "training" if part == "train" else "held-out test"
        steps.append(
            Step(
                f"geant4_{plan.stem(cls)}_{part}",
                f"simulate the Geant4 {what} sample of {cls}",
                path,
                partial_path(path),
                argv=[
                    "simulate",
                    "--material",
                    material,
                    "--particle",
                    particle,
                    "-n",
                    str(n),
                    "--energy-range",
                    lo,
                    hi,
                    "--seed",
                    str(plan.seed + k),
                    "--workers",
                    str(plan.workers),
                    "--out",
                    str(path),
                ],
            )
        )
    return steps


def _steps(plan: Plan) -> list[Step]:
    from calofm.cli import _quickstart_generate as qg
    from calofm.cli import _quickstart_report as qr
    from calofm.model.config import parse_class

    s = plan.scale
    probe_settings = (plan.model, plan.base_classes, s.n_probe, s.energy_gev, plan.seed, s.max_hits)
    weights = (plan.model_sha256,)  # a shipped model replaced under its name is another model
    probe_dir = plan.out / "probe"
    train_key = f"geant4_{plan.stem(plan.new_class)}_train"
    steps = _simulate_steps(plan)
    steps.append(
        Step(
            "probe_before",
            "generate the base classes with the base model alone (to compare after the expert)",
            probe_dir / "before.npz",
            probe_dir / "before.npz",
            action=lambda: qg.save_arrays(
                probe_dir / "before.npz", qg.probe(plan.model, [], *probe_settings[1:])
            ),
            settings=probe_settings + weights,
            note=f"generate({', '.join(plan.base_classes)} x {s.n_probe}, seed {plan.seed})",
        )
    )
    material = parse_class(plan.new_class)[0]
    extend = ["extend", "--model", plan.model, "--material", material, "--particle", PARTICLE]
    if plan.init_from is not None:
        extend += ["--init-from", plan.init_from]
    extend += ["--data", str(plan.geant4(plan.new_class, "train")), *s.budget]
    extend += ["--seed", str(plan.seed), "--out", str(plan.expert)]
    steps.append(
        Step(
            "expert",
            f"add an expert for {plan.new_class} to the base model and train only it",
            plan.expert / "adapter.json",
            plan.expert,
            (train_key,),
            argv=extend,
            settings=weights,
        )
    )
    steps.append(
        Step(
            "probe_after",
            "the same generation with the expert added: the base classes' showers, byte for byte",
            probe_dir / "comparison.json",
            probe_dir / "after.npz",
            ("probe_before", "expert"),
            action=lambda: qr.compare_probes(plan, probe_settings[1:]),
            settings=probe_settings + weights,
            note="generate(the same rows, seed and energies, with the expert attached)",
        )
    )
    steps.append(
        Step(
            "generate",
            "generate every class together (rows interleaved, each routed to its expert)",
            plan.out / "calofm" / "generation.json",
            plan.out / "calofm" / "batches",
            ("expert",),
            action=lambda: qr.generate_all(plan),
            settings=(plan.model, plan.classes, s.n_test, s.energy_gev, plan.seed, s.max_hits)
            + (s.task_rows, s.slots, *weights),
            note=f"generate({', '.join(plan.classes)} x {s.n_test} each, interleaved; "
            f"{plan.workers} processes)",
        )
    )
    for k, cls in enumerate(plan.tested):
        key = f"geant4_{plan.stem(cls)}_test"
        steps.append(
            Step(
                f"evaluate_{plan.stem(cls)}",
                f"evaluate {cls} against held-out Geant4",
                plan.evaluation(cls) / "report.html",
                plan.evaluation(cls),
                (key, "generate"),
                argv=[
                    "evaluate",
                    str(plan.geant4(cls, "test")),
                    str(plan.generated(cls)),
                    "--names",
                    "calofm",
                    "--describe",
                    f"reference=Geant4, held-out (not seen in training) {cls} showers",
                    "--describe",
                    f"calofm={plan.model} + {plan.new_class} expert, generated together with "
                    f"{', '.join(plan.classes)}",
                    "--seed",
                    str(plan.seed + k),
                    "--out",
                    str(plan.evaluation(cls)),
                ],
            )
        )
    # Event displays: a Geant4 and a generated shower of about the same incident energy side by
    # side (the generated one alone where no Geant4 sample was simulated).
    middle = f"{sum(s.energy_gev) / 2:g}"
    for cls in plan.classes:
        tested = cls in plan.tested
        first = plan.geant4(cls, "test") if tested else plan.generated(cls)
        argv = ["show", str(first), "--energy", middle]
        argv += ["--compare", str(plan.generated(cls))] if tested else []
        deps = ("generate", f"geant4_{plan.stem(cls)}_test") if tested else ("generate",)
        steps.append(
            Step(
                f"display_{plan.stem(cls)}",
                f"event display of {cls}",
                plan.display(cls),
                plan.display(cls),
                deps,
                argv=[*argv, "--out", str(plan.display(cls))],
            )
        )
    steps.append(
        Step(
            "report",
            "write the report",
            plan.report / "report.html",
            plan.report / "report.html",
            tuple(st.key for st in steps),
            action=lambda: qr.write_report(
                plan, _read_records(plan.out / RECORD_FILE), {st.key: st.title for st in steps}
            ),
            note=f"{plan.report / 'report.html'}",
        )
    )
    return steps


def _read_records(path: Path) -> dict[str, dict]:
    """Each step's fingerprint and wall time so far."""
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CalofmError(f"{path}: malformed JSON; remove it or add --overwrite") from None
    if not isinstance(records, dict):
        return {}
    return {
        k: v if isinstance(v, dict) else {"fingerprint": v, "seconds": None}
        for k, v in records.items()
    }


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
        same = records.get(step.key, {}).get("fingerprint") == prints[step.key]
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
    from calofm.files import remove_outputs

    if step.argv is None:
        print(f"\n== {step.title}\n# calofm (python): {step.note}", flush=True)
    else:
        argv = list(step.argv)
        if action == "redo":
            argv.append("--overwrite")
        elif step.key == "expert" and step.started.exists():
            argv.append("--resume")  # the same training, interrupted: continue it
        print(f"\n== {step.title}\n$ calofm {shlex.join(argv)}", flush=True)
    if action == "skip":
        print(f"   (skipped: {step.output} was made with these settings)")
        return
    if step.argv is None:
        if action == "redo":
            remove_outputs(step.started.parent, {step.started.name, step.output.name})
        assert step.action is not None
        step.action()
        return
    code = main(argv)
    if code == 143:
        raise Terminated
    if code >= 128:
        raise KeyboardInterrupt
    if code != 0:
        raise CalofmError(f"step '{step.title}' failed (exit {code}; its message is above)")


def _cpu_seconds() -> float:
    """CPU time of this process and its finished child processes (Geant4 and generation
    workers): with the wall time, what a step would take on an idle machine."""
    import resource

    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run(args: argparse.Namespace) -> int:
    from calofm.cli import _quickstart_report as qr

    plan = _make_plan(args)
    steps = _steps(plan)
    prints = _fingerprints(steps, ignore=("--workers",))  # workers do not change the showers
    record_path = plan.out / RECORD_FILE
    records = _read_records(record_path)
    actions = _plan(steps, prints, records, args.overwrite)
    plan.out.mkdir(parents=True, exist_ok=True)
    for step in steps:
        if actions[step.key] == "skip":
            _run_step(step, "skip")
            continue
        previous = records.get(step.key, {})
        resumed = actions[step.key] == "run"
        spent = [(previous.get(k) or 0.0) if resumed else 0.0 for k in ("seconds", "cpu_seconds")]
        records[step.key] = {"fingerprint": prints[step.key], "seconds": spent[0]}
        _write_records(record_path, records)  # before it starts: its partial output is ours
        start, cpu = time.monotonic(), _cpu_seconds()
        try:
            _run_step(step, actions[step.key])
        finally:
            records[step.key]["seconds"] = round(spent[0] + time.monotonic() - start, 1)
            records[step.key]["cpu_seconds"] = round(spent[1] + _cpu_seconds() - cpu, 1)
            _write_records(record_path, records)

    summary = qr.write_summary(plan, records, plan.out / SUMMARY_FILE)
    qr.print_headline(summary)
    if not summary["base_classes_identical"]:
        print(
            "calofm quickstart: error: the expert changed the base classes' showers (see the "
            "report)",
            file=sys.stderr,
        )
        return 1
    return 0
