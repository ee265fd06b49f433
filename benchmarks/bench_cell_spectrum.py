"""Where a shower's cell energies go: its hottest cells, its middle ranks, and the cells at the cut.

The cell-energy spectrum is what the shipped base misses most at fixed energies: at 10 GeV its
hottest cells are too hot, at 90 GeV too many cells sit just above the readout cut. This benchmark
takes each shower's cells sorted by falling energy and reports, per file:

- the mean number of hits per shower (cells at or above the readout cut, ``--cut-mev``, 0.1 MeV
  by default as the tokenizer's; cells below it are dropped from every file);
- the energy (MeV) at rank fractions 0.01, 0.1, 0.3, 0.5 and 0.8 of a shower's hits, averaged
  over showers (rank fraction r: the cell at position round(r * (n - 1)) of the n sorted cells);
- the mean number of hits per shower within 0.01 MeV above the cut.

    python benchmarks/bench_cell_spectrum.py GEANT4.h5 GENERATED.h5 [MORE.h5 ...] [--names ...]
        [--n N] [--cut-mev C] [--out F]

The first file is the reference. Bootstrap
standard errors (200 resamples of the showers) come with every number. Prints a table and writes
JSON.
"""

from __future__ import annotations

import json

import numpy as np
from _samples import bootstrap, named_files, sample_parser

from calofm.data.formats import read_showers
from calofm.data.showers import SparseShowers
from calofm.errors import CalofmError
from calofm.files import atomic_output

RANKS = (0.01, 0.1, 0.3, 0.5, 0.8)
NEAR_CUT_MEV = 0.01


def per_shower(showers: SparseShowers, cut_mev: float) -> np.ndarray:
    """(N, 2 + len(RANKS)): hits, hits near the cut and the energy at each rank fraction."""
    rows = []
    e = showers.energies.astype(np.float64)
    for a, b in zip(showers.offsets[:-1], showers.offsets[1:], strict=True):
        cells = np.sort(e[a:b])[::-1]
        cells = cells[cells >= cut_mev]
        if len(cells) == 0:
            continue
        at = [cells[round(r * (len(cells) - 1))] for r in RANKS]
        rows.append([len(cells), (cells < cut_mev + NEAR_CUT_MEV).sum(), *at])
    return np.array(rows)


def stats(data: np.ndarray) -> dict[str, float]:
    mean = data.mean(0)
    out = {"hits": float(mean[0]), "near_cut": float(mean[1])}
    out.update({f"mev_at_{r:g}": float(m) for r, m in zip(RANKS, mean[2:], strict=True)})
    return out


def main() -> None:
    parser = sample_parser(__doc__)
    parser.add_argument("--cut-mev", type=float, default=0.1)
    args = parser.parse_args()
    cut = args.cut_mev
    rows = {}
    for name, path in named_files(args, "bench_cell_spectrum"):
        try:
            showers = read_showers(path, 0, args.n)
        except CalofmError as err:
            raise SystemExit(f"bench_cell_spectrum: {err}") from None
        data = per_shower(showers, cut)
        rows[name] = {"file": str(path), "showers": len(data), **stats(data)}
        rows[name]["stderr"] = bootstrap(
            stats, lambda rng, d=data: d[rng.integers(0, len(d), len(d))]
        )
    keys = [k for k in next(iter(rows.values())) if k not in ("file", "showers", "stderr")]
    print(f"cells from {cut:g} MeV")
    print(f"{'sample':>24} | " + " | ".join(f"{k:>17}" for k in keys))
    for name, r in rows.items():
        cells = [f"{r[k]:.3f} +- {r['stderr'][k]:.3f}" for k in keys]
        print(f"{name:>24} | " + " | ".join(f"{c:>17}" for c in cells))
    if args.out:
        doc = {"cut_mev": cut, "samples": rows, "method": __doc__.split("\n\n")[1]}
        with atomic_output(args.out) as tmp:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
