"""KV cache against recomputation at batch 1, with both sides eager and with both sides compiled.

``calofm bench model`` times the eager step. At batch 1 a cached step of a small model is mostly
the cost of calling a thousand small operators, which recomputation pays once per step too, so
the eager ratio says little about what the cache saves once that overhead is gone. Here the same
random-weight model (end of sequence out of reach) is timed per decode step at prefix lengths
0..999: the decoder's static step against a full causal pass over the prefix with the heads on its
last position, first both eager, then both compiled (the step as ``--engine compile`` runs it, the
recomputation as ``torch.compile(hidden_states, dynamic=True)`` and its heads and sampling as
``torch.compile(next_tokens)``), with the large heads packed for oneDNN on both sides as
generation runs them. Each engine runs in a fresh process: in one process the second engine's
steps ran up to 1.6x slower than alone (allocations and compiled code of the first). Each probe
is the median of a few repeats in process CPU time (one thread); the step cost is fitted with
a + bL + cL^2 and summed over a 1000-token shower, as ``bench model`` does
(``calofm.generation.step_timing``, whose presets and decode step this script shares):

    python benchmarks/bench_kv_engines.py --preset small \\
        --out benchmarks/results/kv_engines_small.json

Prints a table and writes JSON. Compiling takes a minute or two per preset.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from calofm.files import atomic_output
from calofm.generation.bench_presets import PRESET_TOKENIZERS
from calofm.generation.step_timing import StepRunner, StepTimes, median_time, random_model
from calofm.model.linear import prepacked

PROBES = [0, 250, 500, 750, 999]
ENGINES = ("eager", "compile")
LENGTH = 1000


def step_times(model, engine: str, repeats: int) -> tuple[list[float], list[float]]:
    """Median seconds of the cached and of the recomputed step at each probe, both run by
    ``engine`` (the recomputation compiled as ``torch.compile(hidden_states, dynamic=True)`` and
    its heads and sampling as ``torch.compile(next_tokens)``)."""
    runner = StepRunner(model, 1, LENGTH + 1, engine=engine)
    cached = [median_time(runner.kv(p), repeats) for p in PROBES]
    plain, heads = model.hidden_states, model.next_tokens
    if engine == "compile":  # the heads and sampling compiled too, as in the cached step
        model.hidden_states = torch.compile(plain, dynamic=True)
        model.next_tokens = torch.compile(heads)
    try:
        full = [median_time(runner.recompute(p), repeats) for p in PROBES]
    finally:
        model.hidden_states, model.next_tokens = plain, heads
    return cached, full


def engine_row(preset: str, engine: str, repeats: int) -> dict:
    """One engine's timings, in this process."""
    torch.set_num_threads(1)
    model = random_model(preset, 2)
    with prepacked(model, 1):  # the heads as generation runs them, on both sides
        kv, full = step_times(model, engine, repeats)
    return {
        "cached_step_s": dict(zip(map(str, PROBES), kv, strict=True)),
        "recomputed_step_s": dict(zip(map(str, PROBES), full, strict=True)),
        "kv_speedup_at_1000": StepTimes(PROBES, full).total(LENGTH)
        / StepTimes(PROBES, kv).total(LENGTH),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESET_TOKENIZERS), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--engine", choices=ENGINES, help="time one engine here, print its JSON")
    args = parser.parse_args()
    if args.engine:
        print(json.dumps(engine_row(args.preset, args.engine, args.repeats)))
        return
    rows = {}
    for engine in ENGINES:
        command = [sys.executable, __file__, "--preset", args.preset, "--engine", engine]
        child = subprocess.run(
            [*command, "--repeats", str(args.repeats)], capture_output=True, text=True
        )
        if child.returncode != 0:
            raise SystemExit(f"bench_kv_engines: {engine} failed:\n{child.stderr[-2000:]}")
        rows[engine] = json.loads(child.stdout.splitlines()[-1])
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
