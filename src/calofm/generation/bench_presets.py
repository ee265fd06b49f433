"""The benchmark presets' energy tokenizers, one table for ``bench model``, ``bench generate`` and
``benchmarks/``; free of torch, so that the command line can offer the names without loading it."""

from __future__ import annotations

# The paper's 25,000 linear bins of 1.4 keV (as the reference implementation is measured), the
# shipped base's 1024 log bins, and a small vocabulary for tests.
PRESET_TOKENIZERS: dict[str, dict] = {
    "paper": {"scheme": "linear", "n_bins": 25_000, "max_mev": 35.0},
    "small": {"scheme": "log", "n_bins": 1024, "max_mev": 75.0},
    "tiny": {"scheme": "log", "n_bins": 64, "max_mev": 75.0},
}
# The class of a one-class benchmark model; further classes are made-up materials.
BENCH_CLASS = "G4_W:gamma"
