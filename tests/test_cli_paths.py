"""Command-line paths that the other tests do not run: ``generate --adapter``,
``generate --unique-voxels``, ``train --resume`` and ``extend --resume``.

An interruption is Ctrl-C as a user sends it: SIGINT to this process during a training step, which
the commands answer by checkpointing after the step and exiting with 130.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import torch
from test_adapters import PB_GAMMA, base_model, toy_file, trained
from test_model import tiny_model
from test_training_cli import _train_command
from test_training_cli import data as data  # noqa: F401  (a fixture)

from calofm.adapters import load_model_with_adapters, read_manifest, save_adapter
from calofm.cli import main
from calofm.data.formats import file_info, read_all
from calofm.generation.engine import generate
from calofm.model import load_model, save_model
from calofm.training import run as training_run


def interrupt_at(monkeypatch, at_step: int) -> None:
    """Send SIGINT to this process while step ``at_step`` (0-based) trains."""
    schedule = training_run.learning_rate

    def learning_rate(config, step, total, elapsed):
        if step == at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return schedule(config, step, total, elapsed)

    monkeypatch.setattr(training_run, "learning_rate", learning_rate)


def assert_same_showers(a, b) -> None:
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.voxels, b.voxels)
    np.testing.assert_allclose(a.energies, b.energies, rtol=1e-6)  # float32 in the file


def test_generate_with_an_adapter_samples_the_adapted_class(tmp_path):
    base = save_model(base_model(), tmp_path / "base", {})
    model = trained(base_model(), PB_GAMMA)
    adapter = save_adapter(model, PB_GAMMA.name, tmp_path / "pb", {"test": True})
    out = tmp_path / "pb.h5"
    argv = [
        "generate", "--model", str(base), "--adapter", str(adapter), "--material", "G4_Pb",
        "--particle", "gamma", "-n", "5", "--energy-range", "1.5", "4.5", "--seed", "2",
        "--max-hits", "30", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    info = file_info(out)
    assert (info.detector.material, info.particle) == ("G4_Pb", "gamma")
    assert [a["name"] for a in info.metadata["generator"]["adapters"]] == ["G4_Pb:gamma"]
    showers = read_all(out)
    loaded = load_model_with_adapters(base, [adapter])
    want = generate(loaded, "G4_Pb:gamma", showers.incident, seed=2, max_hits=30)[0]
    assert_same_showers(showers, want["G4_Pb:gamma"])
    # The adapter's expert started as Ta's and was changed: its showers are not Ta's.
    ta = generate(loaded, "G4_Ta:gamma", showers.incident, seed=2, max_hits=30)[0]
    assert not np.array_equal(ta["G4_Ta:gamma"].voxels, showers.voxels)


def test_generate_unique_voxels_writes_showers_without_merged_duplicates(tmp_path):
    model = tiny_model(paper_design=True)  # duplicates possible unless --unique-voxels
    with torch.no_grad():  # a few voxels far likelier than the rest: repeats are common
        model.spatial_head.bias[:5] += 8.0
    model_dir = save_model(model, tmp_path / "model", {})

    def run(name: str, *extra: str) -> dict:
        argv = [
            "generate", "--model", str(model_dir), "--material", "G4_W", "--particle", "gamma",
            "-n", "4", "--energy", "50", "--seed", "3", "--max-hits", "40", "--device", "cpu",
            "--out", str(tmp_path / name), *extra,
        ]  # fmt: skip
        assert main(argv) == 0
        return file_info(tmp_path / name).metadata

    free = run("free.h5")
    unique = run("unique.h5", "--unique-voxels")
    assert free["generation_stats"]["n_duplicates"] > 0
    assert unique["generator"]["sampling"]["unique_voxels"] is True
    assert unique["generation_stats"]["n_duplicates"] == 0
    showers = read_all(tmp_path / "unique.h5")
    assert unique["generation_stats"]["n_hits"] == showers.n_hits.sum() > 0


def test_train_resume_continues_an_interrupted_run_to_the_same_model(
    tmp_path,
    data,
    monkeypatch,  # noqa: F811
):
    assert main(_train_command(data, tmp_path / "whole")) == 0
    out = tmp_path / "stopped"
    interrupt_at(monkeypatch, 2)
    assert main(_train_command(data, out)) == 130
    assert json.loads((out / "checkpoints" / "last" / "state.json").read_text())["step"] == 3
    monkeypatch.undo()
    assert main([*_train_command(data, out), "--resume"]) == 0
    assert json.loads((out / "training.json").read_text())["step"] == 10
    whole, resumed = load_model(tmp_path / "whole"), load_model(out)
    for name, tensor in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], tensor), name


def test_extend_resume_continues_an_interrupted_stage_to_the_same_adapter(tmp_path, monkeypatch):
    base = str(save_model(base_model(), tmp_path / "base", {}))
    pb = toy_file(tmp_path, "G4_Pb", "gamma")
    argv = [
        "extend", "--model", base, "--material", "Pb", "--particle", "gamma", "--init-from", "Ta",
        "--data", pb, "--max-steps", "4", "--n-events", "12", "--batch-size", "6",
        "--device", "cpu",
    ]  # fmt: skip
    assert main([*argv, "--out", str(tmp_path / "whole")]) == 0
    interrupt_at(monkeypatch, 0)
    assert main([*argv, "--out", str(tmp_path / "stopped")]) == 130
    assert (tmp_path / "stopped" / "checkpoints").is_dir()
    monkeypatch.undo()
    assert main([*argv, "--out", str(tmp_path / "stopped"), "--resume"]) == 0
    whole, resumed = read_manifest(tmp_path / "whole"), read_manifest(tmp_path / "stopped")
    assert resumed["provenance"]["training"]["step"] == 4
    assert resumed["adapter_sha256"] == whole["adapter_sha256"]
