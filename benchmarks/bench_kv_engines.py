"""KV cache against recomputation at batch 1, with both sides eager and with both sides compiled.

``calofm bench model`` times the eager step. At batch 1 a cached step of a small model is mostly
the cost of calling a thousand small operators, which recomputation pays once per step too, so
the eager ratio says little about what the cache saves once that overhead is gone. Here the same
random-weight model (end of sequence out of reach) is timed per decode step at prefix lengths
0..999: the decoder's static step against a full causal pass over the prefix with the heads on its
last position, first both eager, then both compiled (the step as ``--engine compile`` runs it, the
recomputation as ``torch.compile(hidden_states, dynamic=True)``), with the large heads packed
for oneDNN on both sides as generation runs them. Each probe is the median of a few repeats in
process CPU time (one thread); the step cost is fitted with a + bL + cL^2 and summed over a
1000-token shower, as ``bench model`` does (``calofm.generation.step_timing``, whose presets and
decode step this script shares):

    python benchmarks/bench_kv_engines.py --preset small \\
        --out benchmarks/results/kv_engines_small.json

Prints a table and writes JSON. Compiling takes a minute or two per preset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from calofm.files import atomic_output
from calofm.generation.bench_presets import PRESET_TOKENIZERS
from calofm.generation.step_timing import StepRunner, StepTimes, median_time, random_model
from calofm.model.experts import prepacked

PROBES = [0, 250, 500, 750, 999]
LENGTH = 1000


def step_times(model, engine: str, repeats: int) -> tuple[list[float], list[float]]:
    """Median seconds of the cached and of the recomputed step at each probe, both run by
    ``engine`` (the recomputation compiled as ``torch.compile(hidden_states, dynamic=True)``)."""
    runner = StepRunner(model, 1, LENGTH + 1, engine=engine)
    cached = [median_time(runner.kv(p), repeats) for p in PROBES]
    plain = model.hidden_states
    if engine == "compile":
        model.hidden_states = torch.compile(plain, dynamic=True)
    try:
        full = [median_time(runner.recompute(p), repeats) for p in PROBES]
    finally:
        model.hidden_states = plain
    return cached, full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESET_TOKENIZERS), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = random_model(args.preset, 2)
    rows = {}
    with prepacked(model, 1):  # the heads as generation runs them, on both sides
        for engine in ("eager", "compile"):
            kv, full = step_times(model, engine, args.repeats)
            rows[engine] = {
                "cached_step_s": dict(zip(map(str, PROBES), kv, strict=True)),
                "recomputed_step_s": dict(zip(map(str, PROBES), full, strict=True)),
                "kv_speedup_at_1000": StepTimes(PROBES, full).total(LENGTH)
                / StepTimes(PROBES, kv).total(LENGTH),
            }
    result = {
        "preset": args.preset,
        "batch": 1,
        "tokens": LENGTH,
        "threads": 1,
        "clock": "process CPU time",
        "torch_version": torch.__version__,
        "engines": rows,
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
    }
    print(f"preset {args.preset}, batch 1, {LENGTH} tokens, one thread (process CPU time)")
    print(f"{'engine':>8} | cached step ms (prefix {PROBES}) | recomputed step ms | KV speed-up")
    for engine, r in rows.items():
        kv = " ".join(f"{v * 1e3:6.2f}" for v in r["cached_step_s"].values())
        full = " ".join(f"{v * 1e3:6.1f}" for v in r["recomputed_step_s"].values())
        print(f"{engine:>8} | {kv} | {full} | {r['kv_speedup_at_1000']:.1f}x")
    if args.out:
        with atomic_output(args.out) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
