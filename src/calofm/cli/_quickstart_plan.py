"""What one quickstart run is: its scale (time against statistics), the base model, the new class
and where every file goes; everything a step would refuse is checked before the first step runs.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from calofm.errors import CalofmError

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
    # Slots of each class in the one batch that decodes all classes (refilled as showers end).
    # Measured on a task of the default scale (50 showers per class), one class per batch then:
    # 25 slots 0.43 s per shower, 50 slots 0.55 s; all classes in one batch, 25 each: 0.35 s.
    slots: int = 25


# "default" is sized for under 10 minutes on 2 idle cores from CPU times measured there: Geant4
# 0.42 s per 10-100 GeV Pb photon, generation 0.35 s per shower (small-w-ta, one thread), the
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


def make_plan(args: argparse.Namespace) -> Plan:
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
