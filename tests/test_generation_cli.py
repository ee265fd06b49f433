"""``calofm generate``: output file, metadata, reproducibility, resume and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
from test_model import tiny_model

from calofm.cli import main
from calofm.data.formats import file_info, read_all
from calofm.data.writers import ShowerWriter
from calofm.model import model_hash


def command(model_dir, out, *extra: str) -> list[str]:
    return [
        "generate", "--model", str(model_dir), "--material", "G4_Pb", "--particle", "gamma",
        "-n", "7", "--energy-range", "20", "80", "--seed", "3", "--batch-size", "3",
        "--max-hits", "15", "--out", str(out), *extra,
    ]  # fmt: skip


def test_generate_writes_a_showerdata_file_with_its_provenance(model_dir, tmp_path):
    out = tmp_path / "gen.h5"
    assert main(command(model_dir, out, "--dynamic-temperature", "0.95", "1.05")) == 0
    info = file_info(out)
    assert (info.n, info.particle, info.detector.material) == (7, "gamma", "G4_Pb")
    gen = info.metadata["generator"]
    assert gen["model_sha256"] == model_hash(tiny_model())
    assert gen["sampling"]["dynamic_temperature"] == [0.95, 1.05]
    assert gen["seed"] == 3 and gen["class"] == "G4_Pb:gamma" and gen["max_hits"] == 15
    showers = read_all(out)
    stats = info.metadata["generation_stats"]
    assert stats["n_hits"] - stats["n_duplicates"] == showers.n_hits.sum()
    assert np.all((showers.incident >= 20) & (showers.incident <= 80))
    assert np.all(showers.n_hits <= 15)


def test_a_compiled_engine_writes_the_showers_of_the_eager_one(model_dir, tmp_path, monkeypatch):
    """--engine reaches the decoder (the aot_eager backend traces the step in seconds; inductor's
    own code is checked in test_static_decode)."""
    import functools

    import torch

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    assert main(command(model_dir, tmp_path / "a.h5")) == 0
    assert main(command(model_dir, tmp_path / "b.h5", "--engine", "compile")) == 0
    a, b = read_all(tmp_path / "a.h5"), read_all(tmp_path / "b.h5")
    np.testing.assert_array_equal(a.voxels, b.voxels)
    np.testing.assert_array_equal(a.energies, b.energies)


def test_same_command_same_showers_and_an_interrupted_run_resumes(model_dir, tmp_path, monkeypatch):
    one = ("--batch-size", "1")  # chunks of 4 showers (CHUNK_BATCHES batches): two appends
    assert main(command(model_dir, tmp_path / "a.h5", *one)) == 0
    calls = []
    append = ShowerWriter.append

    def interrupted(self, showers, **metadata):
        calls.append(len(showers))
        if len(calls) == 2:
            raise KeyboardInterrupt
        append(self, showers, **metadata)

    monkeypatch.setattr(ShowerWriter, "append", interrupted)
    assert main(command(model_dir, tmp_path / "b.h5", *one)) == 130
    assert (tmp_path / "b.h5.partial").exists() and not (tmp_path / "b.h5").exists()
    monkeypatch.setattr(ShowerWriter, "append", append)
    assert main(command(model_dir, tmp_path / "b.h5", *one)) == 0
    a, b = read_all(tmp_path / "a.h5"), read_all(tmp_path / "b.h5")
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.voxels, b.voxels)
    np.testing.assert_array_equal(a.energies, b.energies)
    assert (
        file_info(tmp_path / "a.h5").metadata["generation_stats"]
        == (file_info(tmp_path / "b.h5").metadata["generation_stats"])
    )


def test_material_without_the_g4_prefix_gives_the_same_showers(model_dir, tmp_path):
    """--material Pb names the class G4_Pb:gamma, as in simulate, train, extend and study."""
    assert main(command(model_dir, tmp_path / "long.h5")) == 0
    short = command(model_dir, tmp_path / "short.h5")
    short[short.index("G4_Pb")] = "Pb"
    assert main(short) == 0
    a, b = read_all(tmp_path / "long.h5"), read_all(tmp_path / "short.h5")
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.voxels, b.voxels)
    np.testing.assert_array_equal(a.energies, b.energies)
    info = file_info(tmp_path / "short.h5")
    assert info.detector.material == "G4_Pb"
    assert info.metadata["generator"]["class"] == "G4_Pb:gamma"


def test_unknown_class_lists_the_model_classes(model_dir, tmp_path, capsys):
    cmd = command(model_dir, tmp_path / "x.h5")
    cmd[cmd.index("G4_Pb")] = "G4_Ta"
    assert main(cmd) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "G4_W:gamma, G4_Pb:gamma, G4_W:e-" in err


def test_missing_model_and_existing_output_are_one_line_errors(model_dir, tmp_path, capsys):
    assert main(command(tmp_path / "nothing", tmp_path / "x.h5")) == 2
    assert "no such model directory" in capsys.readouterr().err
    (tmp_path / "x.h5").write_bytes(b"")
    assert main(command(model_dir, tmp_path / "x.h5")) == 2
    assert "exists" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra", [["--top-p", "1.5"], ["--top-k", "0"], ["--temperature", "-1"], ["--seed", "-2"]]
)
def test_bad_sampling_options_are_rejected_by_the_parser(model_dir, tmp_path, extra, capsys):
    assert main(command(model_dir, tmp_path / "x.h5", *extra)) == 2
    assert f"argument {extra[0]}" in capsys.readouterr().err
    assert not (tmp_path / "x.h5").exists()


def test_batch_size_auto_fits_free_memory_and_gives_the_same_showers(model_dir, tmp_path, capsys):
    assert main(command(model_dir, tmp_path / "a.h5")) == 0
    assert main(command(model_dir, tmp_path / "b.h5", "--batch-size", "auto")) == 0
    assert "MiB per shower" in capsys.readouterr().out
    a, b = read_all(tmp_path / "a.h5"), read_all(tmp_path / "b.h5")
    np.testing.assert_array_equal(a.voxels, b.voxels)
    assert main(command(model_dir, tmp_path / "c.h5", "--batch-size", "many")) == 2
