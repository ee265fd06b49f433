"""``calofm study finetune`` end to end: runs, evaluation, spread over repeats, forgetting."""

from __future__ import annotations

import json

import pytest
import torch
from test_adapters import base_model, toy_file

from calofm.cli import main
from calofm.model import save_model


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
        "--init-from", "Ta", "--data", train, "--test", test, "--n-events", "6",
        "--repeats", "2", "--methods", "expert", "full", "--forgetting", f"G4_W:gamma={w_test}",
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
    assert (out / "runs" / "expert_n6_r1" / "adapter.json").is_file()
    assert (out / "runs" / "full_n6_r0" / "manifest.json").is_file()
    done = [out / "runs" / "full_n6_r0" / "showers.h5", out / "eval" / "metrics.json"]
    mtimes = [p.stat().st_mtime for p in done]
    assert main(argv) == 0  # complete runs and evaluations are reused, not redone
    assert [p.stat().st_mtime for p in done] == mtimes
