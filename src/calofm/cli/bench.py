"""``calofm bench``: ``model`` (KV cache against recomputation, experts, memory) and ``generate``
(showers/s of every decode engine next to Geant4)."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace

from calofm.cli._args import (
    PRECISION_CHOICES,
    non_negative_int,
    positive_float,
    positive_int,
)
from calofm.generation.bench_presets import PRESET_TOKENIZERS

HELP = "measure generation speed (calofm bench model, calofm bench generate)"


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
    m.add_argument(
        "--preset",
        choices=sorted(PRESET_TOKENIZERS),
        help=(
            "model sizes: paper (flat heads, 25,000 linear energy bins as in the paper; default), "
            "small (the shipped base's design: factorised voxel head, 1024 log energy bins) or "
            "tiny (for tests)"
        ),
    )
    m.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    m.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")
    m.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    m.set_defaults(func=run)

    g = targets.add_parser(
        "generate",
        help="showers/s of every decode engine, next to Geant4 on one core",
        description=(
            "Showers/s, tokens/s and memory of recomputation, the eager static KV-cache step, "
            "the same with packed heads (CPU), the compiled step and CUDA graph replay (CUDA), at "
            "each --batch, and the embedded Geant4's showers/s on one core for the same incident "
            "energies (10-100 GeV): speedup_vs_geant4 is the best generation rate over it. With "
            "--random-weights every shower runs exactly --steps steps (end of sequence "
            "disabled); --model adds a trained model's showers with and without continuous "
            "batching. Method in the JSON's 'method'."
        ),
    )
    g.add_argument(
        "--preset",
        action="append",
        choices=sorted(PRESET_TOKENIZERS),
        help="model sizes (repeatable; default paper and small)",
    )
    g.add_argument(
        "--random-weights",
        action="store_true",
        help="random-weight models of the presets, every shower --steps long",
    )
    g.add_argument("--model", metavar="DIR", help="a trained model: continuous batching gain")
    g.add_argument(
        "--batch", type=positive_int, action="append", help="batch size (repeatable; 16 and 64)"
    )
    g.add_argument("--steps", type=positive_int, default=256, help="decode steps (default 256)")
    g.add_argument(
        "--mode",
        action="append",
        help=(
            "engine to measure: recompute, eager, packed, compile or graphs (repeatable; default: "
            "on CUDA all but compile, on a CPU all but graphs, compile where a C++ compiler is)"
        ),
    )
    g.add_argument("--repeats", type=positive_int, default=2, help="timed runs (median; 2)")
    g.add_argument(
        "--showers", type=positive_int, default=64, help="trained-model showers per batch (64)"
    )
    g.add_argument(
        "--geant4-showers",
        type=non_negative_int,
        default=8,
        help="Geant4 showers to time (default 8; 0: none)",
    )
    g.add_argument(
        "--geant4-rate",
        type=positive_float,
        metavar="SHOWERS_PER_S",
        help="Geant4 showers/s per core measured elsewhere, where geant4-pybind is missing",
    )
    g.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="fp32",
        help="matrix products of the cached modes (as generate --precision; default fp32)",
    )
    g.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto (default cpu)")
    g.add_argument("--threads", type=positive_int, help="torch threads (default: torch's choice)")
    g.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    g.add_argument("--out", metavar="FILE", help="also write the JSON result to FILE")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    g.set_defaults(func=run_generate)


def run(args: argparse.Namespace) -> int:
    import torch

    from calofm.files import atomic_output, check_output_file
    from calofm.generation.benchmark import BenchSettings, format_table, run_benchmark

    if args.out:
        check_output_file(args.out, args.overwrite)  # before minutes of measuring, not after
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = BenchSettings.quick() if args.quick else BenchSettings()
    if args.preset:
        settings = replace(settings, preset=args.preset)
    log = (lambda _: None) if args.json else (lambda line: print(line, file=sys.stderr))
    result = run_benchmark(settings, log=log)
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.out:
        with atomic_output(args.out) as tmp:
            tmp.write_text(text + "\n")
    print(json.dumps(result, sort_keys=True) if args.json else format_table(result))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    import torch

    from calofm.errors import CalofmError
    from calofm.files import atomic_output, check_output_file
    from calofm.generation.throughput import ThroughputSettings, format_throughput, run_throughput
    from calofm.training.distributed import resolve_device

    if not args.random_weights and args.model is None:
        raise CalofmError("bench generate: give --random-weights, --model DIR, or both")
    device = str(resolve_device(args.device))
    if args.out:
        check_output_file(args.out, args.overwrite)
    if args.threads:
        torch.set_num_threads(args.threads)
    presets = tuple(args.preset or ("paper", "small")) if args.random_weights else ()
    settings = ThroughputSettings(
        presets=presets,
        batches=tuple(args.batch or (16, 64)),
        steps=args.steps,
        modes=tuple(args.mode) if args.mode else None,
        repeats=args.repeats,
        device=device,
        model=args.model,
        n_showers=args.showers,
        geant4_showers=args.geant4_showers,
        geant4_rate=args.geant4_rate,
        precision=args.precision,
    )
    log = (lambda _: None) if args.json else (lambda line: print(line, file=sys.stderr))
    result = run_throughput(settings, log=log)
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.out:
        with atomic_output(args.out) as tmp:
            tmp.write_text(text + "\n")
    print(json.dumps(result, sort_keys=True) if args.json else format_throughput(result))
    return 0
