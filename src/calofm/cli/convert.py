"""``calofm convert``: rewrite shower files between the showerdata and getting_high layouts."""

from __future__ import annotations

import argparse

from calofm.cli._args import positive_int
from calofm.data.formats import FORMATS
from calofm.errors import CalofmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert shower files between the showerdata and getting_high layouts",
        description="Convert a shower file (either layout, detected automatically) into the other "
        "layout, streaming it chunk by chunk; metadata (material, particle, detector) travels with it.",
    )
    p.add_argument("input", help="shower file, showerdata or getting_high layout")
    p.add_argument("--to", choices=FORMATS, required=True, help="layout of the output file")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--chunk-size", type=positive_int, default=1000, help="showers read at a time")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from calofm.data.formats import file_info, file_metadata, iter_showers, open_writer

    info = file_info(args.input)
    writer = None
    with tqdm(total=info.n, unit="shower", desc="convert", disable=None) as bar:
        for chunk in iter_showers(args.input, chunk_size=args.chunk_size):
            if writer is None:
                meta = file_metadata(chunk, converted_from=str(info.path))
                writer = open_writer(args.out, args.to, info.n, meta, info.detector)
            writer.append(chunk)
            bar.update(len(chunk))
    if writer is None:
        raise CalofmError(f"{info.path}: the file holds no showers")
    path = writer.finish()
    print(f"wrote {info.n} showers ({info.format} -> {args.to}) to {path}")
    return 0
