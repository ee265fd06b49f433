"""Argument types shared by several sub-commands, so each is parsed and checked in one place."""

from __future__ import annotations

import argparse
import math
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


# showerdata files number showers and count their points with 32-bit integers.
MAX_SHOWERS = 2**31 - 1
# The largest seed every consumer takes (numpy's legacy and scikit-learn's RandomState: 32 bits).
MAX_SEED = 2**32 - 1


def shower_count(text: str) -> int:
    """A number of showers to write: at least 1, at most what a showerdata file can hold."""
    value = positive_int(text)
    if value > MAX_SHOWERS:
        raise argparse.ArgumentTypeError(
            f"at most {MAX_SHOWERS:,} showers fit one showerdata file, got {value:,}"
        )
    return value


def random_seed(text: str) -> int:
    """A random seed in [0, 2**32 - 1]."""
    value = non_negative_int(text)
    if value > MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_SEED} (2**32 - 1), got {value}")
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
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be positive and finite, got {value}")
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


DEVICE_HELP = "cpu, cuda, cuda:N or auto (default: cuda when available)"
# --precision's choices: the keys of calofm.generation.decoder.PRECISIONS, named here so that the
# command line offers them without importing torch (a test checks the two agree)
PRECISION_CHOICES = ("fp32", "bf16", "fp16")


def add_selection_options(
    parser: argparse.ArgumentParser, *, per_class: bool, val_fraction: float | None
) -> None:
    """--n-events, --repeat, --val-fraction and --seed: which showers train and validate."""
    data = parser.add_argument_group("data selection")
    data.add_argument(
        "--n-events",
        type=positive_int,
        metavar="N",
        help="training showers per class (default all)" if per_class else "training showers (all)",
    )
    data.add_argument(
        "--repeat",
        type=non_negative_int,
        default=0,
        help="which subset of N for this seed: disjoint while the data allows, else bootstrapped",
    )
    data.add_argument(
        "--val-fraction",
        type=fraction,
        default=val_fraction,
        help="showers held out for validation"
        + (" per class" if per_class else "")
        + f" (default {0.05 if val_fraction is None else val_fraction})",
    )
    data.add_argument(
        "--seed", type=random_seed, default=0, help="data split, subsets, batches, init"
    )


def add_optimisation_options(
    parser: argparse.ArgumentParser, *, title: str, out: str, what: str, defaults: dict[str, str]
) -> argparse._ArgumentGroup:
    """--lr, --warmup, --amp, --device, --resume and --overwrite, in a group the caller may add
    its batch-size options to. ``defaults`` gives the help's default of lr and warmup, if any."""
    opt = parser.add_argument_group(title)
    opt.add_argument(
        "--lr", type=positive_float, help="peak learning rate (AdamW)" + defaults.get("lr", "")
    )
    opt.add_argument(
        "--warmup", type=non_negative_int, metavar="STEPS", help=defaults.get("warmup")
    )
    opt.add_argument("--amp", action="store_true", help="bfloat16 autocast (default fp32)")
    opt.add_argument("--device", help=DEVICE_HELP)
    opt.add_argument("--resume", action="store_true", help=f"continue from {out}/checkpoints")
    opt.add_argument(
        "--overwrite", action="store_true", help=f"replace {what} or training run in {out}"
    )
    return opt


def command_line() -> str:
    """The command as typed, for the provenance of what it writes."""
    return " ".join(["calofm", *sys.argv[1:]])


@contextmanager
def stop_on_signal(announce: bool = True) -> Iterator[Callable[[int], bool]]:
    """Ctrl-C (or SIGTERM) asks the trainer to checkpoint and stop after the step; twice aborts.

    Yields the trainer's ``should_stop``; ``announce`` says so on stderr (rank 0 under torchrun).
    """
    stop = {"requested": False}

    def request(signum: int, frame: object) -> None:
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        if announce:
            print(
                "\nstopping after this step and writing a checkpoint (again to abort)",
                file=sys.stderr,
            )

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda step: stop["requested"]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
