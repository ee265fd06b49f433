"""``calofm merge``: the files of an array of jobs as one shower file."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "merge",
        help="join the shower files of independent jobs (e.g. a Slurm array) into one file",
        description=(
            "Copy the showers of FILES, ordered by seed and --offset, into one showerdata file"
            " with the same layout. The files must hold showers of one kind (detector, material, particle,"
            " simulator or model and sampling) and never the same showers twice (the same seed"
            " with overlapping --offset ranges). Jobs of one seed with offsets 0, n, 2n, ... give"
            " exactly the showers of one run of their total. The output appears only when"
            " complete."
        ),
    )
    p.add_argument("files", type=Path, nargs="+", metavar="FILE", help="shower files to join")
    p.add_argument("--out", type=Path, required=True, help="output showerdata file (.h5)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calofm.data.merge import merge_files
    from calofm.files import check_output_file

    out = check_output_file(args.out, args.overwrite)
    path, meta = merge_files(args.files, out)
    print(f"wrote {meta['n']} showers from {len(args.files)} files to {path}")
    return 0
