"""KV cache against recomputation at batch 1, with both sides eager and with both sides compiled.

``calofm bench model`` times the eager step. At batch 1 a cached step of a small model is mostly
the cost of calling a thousand small operators, which recomputation pays once per step too, so
the eager ratio says little about what the cache saves once that overhead is gone. Here the same
random-weight model (end of sequence out of reach) is timed per decode step at prefix lengths
0..999: the decoder's static step against a full causal pass over the prefix with the heads on its
last position, first both eager, then both compiled (the step as ``--engine compile`` runs it, the
recomputation as ``torch.compile(hidden_states, dynamic=True)``). Each probe is the median of a
few repeats in process CPU time (one thread); the step cost is fitted with a + bL + cL^2 and
summed over a 1000-token shower, as ``bench model`` does:

    python benchmarks/bench_kv_engines.py --preset small \\
        --out benchmarks/results/kv_engines_small.json

Prints a table and writes JSON. Compiling takes a minute or two per preset.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from calofm.files import atomic_output
from calofm.generation.decoder import EngineConfig, StaticDecoder
from calofm.generation.step_timing import StepRunner, bench_model, median_time

PROBES = (0, 250, 500, 750, 999)
LENGTH = 1000
TOKENIZERS = {"paper": (None, None), "small": (1024, "log")}  # (bins, scheme): bench model's


def shower_seconds(per_step: list[float]) -> float:
    """A 1000-token shower's time from the probes' step times (quadratic fit in the prefix)."""
    fit = np.polyfit(PROBES, per_step, 2)
    return float(np.polyval(fit, np.arange(LENGTH)).sum())


def cached_steps(model, runner: StepRunner, engine: str, repeats: int) -> list[float]:
    runner.setup_cache()
    dec = StaticDecoder(
        model, runner.class_id, runner.sampling, LENGTH + 1, EngineConfig.for_device(engine, "cpu")
    )
    with dec:
        dec.load(np.arange(1), runner.cond, runner.u[:, None, :].expand(-1, LENGTH + 2, -1))
        out = []
        for p in PROBES:

            def step(p: int = p) -> None:
                dec.pos.fill_(p + 1)
                dec.done.fill_(False)
                with torch.no_grad():
                    dec._run(p + 2)
                bool(dec.done.all())  # the host's look

            out.append(median_time(step, repeats))
    return out


def recomputed_steps(model, runner: StepRunner, engine: str, repeats: int) -> list[float]:
    plain = model.hidden_states
    if engine == "compile":
        model.hidden_states = torch.compile(plain, dynamic=True)
    try:
        return [median_time(runner.recompute(p), repeats) for p in PROBES]
    finally:
        model.hidden_states = plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(TOKENIZERS), default="small")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    bins, scheme = TOKENIZERS[args.preset]
    model = bench_model(args.preset, 2, bins, scheme)
    rows = {}
    for engine in ("eager", "compile"):
        kv = cached_steps(model, StepRunner(model, 1, LENGTH + 1), engine, args.repeats)
        full = recomputed_steps(model, StepRunner(model, 1, LENGTH + 1), engine, args.repeats)
        rows[engine] = {
            "cached_step_s": dict(zip(map(str, PROBES), kv, strict=True)),
            "recomputed_step_s": dict(zip(map(str, PROBES), full, strict=True)),
            "kv_speedup_at_1000": shower_seconds(full) / shower_seconds(kv),
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
