"""Shared fixtures: small synthetic showers, so the core suite needs no external data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from calofm.data.showers import SparseShowers
from calofm.detector import DetectorConfig
from calofm.model import save_model

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine's 2 cores are shared: one thread per test avoids oversubscription stalls,
    and makes results independent of the machine's core count."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_toy_showers(
    n: int = 20,
    seed: int = 0,
    detector: DetectorConfig | None = None,
    particle: str = "gamma",
    energy_range: tuple[float, float] = (10.0, 100.0),
) -> SparseShowers:
    """Shower-like sparse events: a longitudinal gamma profile, a narrow core, falling cell energies."""
    det = detector or DetectorConfig()
    rng = np.random.default_rng(seed)
    incident = rng.uniform(*energy_range, size=n).astype(np.float32)
    dense = np.zeros((n, *det.shape), dtype=np.float32)
    for i, e in enumerate(incident):
        n_dep = int(20 + 3 * e)
        layer = np.clip(rng.gamma(4.0, det.n_layers / 12, n_dep), 0, det.n_layers - 1).astype(int)
        x = np.clip(np.rint(rng.normal(det.nx / 2 - 0.5, 1.5, n_dep)), 0, det.nx - 1).astype(int)
        y = np.clip(np.rint(rng.normal(det.ny / 2 - 0.5, 1.5, n_dep)), 0, det.ny - 1).astype(int)
        np.add.at(dense[i], (layer, x, y), rng.exponential(0.4, n_dep).astype(np.float32) * e / 20)
    return SparseShowers.from_dense(dense, incident, det, particle)


@pytest.fixture
def toy_showers() -> SparseShowers:
    return make_toy_showers()


@pytest.fixture
def shared_data() -> Path:
    """The Geant4 reference showers in ../shared/data; tests using it skip where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture
def model_dir(tmp_path) -> Path:
    """A saved tiny model (``test_model.tiny_model``), for the command-line tests."""
    from test_model import tiny_model

    save_model(tiny_model(), tmp_path / "model", {"test": True})
    return tmp_path / "model"
