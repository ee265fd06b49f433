"""``calofm evaluate``: compare generated (or other) showers with a Geant4 reference file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from calofm.cli._args import positive_int, random_seed
from calofm.errors import CalofmError


def energy_slice(text: str) -> tuple[float, float]:
    """'LO-HI' in GeV, e.g. '10-20'."""
    try:
        lo, hi = (float(v) for v in text.split("-"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected LO-HI in GeV (e.g. 10-20), got {text!r}"
        ) from None
    if not 0 <= lo < hi:
        raise argparse.ArgumentTypeError(f"slice {text}: need 0 <= LO < HI")
    return lo, hi


def register(subparsers: argparse._SubParsersAction) -> None:
    from calofm.evaluation.metrics import MetricConfig
    from calofm.evaluation.observables import ObservableConfig

    default_slices = ObservableConfig().energy_slices_gev
    shown = " ".join(f"{lo:g}-{hi:g}" for lo, hi in default_slices)
    p = subparsers.add_parser(
        "evaluate",
        help="validate showers against a reference: metrics.json, PNGs, report.html",
        description=(
            "Compare each CANDIDATE shower file with the REFERENCE file (either format) on the"
            " standard ECAL observables: W1 x 100 on standardised observables, separation power,"
            " a classifier AUC, and the floor (the reference's two halves against each other, at"
            " the same sample size)."
        ),
    )
    p.add_argument("reference", type=Path, help="reference shower file (e.g. Geant4 test set)")
    p.add_argument("candidates", type=Path, nargs="+", help="shower files to compare with it")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="output directory")
    p.add_argument(
        "--names", nargs="+", metavar="NAME", help="candidate names (default: file stems)"
    )
    p.add_argument(
        "--describe",
        action="append",
        default=[],
        metavar="NAME=TEXT",
        help="say in the report what a sample is (e.g. 'Geant4=Geant4, the training sample');"
        " NAME is a candidate name or 'reference' (default: from the file's metadata)",
    )
    p.add_argument("--max-showers", type=positive_int, metavar="N", help="use the first N showers")
    p.add_argument(
        "--slices",
        type=energy_slice,
        nargs="+",
        metavar="LO-HI",
        default=default_slices,
        help=f"incident-energy slices in GeV (default: {shown})",
    )
    p.add_argument(
        "--splits",
        type=positive_int,
        default=MetricConfig.n_splits,
        help="random reference half-splits averaged over (default: %(default)s)",
    )
    p.add_argument(
        "--seed",
        type=random_seed,
        default=MetricConfig.seed,
        help="seed of the splits (default: %(default)s)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing report in --out")
    p.set_defaults(func=run)


def _class_warnings(reference: Path, candidates: dict[str, Path]) -> list[str]:
    """A sentence for each candidate whose material or particle differs from the reference's:
    the comparison is still made (it can be the point), but never silently."""
    from calofm.data.formats import file_info

    ref = file_info(reference)
    lines = []
    for path in candidates.values():
        info = file_info(path)
        if (info.detector.material, info.particle) != (ref.detector.material, ref.particle):
            lines.append(
                f"calofm evaluate: warning: {path} holds {info.detector.material} "
                f"{info.particle} showers, the reference {reference} holds "
                f"{ref.detector.material} {ref.particle} ones; the metrics compare different "
                "materials or particles"
            )
    return lines


def _descriptions(items: list[str], names: list[str]) -> dict[str, str]:
    """--describe NAME=TEXT options as a dict, each NAME a candidate or 'reference'."""
    out = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not text.strip():
            raise CalofmError(f"--describe {item!r}: expected NAME=TEXT")
        if name == "reference" and name in names:
            raise CalofmError("--describe reference=...: a candidate is named 'reference' too")
        if name != "reference" and name not in names:
            raise CalofmError(
                f"--describe {name}=...: no candidate of that name ({', '.join(names)})"
            )
        out[name] = text.strip()
    return out


def run(args: argparse.Namespace) -> int:
    from calofm.evaluation.metrics import MetricConfig, format_number
    from calofm.evaluation.observables import ObservableConfig
    from calofm.evaluation.report import REPORT_FILE, evaluate
    from calofm.evaluation.verdicts import FLOOR

    names = args.names or [p.stem for p in args.candidates]
    if len(names) != len(args.candidates):
        raise CalofmError(f"--names gives {len(names)} names for {len(args.candidates)} candidates")
    if len(set(names)) != len(names):
        raise CalofmError(
            f"candidate names must differ ({', '.join(names)}); set them with --names"
        )
    from calofm.files import check_output_dir

    candidates = dict(zip(names, args.candidates, strict=True))
    descriptions = _descriptions(args.describe, names)
    out = check_output_dir(args.out)
    if (out / REPORT_FILE).exists() and not args.overwrite:
        raise CalofmError(
            f"{out} holds a complete report; add --overwrite to replace it, or choose another --out"
        )
    for line in _class_warnings(args.reference, candidates):
        print(line, file=sys.stderr)
    metrics = evaluate(
        args.reference,
        candidates,
        args.out,
        observable_config=ObservableConfig(energy_slices_gev=tuple(args.slices)),
        metric_config=MetricConfig(n_splits=args.splits, seed=args.seed),
        max_showers=args.max_showers,
        descriptions={k: v for k, v in descriptions.items() if k != "reference"},
        reference_description=descriptions.get("reference"),
    )
    n = metrics["n_compared"]
    rows = [(FLOOR, metrics[FLOOR]), *metrics["candidates"].items()]
    width = max(len(r[0]) for r in rows)
    columns = ("energy_sum", "n_hits", "cog_z")
    print(f"W1x100 at {n} vs {n} showers (mean over {args.splits} splits; lower is better):")
    print(f"{'':{width}}  {'  '.join(f'{c:>10}' for c in columns)}  {'classifier AUC':>14}")
    for name, entry in rows:
        o = entry["observables"]
        values = "  ".join(f"{format_number(o[c]['w1x100']):>10}" for c in columns)
        print(f"{name:{width}}  {values}  {format_number(entry['classifier_auc']):>14}")
    for v in metrics["verdicts"].values():
        print(v["text"])
    print(f"report: {Path(args.out) / REPORT_FILE}")
    return 0
