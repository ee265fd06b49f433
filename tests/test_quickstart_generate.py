"""The quickstart's mixed-class generation: every batch mixes the classes, and a rerun resumes."""

from __future__ import annotations

import numpy as np
from test_model import CLASSES, tiny_model

from calofm.cli import _quickstart_generate as qg
from calofm.model import save_model


def _run(model_dir, out, workers=1):
    """12 rows of 3 classes in tasks of 5 rows, each class in 2 slots."""
    return qg.generate_mixed(
        str(model_dir), [], CLASSES, 4, (20.0, 80.0), 3, 12, 5, 2, workers, out
    )


def test_rows_interleave_the_classes_so_each_task_holds_them_all():
    rows = qg.row_classes(["a", "b", "c"], 3)
    assert rows == ["a", "b", "c"] * 3
    assert all(len(set(rows[i : i + 3])) == 3 for i in range(0, 9, 3))


def test_a_generation_resumes_at_a_missing_batch_with_the_showers_of_any_worker_count(tmp_path):
    save_model(tiny_model(), tmp_path / "model", {"test": True})
    whole, stats = _run(tmp_path / "model", tmp_path / "a", workers=2)
    batches = sorted((tmp_path / "a").iterdir())
    assert len(batches) == -(-4 * len(CLASSES) // 5)
    assert all(sum(len(p["incident"]) for p in whole[c]) == 4 for c in CLASSES)

    kept = {p.name: p.stat().st_mtime_ns for p in batches}
    batches[1].unlink()  # as if killed while decoding the second batch
    resumed, again = _run(tmp_path / "model", tmp_path / "a", workers=1)  # in this process
    assert {p.name: p.stat().st_mtime_ns for p in batches if p != batches[1]} == {
        k: v for k, v in kept.items() if k != batches[1].name
    }
    assert {k: again[k] for k in ("n_hits", "n_truncated")} == {
        k: stats[k] for k in ("n_hits", "n_truncated")
    }
    for c in CLASSES:
        for a, b in zip(whole[c], resumed[c], strict=True):
            for key in ("offsets", "voxels", "energies", "incident"):
                np.testing.assert_array_equal(a[key], b[key])
