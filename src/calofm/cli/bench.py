"""``calofm bench model``: generation speed (KV cache against recomputation), experts, memory."""

from __future__ import annotations

import argparse
import json
import sys

from calofm.cli._args import positive_int

HELP = "measure generation speed (calofm bench model)"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help=HELP, description=HELP)
    targets = p.add_subparsers(dest="target", required=True, metavar="TARGET")
    m = targets.add_parser(
        "model",
        help="decode speed of the paper-size model on this machine",
        description=(
            "Showers/s and tokens/s with the KV cache and with recomputation of the prefix, at "
            "batch 1, 16 and 128 and showers up to 1000 tokens (end-of-sequence disabled), the "
            "cost of 2, 6 and 12 experts, and memory. A full run takes a few minutes, --quick "
            "under one; long recomputations are extrapolated from timed steps (see the JSON "
            "'method')."
        ),
    )
    m.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    m.add_argument("--quick", action="store_true", help="fewer sizes and repeats (< 1 minute)")
    m.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    m.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    m.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from calofm.files import atomic_output, check_output_file
    from calofm.generation.benchmark import BenchSettings, format_table, run_benchmark

    if args.out:
        check_output_file(args.out, args.overwrite)  # before minutes of measuring, not after
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings.quick() if args.quick else BenchSettings()
    log = (lambda _: None) if args.json else (lambda line: print(line, file=sys.stderr))
    result = run_benchmark(settings, log=log)
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.out:
        with atomic_output(args.out) as tmp:
            tmp.write_text(text + "\n")
    print(json.dumps(result, sort_keys=True) if args.json else format_table(result))
    return 0
