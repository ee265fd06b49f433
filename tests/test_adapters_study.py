"""``calofm study finetune`` end to end: runs, evaluation, spread over repeats, forgetting."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_adapters import base_model, toy_file

from calofm.cli import main
from calofm.data.formats import read_showers
from calofm.evaluation.metrics import Histogram
from calofm.model import save_model
from calofm.study.figures import repeat_band


@pytest.mark.slow
def test_finetune_study_compares_methods_and_shows_full_fine_tuning_forgets(tmp_path, capsys):
    torch.set_num_threads(1)
    base = str(save_model(base_model(), tmp_path / "base", {}))
    train = toy_file(tmp_path, "G4_Pb", "gamma", n=30, seed=1)
    (tmp_path / "test").mkdir()
    test = toy_file(tmp_path / "test", "G4_Pb", "gamma", n=12, seed=2)
    w_test = toy_file(tmp_path / "test", "G4_W", "gamma", n=12, seed=3)
    out = tmp_path / "study"
    argv = [
        "study", "finetune", "--model", base, "--material", "Pb", "--particle", "gamma",
        "--init-from", "Ta", "--data", train, "--test", test, "--sizes", "6",
        "--repeats", "2", "--methods", "expert", "full", "--forgetting", f"G4_W:gamma={w_test}",
        "--n-forgetting", "10",
        "--max-steps", "2", "--batch-size", "3", "--lr", "0.05", "--device", "cpu",
        "--max-hits", "40", "--splits", "1",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    assert "expert n=6" in capsys.readouterr().out
    summary = json.loads((out / "study.json").read_text())
    assert set(summary["groups"]) == {"expert n=6", "full n=6"}
    assert summary["groups"]["expert n=6"]["n_hits"]["repeats"] == 2
    identical = summary["base_showers_identical"]
    assert identical["G4_W:gamma / expert n=6 r=0"] and identical["G4_W:gamma / expert n=6 r=1"]
    assert not identical["G4_W:gamma / full n=6 r=0"]  # full fine-tuning changed the base class
    assert (out / "study.png").stat().st_size > 0
    assert summary["figures"]["energy_sum"] == "figures/energy_sum.png"
    assert all((out / f).stat().st_size > 0 for f in summary["figures"].values())
    assert len(read_showers(out / "runs" / "expert_n6_r0" / "forgetting_G4_W_gamma.h5")) == 10
    assert len(read_showers(out / "runs" / "expert_n6_r0" / "showers.h5")) == 12
    assert (out / "runs" / "expert_n6_r1" / "adapter.json").is_file()
    assert (out / "runs" / "full_n6_r0" / "manifest.json").is_file()
    done = [out / "runs" / "full_n6_r0" / "showers.h5", out / "eval" / "metrics.json"]
    mtimes = [p.stat().st_mtime for p in done]
    assert main(argv) == 0  # complete runs and evaluations are reused, not redone
    assert [p.stat().st_mtime for p in done] == mtimes


def test_repeat_band_is_the_mean_with_spread_and_statistical_error_in_quadrature():
    a = Histogram(np.array([1.0, 4.0]), np.array([0.3, 0.0]))
    b = Histogram(np.array([3.0, 4.0]), np.array([0.4, 0.0]))
    band = repeat_band([a, b])
    np.testing.assert_allclose(band.values, [2.0, 4.0])
    spread = np.std([1.0, 3.0], ddof=1)
    np.testing.assert_allclose(band.errors, [np.sqrt(spread**2 + (0.09 + 0.16) / 2), 0.0])


def test_repeats_of_a_study_train_with_different_seeds_on_disjoint_subsets(tmp_path):
    from calofm.study.config import StudyConfig
    from calofm.study.runs import train_run
    from calofm.training.config import TrainConfig

    torch.set_num_threads(1)
    base = str(save_model(base_model(), tmp_path / "base", {}))
    train = toy_file(tmp_path, "G4_Pb", "gamma", n=30, seed=1)
    config = StudyConfig(
        "G4_Pb:gamma", (train,), train, (6,), repeats=2, methods=("expert",), seed=3
    )
    train_config = TrainConfig(max_steps=1, batch_size=3, seed=3)
    manifests = []
    for r in range(2):
        train_run(base, config, train_config, "expert", 6, r, tmp_path / f"r{r}", "cpu")
        manifests.append(json.loads((tmp_path / f"r{r}" / "adapter.json").read_text()))
    seeds = [m["provenance"]["train"]["seed"] for m in manifests]
    assert seeds == [3, 4]  # initialisation, shuffling
    data = [m["provenance"]["data"] for m in manifests]
    assert [d["seed"] for d in data] == [3, 3]  # one permutation of the pool ...
    assert [d["repeat"] for d in data] == [0, 1]  # ... cut into disjoint subsets
    assert not any(d["bootstrapped"] for d in data)


def test_study_refuses_sizes_beyond_the_training_pool_before_any_run(tmp_path, capsys):
    base = str(save_model(base_model(), tmp_path / "base", {}))
    train = toy_file(tmp_path, "G4_Pb", "gamma", n=30, seed=1)
    argv = [
        "study", "finetune", "--model", base, "--material", "Pb", "--particle", "gamma",
        "--data", train, "--test", train, "--sizes", "10", "30", "--val-fraction", "0.1",
        "--max-steps", "1", "--out", str(tmp_path / "study"),
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "asked for 30 training showers" in err and "3 of them are held out" in err
    assert not (tmp_path / "study").exists()


@pytest.mark.slow
def test_repeats_beyond_the_disjoint_subsets_are_bootstrapped_labelled_and_seeded(tmp_path):
    """30 showers, 2 held out: 28 hold two disjoint subsets of 10, so the third repeat of each
    method is a bootstrap resample, and the summary and the figures' labels say so."""
    torch.set_num_threads(1)
    base = str(save_model(base_model(), tmp_path / "base", {}))
    train = toy_file(tmp_path, "G4_Pb", "gamma", n=30, seed=1)
    (tmp_path / "test").mkdir()
    test = toy_file(tmp_path / "test", "G4_Pb", "gamma", n=10, seed=2)
    out = tmp_path / "study"
    argv = [
        "study", "finetune", "--model", base, "--material", "Pb", "--particle", "gamma",
        "--init-from", "Ta", "--data", train, "--test", test, "--sizes", "10",
        "--repeats", "3", "--methods", "expert+condition", "full",
        "--max-steps", "1", "--batch-size", "5", "--device", "cpu", "--seed", "3",
        "--max-hits", "20", "--splits", "1", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    summary = json.loads((out / "study.json").read_text())
    for method in ("expert+condition", "full"):
        assert [summary["bootstrapped"][f"{method} n=10 r={r}"] for r in range(3)] == [
            False,
            False,
            True,
        ]
        assert summary["labels"][f"{method} n=10"] == (
            f"{method} n=10, mean of 3 (1 bootstrap resample)"
        )
    runs = out / "runs"
    adapters = [json.loads((runs / f"expert_condition_n10_r{r}" / "adapter.json").read_text())
                for r in range(3)]  # fmt: skip
    assert all(a["config"]["condition"] for a in adapters)
    assert [a["provenance"]["train"]["seed"] for a in adapters] == [3, 4, 5]
    assert [a["provenance"]["data"]["repeat"] for a in adapters] == [0, 1, 2]
    full = [json.loads((runs / f"full_n10_r{r}" / "manifest.json").read_text()) for r in range(3)]
    trained = [
        json.loads((runs / f"full_n10_r{r}" / "training.json").read_text()) for r in range(3)
    ]
    assert [t["train_config"]["seed"] for t in trained] == [3, 4, 5]
    data = [m["provenance"]["data"] for m in full]
    assert [d["seed"] for d in data] == [3, 3, 3] and [d["repeat"] for d in data] == [0, 1, 2]
    assert [d["bootstrapped"] for d in data] == [False, False, True]
    hashes = {m["weights_sha256"] for m in full}
    assert len(hashes) == 3  # three different runs
