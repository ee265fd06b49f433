"""calofm's generation against the reference implementation's and Geant4's, in one run.

The reference is the paper's public code (github.com/wmdataphys/FM4CAL; docs/results.md used
commit e7373eb), run from a checkout given with ``--reference`` through its own ``generate`` with
its KV cache; it needs ``pip install pkbar rotary-embedding-torch "setuptools<81"`` (pkbar imports
pkg_resources). Both models have the paper's sizes (width 256, 8 heads, one cross-attention and
two self-attention blocks, FFN 256 -> 512, an expert per class for two classes), random weights
(seeded), 27,003 spatial and 25,003 energy tokens (the paper's 25,000 linear bins), end of
sequence out of reach, so every shower has exactly ``--hits`` hits; fp32, full-vocabulary exact
sampling of both tokens at temperature 1. calofm runs its static decode step eagerly with packed
heads (the CPU default) and compiled (``--engine compile``, where a C++ compiler is found). The
reference's expert router and adapters default to ``device="cuda"`` and its blocks pass no device,
so on a CPU the harness makes those defaults ``"cpu"``; nothing else of it is changed.

Each system decodes one warm-up batch (which also compiles), then the systems take turns, one
batch each per round, for ``--rounds`` rounds, so a change in the machine's load hits all of
them alike; the median over rounds gives hits/s by wall time and by the process's CPU time.
Geant4 (the embedded one, one core, a separate process) simulates ``--geant4-showers`` showers of
the benchmark class at 10-100 GeV for its showers/s per core; its showers have a few hundred hits,
the benchmark's ``--hits``.

    python benchmarks/bench_reference.py --reference ~/FM4CAL --batch 16 --batch 64 \\
        --out benchmarks/results/reference.json

Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from calofm.errors import CalofmError
from calofm.files import atomic_output
from calofm.generation.decoder import N_UNIFORMS, EngineConfig
from calofm.generation.engine import decode
from calofm.generation.sampler import SamplingConfig
from calofm.generation.step_timing import fixed_length, random_model
from calofm.generation.throughput import ThroughputSettings, device_name, measure_geant4

CLASSES = ["G4_W_gamma", "G4_Ta_gamma"]  # the reference's class names; calofm's BENCH_CLASS first


def reference_model(checkout: Path, max_hits: int) -> Callable[[int, int], None]:
    """A function decoding ``batch`` showers of ``max_hits`` hits with the reference's own
    ``generate`` (KV cache, multinomial sampling of the full vocabularies)."""
    if not (checkout / "models" / "GPT.py").is_file():
        raise CalofmError(f"bench_reference: {checkout} is not a checkout of FM4CAL")
    sys.path.insert(0, str(checkout))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pkbar's pkg_resources deprecation
            from models import LoRA, MoE
            from models.GPT import ECAL_GPT
    except ImportError as exc:
        raise CalofmError(
            f"bench_reference: the reference cannot be imported ({exc}); "
            'pip install pkbar rotary-embedding-torch "setuptools<81"'
        ) from None
    for module in (MoE, LoRA):  # its expert router defaults to device="cuda", passed by no caller
        for cls in vars(module).values():
            init = getattr(cls, "__init__", None)
            if isinstance(cls, type) and getattr(init, "__defaults__", None):
                init.__defaults__ = tuple("cpu" if d == "cuda" else d for d in init.__defaults__)
    torch.manual_seed(0)
    model = ECAL_GPT(
        27003,
        max_hits + 2,
        256,
        attn_heads=[8, 8, 8],
        hidden_units=256,
        mlp_scale=2,
        energy_vocab=25003,
        space_vocab=27003,
        use_MoE=True,
        num_experts=2,
        material_list=CLASSES,
        particle_list=["gamma"],
        device="cpu",
    ).eval()
    with torch.no_grad():  # end of sequence out of reach, as in calofm's benchmark model
        model.logits_head.bias[model.EOS_token] = -1e9
        model.energy_head.bias[model.EOS_energy_token] = -1e9

    def run(batch: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        incident = torch.rand(batch, 1, generator=g)
        material = torch.zeros(batch, dtype=torch.long)
        with torch.no_grad():
            spatial, _ = model.generate(
                incident, material, max_seq_len=max_hits, temperature=1.0, use_kv_cache=True
            )
        assert spatial.shape[1] == max_hits + 1, "every row runs all its steps"

    return run


def calofm_model(engine: EngineConfig, max_hits: int) -> Callable[[int, int], None]:
    """The same for calofm's decode with ``engine``."""
    model = random_model("paper", 2)

    def run(batch: int, seed: int) -> None:
        g = np.random.default_rng(seed)
        u = torch.from_numpy(g.random((batch, max_hits + 1, N_UNIFORMS)))
        incident = torch.from_numpy(g.uniform(-1, 1, batch).astype(np.float32))
        cond = fixed_length(model, incident, max_hits)
        cid = torch.zeros(batch, dtype=torch.long)
        decoded = decode(model, cond, cid, SamplingConfig(), max_hits, u, True, engine)
        assert int(decoded.n_hits.min()) == max_hits, "every row runs all its steps"

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reference", type=Path, required=True, help="an FM4CAL checkout")
    parser.add_argument("--batch", type=int, action="append", help="batch sizes (16, 64)")
    parser.add_argument("--hits", type=int, default=256, help="hits per shower (256)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--geant4-showers", type=int, default=8, help="0: no Geant4")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = args.batch or [16, 64]
    try:
        systems = {"reference": reference_model(args.reference.expanduser(), args.hits)}
    except CalofmError as exc:
        raise SystemExit(str(exc)) from None
    systems["calofm eager"] = calofm_model(EngineConfig(), args.hits)
    if shutil.which("c++") or shutil.which("g++"):
        systems["calofm compiled"] = calofm_model(
            EngineConfig.for_device("compile", "cpu"), args.hits
        )
    rows: dict[str, dict[str, dict]] = {name: {} for name in systems}
    for b in batches:
        wall: dict[str, list[float]] = {name: [] for name in systems}
        cpu: dict[str, list[float]] = {name: [] for name in systems}
        for run in systems.values():
            run(b, 0)  # warm-up (and compilation)
        for r in range(args.rounds):
            for name, run in systems.items():
                w0, c0 = time.perf_counter(), time.process_time()
                run(b, r + 1)
                wall[name].append(time.perf_counter() - w0)
                cpu[name].append(time.process_time() - c0)
        for name in systems:
            hits = b * args.hits
            rows[name][str(b)] = {
                "hits_per_s_wall": hits / statistics.median(wall[name]),
                "hits_per_s_cpu": hits / statistics.median(cpu[name]),
                "showers_per_s_wall": b / statistics.median(wall[name]),
                "wall_s": wall[name],
                "cpu_s": cpu[name],
            }
    geant4 = measure_geant4(
        ThroughputSettings(presets=("paper",), geant4_showers=args.geant4_showers)
    )
    result = {
        "device": device_name("cpu"),
        "torch_version": torch.__version__,
        "hits_per_shower": args.hits,
        "rounds": args.rounds,
        "systems": rows,
        "geant4": geant4,
        "method": __doc__.split("\n\n")[1].replace("\n", " "),
    }
    print(f"{result['device']}, {args.hits} hits per shower, median of {args.rounds} rounds")
    print(f"{'system':>16} | batch | hits/s (wall) | hits/s (CPU) | x reference (wall, CPU)")
    for b in map(str, batches):
        ref = rows["reference"][b]
        for name in systems:
            r = rows[name][b]
            ratio_wall = r["hits_per_s_wall"] / ref["hits_per_s_wall"]
            ratio_cpu = r["hits_per_s_cpu"] / ref["hits_per_s_cpu"]
            print(
                f"{name:>16} | {b:>5} | {r['hits_per_s_wall']:13.0f} | {r['hits_per_s_cpu']:12.0f}"
                f" | {ratio_wall:.2f}x, {ratio_cpu:.2f}x"
            )
    if geant4:
        print(
            f"Geant4: {geant4['showers_per_s_per_core']:.2f} showers/s per core ({geant4['source']})"
        )
    if args.out:
        with atomic_output(args.out) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
