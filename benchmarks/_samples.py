"""What the per-sample shower benchmarks share: their command line (shower files, the reference
first, with names) and the bootstrap of their statistics over showers."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np


def sample_parser(doc: str) -> argparse.ArgumentParser:
    """FILES (the reference first), --names, --n and --out."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="the reference first")
    parser.add_argument("--names", nargs="+", help="one name per file (default: file stems)")
    parser.add_argument("--n", type=int, help="at most this many showers per file")
    parser.add_argument("--out", type=Path)
    return parser


def named_files(args: argparse.Namespace, prog: str) -> list[tuple[str, Path]]:
    names = args.names or [f.stem for f in args.files]
    if len(names) != len(args.files):
        raise SystemExit(f"{prog}: give one name per file")
    return list(zip(names, args.files, strict=True))


def bootstrap(
    stats: Callable[[object], dict[str, float]],
    resample: Callable[[np.random.Generator], object],
    n: int = 200,
) -> dict[str, float]:
    """Standard errors of ``stats`` over ``n`` resamples of the showers (``resample(rng)``)."""
    rng = np.random.default_rng(0)
    draws = [stats(resample(rng)) for _ in range(n)]
    return {key: float(np.std([d[key] for d in draws])) for key in draws[0]}
