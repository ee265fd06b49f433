"""Which way a shower leans: the spread of its transverse centre, and whether its hot hits follow.

A Geant4 shower's axis wanders with its first interactions, so its energy-weighted transverse
centre varies from shower to shower, and a shower's next hot hit tends to the side its hottest
hits so far lean to. This benchmark measures both for shower files:

- the standard deviation over showers of the energy-weighted centre in x and y (mm);
- for k = 1, 2, 3, the correlation over showers of the (k+1)-th hottest hit's offset from the
  beam axis with the energy-weighted centre of the k hottest hits (x and y pooled): positive
  when hot hits follow the lean.

    python benchmarks/bench_lean.py GEANT4.h5 GENERATED.h5 [MORE.h5 ...] [--names ...] [--out F]

The first file is the reference; bootstrap standard errors (200 resamples of the showers) come
with every number. Prints a table and writes JSON.
"""

from __future__ import annotations

import json

import numpy as np
from _samples import bootstrap, named_files, sample_parser

from calofm.data.formats import read_showers
from calofm.data.showers import SparseShowers
from calofm.files import atomic_output

KS = (1, 2, 3)


def offsets(showers: SparseShowers) -> tuple[np.ndarray, np.ndarray]:
    """(H,) x and y of every hit's cell centre from the beam axis, in mm."""
    det = showers.detector
    _, x, y = det.voxel_to_lxy(showers.voxels)
    return (x - (det.nx - 1) / 2) * det.cell_mm, (y - (det.ny - 1) / 2) * det.cell_mm


def per_shower(showers: SparseShowers) -> dict[str, np.ndarray]:
    """Each shower's centre (N, 2) and, per k, the lean of its k hottest hits and the offset of
    the next one (N_k, 2) each, for the showers with more than k hits."""
    x, y = offsets(showers)
    xy = np.stack([x, y], axis=-1)
    e = showers.energies.astype(np.float64)
    out: dict[str, list] = {
        "centre": [],
        **{f"lean{k}": [] for k in KS},
        **{f"next{k}": [] for k in KS},
    }
    for a, b in zip(showers.offsets[:-1], showers.offsets[1:], strict=True):
        ei, xyi = e[a:b], xy[a:b]
        if len(ei) == 0:
            continue
        out["centre"].append((ei[:, None] * xyi).sum(0) / ei.sum())
        order = np.argsort(-ei, kind="stable")
        for k in KS:
            if len(ei) > k:
                top = order[:k]
                out[f"lean{k}"].append((ei[top, None] * xyi[top]).sum(0) / ei[top].sum())
                out[f"next{k}"].append(xyi[order[k]])
    return {key: np.array(v).reshape(-1, 2) for key, v in out.items()}


def stats(data: dict[str, np.ndarray]) -> dict[str, float]:
    out = {
        "sd_centre_x_mm": float(data["centre"][:, 0].std()),
        "sd_centre_y_mm": float(data["centre"][:, 1].std()),
    }
    for k in KS:
        lean, nxt = data[f"lean{k}"].ravel(), data[f"next{k}"].ravel()
        out[f"corr_next_lean_k{k}"] = float(np.corrcoef(lean, nxt)[0, 1])
    return out


def _resampled(data: dict[str, np.ndarray], rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Each per-shower array resampled with replacement."""
    return {key: v[rng.integers(0, len(v), len(v))] for key, v in data.items()}


def main() -> None:
    args = sample_parser(__doc__).parse_args()
    rows = {}
    for name, path in named_files(args, "bench_lean"):
        showers = read_showers(path, 0, args.n)
        data = per_shower(showers)
        rows[name] = {"file": str(path), "showers": len(data["centre"]), **stats(data)}
        rows[name]["stderr"] = bootstrap(stats, lambda rng, d=data: _resampled(d, rng))
    keys = [k for k in next(iter(rows.values())) if k not in ("file", "showers", "stderr")]
    print(f"{'sample':>24} | " + " | ".join(f"{k:>18}" for k in keys))
    for name, r in rows.items():
        cells = [f"{r[k]:+.3f} +- {r['stderr'][k]:.3f}" for k in keys]
        print(f"{name:>24} | " + " | ".join(f"{c:>18}" for c in cells))
    if args.out:
        with atomic_output(args.out) as tmp:
            tmp.write_text(
                json.dumps({"samples": rows, "method": __doc__.split("\n\n")[1]}, indent=2) + "\n"
            )


if __name__ == "__main__":
    main()
