"""The quickstart's steps in order: each a sub-command (printed before it runs, so the quickstart
doubles as a tutorial) or a library call, with the output that says it finished and the steps it
reads.
"""

from __future__ import annotations

from calofm.cli._args import MAX_SEED
from calofm.cli._quickstart_plan import PARTICLE, Plan
from calofm.cli._quickstart_runner import RECORD_FILE, Step, read_records


def step_seed(seed: int, k: int) -> int:
    """The seed of a run's k-th sample: ``seed + k``, wrapped into [0, 2**32 - 1] so that every
    step accepts it whatever seed the quickstart was given."""
    return (seed + k) % (MAX_SEED + 1)


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
                    str(step_seed(plan.seed, k)),
                    "--workers",
                    str(plan.workers),
                    "--out",
                    str(path),
                ],
            )
        )
    return steps


def make_steps(plan: Plan) -> list[Step]:
    """Every step of ``plan`` in order, each after the steps it reads."""
    from calofm.cli import _quickstart_generate as qg
    from calofm.cli import _quickstart_probe as qp
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
            action=lambda: qp.save_arrays(
                probe_dir / "before.npz", qp.probe(plan.model, [], *probe_settings[1:])
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
            action=lambda: qp.compare_probes(plan, probe_settings[1:]),
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
            action=lambda: qg.generate_all(plan),
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
                    str(step_seed(plan.seed, k)),
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
                plan, read_records(plan.out / RECORD_FILE), {st.key: st.title for st in steps}
            ),
            note=f"{plan.report / 'report.html'}",
        )
    )
    return steps
