"""Reproducible splits and subsets over several files, reading only the selected rows."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_toy_showers

from calofm.data import subsets
from calofm.data.formats import write_showers
from calofm.data.showers import concatenate
from calofm.data.subsets import (
    ShowerPool,
    expand_paths,
    select_showers,
    split_indices,
    subset_indices,
)
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError

DET = DetectorConfig(absorber_mm=(2.1,) * 6, nx=6, ny=6)


@pytest.fixture
def two_files(tmp_path):
    parts = [make_toy_showers(30, seed=k, detector=DET, energy_range=(1, 5)) for k in range(2)]
    paths = [write_showers(p, tmp_path / f"W_gamma_train_{k}.h5") for k, p in enumerate(parts)]
    return paths, concatenate(parts)


def test_split_is_deterministic_disjoint_and_complete():
    train, val = split_indices(1000, 0.1, seed=3)
    again = split_indices(1000, 0.1, seed=3)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    assert len(val) == 100 and len(np.intersect1d(train, val)) == 0
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(1000))
    assert not np.array_equal(val, split_indices(1000, 0.1, seed=4)[1])


def test_split_rejects_fractions_that_leave_nothing():
    with pytest.raises(CalofmError):
        split_indices(1, 0.5, seed=0)
    with pytest.raises(CalofmError):
        split_indices(10, 1.0, seed=0)


def test_subset_is_reproducible_and_repeats_are_disjoint():
    pool = np.arange(100, 1100)
    a, boot_a = subset_indices(pool, 300, seed=7, repeat=0)
    b, boot_b = subset_indices(pool, 300, seed=7, repeat=1)
    assert np.array_equal(a, subset_indices(pool, 300, seed=7, repeat=0)[0])
    assert not boot_a and not boot_b
    assert len(np.unique(a)) == 300 and len(np.intersect1d(a, b)) == 0
    assert set(a) <= set(pool)


def test_smaller_subset_is_contained_in_larger_one():
    pool = np.arange(500)
    small, _ = subset_indices(pool, 50, seed=1)
    large, _ = subset_indices(pool, 200, seed=1)
    assert set(small) <= set(large)


def test_repeat_past_the_pool_is_a_reproducible_bootstrap():
    pool = np.arange(1000)
    c, boot = subset_indices(pool, 400, seed=7, repeat=2)
    assert boot and len(c) == 400 and len(np.unique(c)) < 400
    assert np.array_equal(c, subset_indices(pool, 400, seed=7, repeat=2)[0])
    assert not np.array_equal(c, subset_indices(pool, 400, seed=7, repeat=3)[0])


def test_subset_larger_than_pool_is_an_error():
    with pytest.raises(CalofmError, match="only 10"):
        subset_indices(np.arange(10), 11, seed=0)


def test_pool_reads_exactly_the_selected_showers_across_files(two_files):
    paths, whole = two_files
    pool = ShowerPool.open(paths)
    assert pool.n == 60
    idx = np.array([59, 3, 31, 3, 0, 29, 30])
    got = pool.read(idx)
    want = whole.select(idx)
    assert np.array_equal(got.offsets, want.offsets)
    assert np.array_equal(got.voxels, want.voxels)
    assert np.array_equal(got.energies, want.energies)
    assert np.array_equal(got.incident, want.incident)


def test_pool_reads_only_the_needed_row_ranges(two_files, monkeypatch):
    paths, _ = two_files
    calls = []
    real = subsets.read_showers

    def spy(path, start=0, stop=None):
        calls.append((str(path), start, stop))
        return real(path, start, stop)

    monkeypatch.setattr(subsets, "read_showers", spy)
    ShowerPool.open(paths).read(np.array([2, 3, 40]), max_gap=0)
    assert calls == [(str(paths[0]), 2, 4), (str(paths[1]), 10, 11)]


def test_select_showers_gives_same_showers_for_same_seed(two_files):
    paths, _ = two_files
    a = select_showers(paths, n_train=20, val_fraction=0.1, seed=5)
    b = select_showers(paths, n_train=20, val_fraction=0.1, seed=5)
    c = select_showers(paths, n_train=20, val_fraction=0.1, seed=5, repeat=1)
    assert len(a.train) == 20 and len(a.val) == 6
    assert np.array_equal(a.train.energies, b.train.energies)
    assert np.array_equal(a.val.energies, c.val.energies)  # validation does not depend on repeat
    assert not set(a.train.incident.tolist()) & set(a.val.incident.tolist())
    assert not set(a.train.incident.tolist()) & set(c.train.incident.tolist())
    files = a.provenance["files"]
    assert len(files) == 2 and all(len(f["sha256"]) == 64 and f["n_showers"] == 30 for f in files)


def test_files_of_different_classes_cannot_share_a_pool(tmp_path):
    w = write_showers(make_toy_showers(5, detector=DET), tmp_path / "w.h5")
    ta = write_showers(make_toy_showers(5, detector=DET.with_material("G4_Ta")), tmp_path / "ta.h5")
    with pytest.raises(CalofmError, match="G4_Ta"):
        ShowerPool.open([w, ta])


def test_globs_expand_sorted_and_empty_globs_are_errors(two_files, tmp_path):
    paths, _ = two_files
    assert expand_paths([str(tmp_path / "W_gamma_train_*.h5")]) == sorted(paths)
    with pytest.raises(CalofmError, match="no file matches"):
        expand_paths([str(tmp_path / "nothing_*.h5")])


def test_subset_of_the_reference_files_matches_a_direct_read(shared_data):
    from calofm.data.formats import read_showers

    paths = sorted(shared_data.glob("W_gamma_train_*.h5"))
    sel = select_showers(paths, n_train=50, val_fraction=0.05, seed=0)
    assert len(sel.train) == 50 and len(sel.val) == 100
    pool = ShowerPool.open(paths)
    train_pool, _ = split_indices(pool.n, 0.05, 0)
    idx, _ = subset_indices(train_pool, 50, 0)
    k = int(idx[-1])
    file, row = (paths[0], k) if k < 1000 else (paths[1], k - 1000)
    direct = read_showers(file, row, row + 1)
    assert np.array_equal(sel.train.shower(49)[1], direct.energies)


def test_nothing_selected_gives_an_empty_set_of_the_pool_class(tmp_path):
    path = write_showers(make_toy_showers(4, detector=DET), tmp_path / "w.h5", "getting_high")
    empty = ShowerPool.open([path]).read(np.zeros(0, np.int64))
    assert len(empty) == 0 and empty.detector == DET and empty.particle == "gamma"
    sel = select_showers([path], n_train=None, val_fraction=0.0, seed=0)
    assert len(sel.train) == 4 and len(sel.val) == 0
