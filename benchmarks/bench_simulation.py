"""Geant4 showers per second on one core, per material and incident energy.

Each material gets its own process (Geant4 geometry is global per process) with one
``Calorimeter``; per energy, one warm-up shower builds Geant4's tables, then ``n`` showers are
timed by wall clock and by the process's CPU time (which holds up on a busy machine).

    python benchmarks/bench_simulation.py --materials G4_W G4_Ta G4_Pb --energies 10 50 100 \\
        --showers 20 6 4
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from calofm.detector import DetectorConfig, material_long
from calofm.files import atomic_output
from calofm.simulation.runner import init_worker


def bench_material(
    material: str, particle: str, energies: list[float], showers: list[int], seed: int
) -> list[dict]:
    from calofm.simulation.geant4 import Calorimeter, simulator_version

    start = time.perf_counter()
    calorimeter = Calorimeter(DetectorConfig().with_material(material))
    setup_s = time.perf_counter() - start
    rows = []
    for energy, n in zip(energies, showers, strict=True):
        calorimeter.simulate(particle, np.array([energy]), seed)  # warm-up: builds the tables
        wall, cpu = time.perf_counter(), time.process_time()
        calorimeter.simulate(particle, np.full(n, energy), seed + 1)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        rows.append(
            dict(
                material=material,
                particle=particle,
                energy_gev=energy,
                showers=n,
                wall_s=round(wall, 3),
                cpu_s=round(cpu, 3),
                wall_showers_per_s=round(n / wall, 3),
                cpu_showers_per_s=round(n / cpu, 3),
                setup_s=round(setup_s, 3),
                simulator=simulator_version(),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--materials", nargs="+", default=["G4_W"])
    parser.add_argument("--particle", default="gamma")
    parser.add_argument("--energies", nargs="+", type=float, default=[10.0, 50.0, 100.0])
    parser.add_argument("--showers", nargs="+", type=int, default=[20, 6, 4], help="per energy")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/simulation.json"))
    args = parser.parse_args()
    if len(args.showers) != len(args.energies) or min(args.showers) < 1:
        parser.error("give one --showers count (at least 1) per energy")

    rows = []
    header = f"{'material':<10}{'particle':<10}{'GeV':>7}{'showers':>9}"
    print(header + f"{'wall showers/s':>16}{'CPU showers/s':>15}{'CPU s/shower':>14}")
    for name in args.materials:
        material = material_long(name)
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=context, initializer=init_worker) as process:
            job = (material, args.particle, args.energies, args.showers, args.seed)
            for row in process.submit(bench_material, *job).result():
                rows.append(row)
                print(
                    f"{material:<10}{args.particle:<10}{row['energy_gev']:>7g}{row['showers']:>9}"
                    f"{row['wall_showers_per_s']:>16.2f}{row['cpu_showers_per_s']:>15.2f}"
                    f"{row['cpu_s'] / row['showers']:>14.3f}"
                )

    result = dict(
        benchmark="simulation",
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        load_average=list(os.getloadavg()),
        results=rows,
    )
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
