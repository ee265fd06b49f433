"""Generation speed on this machine: KV cache against recomputing the prefix, experts, memory.

Prints a table and writes the JSON result (method in ``calofm.generation.benchmark``):

    python benchmarks/bench_generation.py [--quick] [--threads 1] [--out FILE]

The same measurement is ``calofm bench model [--json] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from calofm.files import atomic_output
from calofm.generation.benchmark import BenchSettings, format_table, run_benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes (< 1 minute)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/generation.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run_benchmark(
        BenchSettings.quick() if args.quick else BenchSettings(), log=lambda line: print(line)
    )
    print()
    print(format_table(result))
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
