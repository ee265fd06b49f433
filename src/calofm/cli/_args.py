"""Argument types shared by several sub-commands, so each is parsed and checked in one place."""

from __future__ import annotations

import argparse

from calofm.errors import CalofmError

MAX_INCIDENT_GEV = 10_000.0


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def incident_energy(text: str) -> float:
    """An incident energy in GeV inside (0, 10 TeV]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an energy in GeV, got {text!r}") from None
    if not 0 < value <= MAX_INCIDENT_GEV:
        raise argparse.ArgumentTypeError(f"energy {text} GeV is outside (0, {MAX_INCIDENT_GEV:g}]")
    return value


def add_energy_options(parser: argparse.ArgumentParser) -> None:
    """--energy E or --energy-range LO HI (GeV), one of them required."""
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument(
        "--energy", type=incident_energy, metavar="GEV", help="fixed incident energy"
    )
    group.add_argument(
        "--energy-range",
        type=incident_energy,
        nargs=2,
        metavar=("LO", "HI"),
        help="incident energy uniform in [LO, HI] GeV",
    )


def energy_bounds(args: argparse.Namespace) -> tuple[float, float]:
    """(lo, hi) from --energy/--energy-range; lo == hi for a fixed energy."""
    if args.energy is not None:
        return args.energy, args.energy
    lo, hi = args.energy_range
    if lo > hi:
        raise CalofmError(f"--energy-range {lo:g} {hi:g}: LO must not exceed HI")
    return lo, hi


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value}")
    return value


def add_budget_options(parser: argparse.ArgumentParser) -> None:
    """--epochs, --max-steps, --time-limit: training stops at the first one reached."""
    budget = parser.add_argument_group("budget (training stops at the first one reached)")
    budget.add_argument("--epochs", type=positive_int)
    budget.add_argument("--max-steps", type=positive_int)
    budget.add_argument("--time-limit", type=positive_float, metavar="MINUTES")
