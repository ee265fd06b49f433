"""``calofm show``: an event display of one shower, or of two side by side (``--compare``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from calofm.cli._args import incident_energy


def _index(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a shower index, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"a shower index is 0 or more, got {value}")
    return value


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a threshold in MeV, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"the threshold must be 0 or more, got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    from calofm.tokens import TokenizerConfig

    p = subparsers.add_parser(
        "show",
        help="event display: one shower in 3D and layer by layer (PNG, PDF or SVG)",
        description=(
            "Draw one shower of FILE (simulated or generated, either layout): its cells as points"
            " in 3D, sized and coloured by energy, and one energy map per layer. With --compare,"
            " the shower of OTHER with the nearest incident energy is drawn beside it, on the"
            " same colour scale (for example a Geant4 and a generated shower)."
        ),
    )
    p.add_argument("file", type=Path, help="shower file")
    which = p.add_mutually_exclusive_group()
    which.add_argument(
        "--index", type=_index, default=0, help="index of the shower in FILE (default: 0)"
    )
    which.add_argument(
        "--energy",
        type=incident_energy,
        metavar="GEV",
        help="instead of --index: the shower of FILE with the incident energy nearest GEV",
    )
    p.add_argument(
        "--compare",
        type=Path,
        metavar="OTHER",
        help="also draw the shower of OTHER with the nearest incident energy",
    )
    p.add_argument("--out", type=Path, required=True, help="image file (.png, .pdf or .svg)")
    p.add_argument(
        "--threshold",
        type=_threshold,
        default=TokenizerConfig().threshold_mev,
        metavar="MEV",
        help="draw cells above this energy (default: %(default)g MeV, the evaluation's hit"
        " threshold; 0 draws every cell)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calofm.data.formats import file_info
    from calofm.evaluation.display import (
        event_display,
        figure_format,
        load_shower,
        nearest_index,
        save_figure,
    )
    from calofm.evaluation.metrics import format_number
    from calofm.files import atomic_output, check_output_file

    fmt = figure_format(args.out)
    out = check_output_file(args.out, args.overwrite)
    file_info(args.file)  # a missing or malformed file is refused before anything else
    if args.compare is not None:
        file_info(args.compare)
    index = args.index if args.energy is None else nearest_index(args.file, args.energy)
    views = [load_shower(args.file, index)]
    if args.compare is not None:
        energy = float(views[0].shower.incident[0])
        views.append(load_shower(args.compare, nearest_index(args.compare, energy)))
    figure = event_display(views, args.threshold)
    with atomic_output(out) as tmp:
        save_figure(figure, tmp, fmt)
    shown = " beside ".join(
        f"shower {v.index} of {v.source} ({format_number(float(v.shower.incident[0]))} GeV)"
        for v in views
    )
    print(f"{out}: {shown}")
    return 0
