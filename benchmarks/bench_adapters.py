"""What adapters cost in KV-cache decoding: tokens/s of the base model and of adapted classes.

Small preset, random weights, a fixed number of decode steps (multinomial sampling; no EOS stop
needed: a random model rarely emits it). Prints a table and writes the JSON result:

    python benchmarks/bench_adapters.py [--batch 64] [--steps 100] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from calofm.adapters import AdaptedModel, AdapterConfig
from calofm.detector import DetectorConfig
from calofm.files import atomic_output
from calofm.generation.engine import N_UNIFORMS, decode
from calofm.generation.sampler import SamplingConfig
from calofm.model import CaloFM, preset
from calofm.tokens import TokenizerConfig

CASES = [
    ("base model, W gamma rows", None),
    ("adapters attached, W gamma rows", ["G4_W:gamma"]),
    ("Pb gamma rows (expert + conditioning)", ["G4_Pb:gamma"]),
    ("W e- rows (LoRA + heads + bottlenecks + expert)", ["G4_W:e-"]),
    ("mixed rows of 4 classes", ["G4_W:gamma", "G4_Ta:gamma", "G4_Pb:gamma", "G4_W:e-"]),
]


def tokens_per_s(model: CaloFM | AdaptedModel, classes: list[str], batch: int, steps: int) -> float:
    ids = torch.tensor([model.class_index(classes[i % len(classes)]) for i in range(batch)])
    uniforms = torch.from_numpy(np.random.default_rng(0).random((batch, steps + 1, N_UNIFORMS)))
    sampling = SamplingConfig(1.0, None, None, None)
    start = time.perf_counter()
    out = decode(model, torch.zeros(batch), ids, sampling, steps, uniforms)
    return batch * out.steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/adapters.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    det = DetectorConfig()
    tok = TokenizerConfig.for_detector(
        det, scheme="log", n_bins=1024, max_mev=70.0, incident_min_gev=10, incident_max_gev=100
    )
    torch.manual_seed(0)
    model: CaloFM | AdaptedModel = CaloFM(preset("small"), tok, det, ["G4_W:gamma", "G4_Ta:gamma"])
    model.eval()
    rows = []
    for label, classes in CASES:
        if classes is not None and not isinstance(model, AdaptedModel):
            model = AdaptedModel(model)
            model.add_adapter(
                AdapterConfig(class_name="G4_Pb:gamma", init_from="G4_Ta:gamma", condition=True),
            )
            model.add_adapter(
                AdapterConfig(
                    particle="e-", class_name="G4_W:e-", init_from="G4_W:gamma", embed_bottleneck=16
                ),
            )
        rate = tokens_per_s(model, classes or ["G4_W:gamma"], args.batch, args.steps)
        rows.append({"case": label, "tokens_per_s": rate})
        print(f"{label:50s} {rate:9.0f} tokens/s", flush=True)
    result = {
        "batch": args.batch,
        "steps": args.steps,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "rows": rows,
    }
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
