"""``calofm simulate``: Geant4 showers into a resumable showerdata file."""

from __future__ import annotations

import argparse
from pathlib import Path

from calofm.cli._args import (
    add_energy_options,
    energy_bounds,
    non_negative_int,
    positive_int,
    random_seed,
    shower_count,
)
from calofm.detector import DetectorConfig, material_long
from calofm.errors import CalofmError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="simulate showers with the embedded Geant4",
        description=(
            "Simulate electromagnetic showers with Geant4 (G4EmStandardPhysics_option1, 0.7 mm"
            " cut, analytic stand-in bremsstrahlung and photoelectric tables) in the sampling"
            " calorimeter of a detector config. An interrupted run resumes when the same command"
            " is run again."
        ),
    )
    p.add_argument(
        "--material",
        help="absorber, a Geant4 NIST name such as G4_W (or W); default: the detector config's",
    )
    p.add_argument("--particle", default="gamma", help="Geant4 particle name (default: gamma)")
    p.add_argument("-n", type=shower_count, required=True, help="number of showers")
    add_energy_options(p)
    p.add_argument("--seed", type=random_seed, default=0, help="run seed (default: 0)")
    p.add_argument(
        "--offset",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="start N showers into the run of --seed (a multiple of --chunk-size): job J of an "
        "array of jobs of -n showers each passes --offset J*n, and calofm merge joins their "
        "files into the file of one run (default: 0)",
    )
    p.add_argument("--workers", type=positive_int, default=1, help="Geant4 processes (default: 1)")
    p.add_argument(
        "--chunk-size", type=positive_int, default=50, help="showers per chunk (default: 50)"
    )
    p.add_argument(
        "--detector", type=Path, help="detector config JSON (default: the standard 30-layer ECAL)"
    )
    p.add_argument("--out", type=Path, required=True, help="output showerdata file (.h5)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output (and discard a partial one of other arguments)",
    )
    p.set_defaults(func=run)


def _detector(args: argparse.Namespace) -> DetectorConfig:
    detector = DetectorConfig()
    if args.detector is not None:
        try:
            detector = DetectorConfig.from_json(args.detector.read_text())
        except OSError as exc:
            raise CalofmError(f"{args.detector}: cannot read ({exc.strerror})") from None
        except UnicodeDecodeError:
            raise CalofmError(f"{args.detector}: not a detector config (not text)") from None
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise CalofmError(f"{args.detector}: not a detector config ({exc})") from None
    return detector.with_material(material_long(args.material)) if args.material else detector


def run(args: argparse.Namespace) -> int:
    from calofm.files import check_output_file
    from calofm.simulation.runner import SimulationRequest, simulate_to_file

    check_output_file(args.out, args.overwrite)
    request = SimulationRequest(
        detector=_detector(args),
        particle=args.particle,
        n=args.n,
        energy_gev=energy_bounds(args),
        seed=args.seed,
        chunk_size=args.chunk_size,
        offset=args.offset,
    )
    path = simulate_to_file(request, args.out, workers=args.workers, overwrite=args.overwrite)
    print(f"wrote {request.n} showers to {path}")
    return 0
