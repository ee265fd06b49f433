"""``calofm convert``: rewrite shower files between the showerdata and getting_high layouts."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from calofm.cli._args import positive_int
from calofm.data.layouts import FORMATS
from calofm.errors import CalofmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert shower files between the showerdata and getting_high layouts",
        description="Convert a shower file (either layout, detected automatically) into the other "
        "layout, streaming it chunk by chunk; metadata (material, particle, detector) travels with "
        "it. The output is written as OUT.partial; an interrupted conversion resumes when the "
        "same command is run again.",
    )
    p.add_argument("input", help="shower file, showerdata or getting_high layout")
    p.add_argument("--to", choices=FORMATS, required=True, help="layout of the output file")
    p.add_argument("--out", required=True, help="output HDF5 file")
    p.add_argument("--chunk-size", type=positive_int, default=1000, help="showers read at a time")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.set_defaults(func=run)


def signature(info, fmt: str) -> str:
    """What determines the output: the input file (path, size, modification time) and the layout,
    so the same command resumes its partial file and a changed input starts afresh."""
    stat = info.path.stat()
    run = {
        "input": str(info.path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "n": info.n,
        "to": fmt,
    }
    return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from calofm.data.formats import file_info, read_showers
    from calofm.data.writers import file_metadata, open_writer
    from calofm.files import check_output_file, partial_path

    info = file_info(args.input)
    if info.n == 0:
        raise CalofmError(f"{info.path}: the file holds no showers")
    out = check_output_file(args.out, args.overwrite)
    if out.resolve() == info.path.resolve():
        raise CalofmError(f"--out {out}: is the input file; choose another name")
    meta = file_metadata(read_showers(info.path, 0, 1), converted_from=str(info.path))
    writer = open_writer(
        out,
        args.to,
        info.n,
        meta,
        info.detector,
        signature(info, args.to),
        replace_partial=args.overwrite,
    )
    start = writer.n_written
    if start:
        print(f"calofm convert: resuming {partial_path(out)} at shower {start} of {info.n}")
    try:
        with tqdm(total=info.n, initial=start, unit="shower", desc="convert", disable=None) as bar:
            for first in range(start, info.n, args.chunk_size):
                chunk = read_showers(info.path, first, min(first + args.chunk_size, info.n))
                writer.append(chunk)
                bar.update(len(chunk))
    except CalofmError:
        partial_path(out).unlink(missing_ok=True)  # the input is bad: nothing worth resuming
        raise
    path = writer.finish()
    print(f"wrote {info.n} showers ({info.format} -> {args.to}) to {Path(path)}")
    return 0
