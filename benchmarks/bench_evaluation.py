"""Where the time of ``calofm evaluate`` goes: observables, metrics (W1, S, classifier), plots.

Wall and CPU seconds per stage (CPU time holds on a busy machine too), with the reference and one
candidate file (default: the Geant4 W photon test and first training file):

    python benchmarks/bench_evaluation.py [--reference A.h5] [--candidate B.h5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

from calofm.evaluation.metrics import MetricConfig, compare_samples, histogram, reference_edges
from calofm.evaluation.observables import ObservableConfig, observable_list, read_observables
from calofm.evaluation.plots import plot_observable
from calofm.files import atomic_output

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


class Stage:
    """Wall and process CPU seconds of a ``with`` block."""

    def __enter__(self) -> Stage:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=DATA / "W_gamma_test.h5")
    parser.add_argument("--candidate", type=Path, default=DATA / "W_gamma_train_0.h5")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/evaluation.json"))
    args = parser.parse_args()

    oc, mc = ObservableConfig(), MetricConfig()
    stages: dict[str, Stage] = {}
    with Stage() as stages["observables (2 files)"]:
        ref = read_observables(args.reference, oc, progress=False)
        cand = read_observables(args.candidate, oc, progress=False)
    observables = observable_list(oc)
    edges = {o.name: reference_edges(o, ref, oc, mc) for o in observables}
    with Stage() as stages[f"metrics ({mc.n_splits} splits, floor + 1 candidate)"]:
        compare_samples(ref, {"candidate": cand}, observables, edges, mc, progress=False)
    with tempfile.TemporaryDirectory() as tmp, Stage() as stages[f"{len(observables)} plots"]:
        for o in observables:
            h_ref = histogram(o, ref, edges[o.name])
            h_cand = {"candidate": histogram(o, cand, edges[o.name])}
            plot_observable(o, edges[o.name], h_ref, h_cand, Path(tmp) / f"{o.name}.png")

    n = len(ref) + len(cand)
    print(f"{'stage':42s} {'wall s':>8s} {'CPU s':>8s}")
    for name, s in stages.items():
        print(f"{name:42s} {s.wall:8.2f} {s.cpu:8.2f}")
    obs_stage = next(iter(stages.values()))
    print(f"observables: {n / obs_stage.cpu:.0f} showers per CPU second")
    result = {
        "files": [str(args.reference), str(args.candidate)],
        "n_showers": n,
        "stages": {name: {"wall_s": s.wall, "cpu_s": s.cpu} for name, s in stages.items()},
        "machine": platform.platform(),
        "metric_config": mc.to_dict(),
    }
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
