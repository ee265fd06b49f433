"""Bad input across every sub-command: one error line, exit 2, and the file system left as it was.

One row per case: the command (``{d}`` is a folder of shared, read-only inputs made here with h5py,
``{t}`` the case's own folder), the exit code, a fragment of the message, the files that must not
exist afterwards (in ``{t}`` unless named with ``{d}``), and what the case's folder holds
beforehand. Every case also checks that no file
in either folder was created, changed or removed. The CLI runs in-process (fast); signals are tested
in test_kill_anywhere.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import make_toy_showers
from test_model import tiny_model

from calofm.cli import main
from calofm.data.formats import write_showers
from calofm.data.writers import ShowerWriter
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.model import save_model

TQDM_LINE = re.compile(r"\d+%\||\d+/\d+ \[|\r")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Good and malformed inputs of every kind calofm reads, shared by the cases (never changed)."""
    d = tmp_path_factory.mktemp("inputs")
    det = DetectorConfig()
    showers = make_toy_showers(12, seed=1)
    write_showers(showers, d / "w.h5")
    write_showers(make_toy_showers(12, seed=2, detector=det.with_material("G4_Pb")), d / "pb.h5")
    write_showers(showers.select(slice(0, 1)), d / "one.h5")
    write_showers(showers, d / "w_gh.h5", fmt="getting_high")
    small = DetectorConfig(absorber_mm=(2.1,) * 6, nx=6, ny=6)
    write_showers(make_toy_showers(12, seed=3, detector=small), d / "small_grid.h5")
    (d / "empty.h5").write_bytes(b"")
    (d / "notes.h5").write_text("these are notes, not showers\n")
    (d / "a_directory.h5").mkdir()
    with h5py.File(d / "no_groups.h5", "w") as f:
        f.attrs["comment"] = "an HDF5 file with nothing in it"
    dense = np.zeros((3, *det.shape), np.float32)
    dense[:, 5, 15, 15] = 10.0
    with h5py.File(d / "gh_no_energy.h5", "w") as f:
        f.create_group("30x30").create_dataset("layers", data=dense)
    with h5py.File(d / "gh_3d_layers.h5", "w") as f:
        g = f.create_group("30x30")
        g.create_dataset("layers", data=dense[:, 0])
        g.create_dataset("energy", data=np.full((3, 1), 50.0, np.float32))
    with h5py.File(d / "gh_count_mismatch.h5", "w") as f:
        g = f.create_group("30x30")
        g.create_dataset("layers", data=dense)
        g.create_dataset("energy", data=np.full((2, 1), 50.0, np.float32))
    with h5py.File(d / "gh_wrong_grid.h5", "w") as f:
        g = f.create_group("10x10")
        g.create_dataset("layers", data=np.ones((3, 10, 10, 10), np.float32))
        g.create_dataset("energy", data=np.full((3, 1), 50.0, np.float32))
    with h5py.File(d / "gh_negative_cells.h5", "w") as f:
        g = f.create_group("30x30")
        g.create_dataset("layers", data=-dense)
        g.create_dataset("energy", data=np.full((3, 1), 50.0, np.float32))
    _damaged_copy(d / "w.h5", d / "nan_incident.h5", "energies", np.nan)
    _damaged_copy(d / "w.h5", d / "negative_incident.h5", "energies", -5.0)
    _damaged_copy(d / "w.h5", d / "negative_points.h5", "points", -1.0)
    _damaged_copy(d / "w.h5", d / "bad_metadata.h5", "calofm", "{not json")
    with h5py.File(d / "no_showers.h5", "w") as f:
        f.create_dataset("showers", shape=(0,), dtype=h5py.vlen_dtype(np.float32))
        f.create_dataset("energies", shape=(0, 1), dtype=np.float32)
        f.create_dataset("num_points", shape=(0,), dtype=np.int32)
    (d / "detector.json").write_text("{ not a detector")
    _damaged_copy(d / "w.h5", d / "metadata_not_an_object.h5", "calofm", "[1, 2]")
    _damaged_copy(d / "w.h5", d / "detector_not_an_object.h5", "calofm", '{"detector": [1, 2]}')
    _damaged_copy(d / "w.h5", d / "num_points_beyond_points.h5", "num_points", 1000)
    _damaged_copy(d / "w.h5", d / "energies_of_other_showers.h5", "energies_count", None)
    _damaged_copy(d / "w.h5", d / "no_directions.h5", "drop", "directions")
    with h5py.File(d / "gh_text_energy.h5", "w") as f:
        g = f.create_group("30x30")
        g.create_dataset("layers", data=dense)
        g.create_dataset("energy", data=np.array([[b"50"]] * 3))
    (d / "damaged_gh.h5").write_bytes((d / "w_gh.h5").read_bytes())
    with h5py.File(d / "damaged_gh.h5", "r") as f:  # a compressed chunk of showers, header intact
        chunk = f["30x30"]["layers"].id.get_chunk_info(0)
    with open(d / "damaged_gh.h5", "r+b") as f:
        f.seek(chunk.byte_offset)
        f.write(b"\xff" * chunk.size)
    adapter = {"format": "calofm-adapter", "format_version": 1}
    adapter |= {"config": {"class_name": "G4_Pb:gamma"}, "adapter_sha256": "0" * 64}
    for name, edit in [
        ("adapter_hash_not_a_string", {"base_weights_sha256": 5, "stacked_on": []}),
        ("adapter_bad_stacked_on", {"base_weights_sha256": "0" * 64, "stacked_on": ["x"]}),
    ]:
        (d / name).mkdir()
        (d / name / "adapter.json").write_text(json.dumps(adapter | edit))

    torch.manual_seed(0)
    save_model(tiny_model(), d / "model", {"test": True})
    save_model(tiny_model(), d / "truncated_model", {"test": True})
    weights = d / "truncated_model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    save_model(tiny_model(), d / "bad_manifest_model", {"test": True})
    (d / "bad_manifest_model" / "manifest.json").write_text("{ truncated")
    return d


def _damaged_copy(source: Path, target: Path, what: str, value: object) -> None:
    """A copy of a good showerdata file with one thing broken."""
    target.write_bytes(source.read_bytes())
    with h5py.File(target, "a") as f:
        if what == "energies":
            energies = f["energies"][:]
            energies[3] = value
            f["energies"][:] = energies
        elif what == "points":
            row = f["showers"][2].copy()
            row[3::4] = value  # every point's energy (x, y, z, E)
            f["showers"][2] = row
        elif what == "num_points":
            counts = f["num_points"][:]
            counts[1] += value
            f["num_points"][:] = counts
        elif what == "energies_count":
            energies = f["energies"][:]
            del f["energies"]
            f.create_dataset("energies", data=np.concatenate([energies, energies[:2]]))
        elif what == "drop":
            del f[value]
        else:
            f.attrs[what] = value


def _existing(name: str, text: str = "a complete output\n") -> Callable[[Path, Path], None]:
    def make(t: Path, d: Path) -> None:
        path = t / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    return make


def _foreign_partial(name: str) -> Callable[[Path, Path], None]:
    """A partial output left by an interrupted run with other arguments."""

    def make(t: Path, d: Path) -> None:
        writer = ShowerWriter(t / name, 10, {"material": "G4_W"}, signature="another run")
        writer.append(make_toy_showers(3, seed=9))

    return make


def _model_copy(name: str) -> Callable[[Path, Path], None]:
    def make(t: Path, d: Path) -> None:
        torch.manual_seed(0)
        save_model(tiny_model(), t / name, {"test": True})

    return make


def _study_dir(t: Path, d: Path) -> None:
    (t / "study" / "runs").mkdir(parents=True)
    (t / "study" / "study_config.json").write_text(json.dumps({"study": "other settings"}))


def _quickstart_dir(t: Path, d: Path) -> None:
    """A quickstart folder of an earlier run with other settings (its record says so)."""
    (t / "qs" / "geant4").mkdir(parents=True)
    (t / "qs" / "geant4" / "Pb_gamma_train.h5").write_bytes((d / "pb.h5").read_bytes())
    record = {"geant4_Pb_gamma_train": {"fingerprint": "0123456789abcdef", "seconds": 1.0}}
    (t / "qs" / "quickstart_steps.json").write_text(json.dumps(record))


@dataclass
class Case:
    id: str
    argv: str
    code: int
    message: str
    absent: tuple[str, ...] = ()
    setup: Callable[[Path, Path], None] | None = None
    extra: dict = field(default_factory=dict)


SIM = "simulate --material G4_W -n 2 --energy 1 --chunk-size 1"
GEN = "generate --model {d}/model --material G4_W --particle gamma -n 3 --energy 50 --max-hits 5"
EVAL = "evaluate {d}/w.h5 {d}/w.h5"
STAGE = "--model {d}/model --data {d}/pb.h5 --max-steps 1 --out {t}/adapter"
STUDY = "study finetune --model {d}/model --material G4_Pb --particle gamma --data {d}/pb.h5"
QS = "quickstart --scale test --workers 1"

CASES = [
    # simulate
    Case("simulate-out-under-a-file", SIM + " --out {t}/notes.txt/x.h5", 2, "is a file, not a directory", ("notes.txt/x.h5",), _existing("notes.txt")),
    Case("simulate-out-is-a-directory", SIM + " --out {t}/dir", 2, "is a directory", ("dir.partial",), lambda t, d: (t / "dir").mkdir()),
    Case("simulate-complete-output-exists", SIM + " --out {t}/w.h5", 2, "add --overwrite", ("w.h5.partial",), _existing("w.h5")),
    Case("simulate-partial-of-other-arguments", SIM + " --out {t}/w.h5", 2, "other arguments", ("w.h5",), _foreign_partial("w.h5")),
    Case("simulate-unknown-material", "simulate --material G4_Unobtainium -n 2 --energy 1 --out {t}/x.h5", 2, "unknown material", ("x.h5", "x.h5.partial")),
    Case("simulate-malformed-detector-config", SIM + " --detector {d}/detector.json --out {t}/x.h5", 2, "not a detector config", ("x.h5", "x.h5.partial")),
    Case("simulate-detector-config-is-a-directory", SIM + " --detector {d}/a_directory.h5 --out {t}/x.h5", 2, "cannot read", ("x.h5",)),
    Case("simulate-reversed-energy-range", "simulate -n 2 --energy-range 50 10 --out {t}/x.h5", 2, "LO must not exceed HI", ("x.h5",)),
    Case("simulate-negative-seed", SIM + " --seed -1 --out {t}/x.h5", 2, "must be 0 or more", ("x.h5",)),
    Case("simulate-seed-beyond-32-bits", SIM + " --seed 4294967296 --out {t}/x.h5", 2, "must be at most 4294967295", ("x.h5",)),
    Case("simulate-more-showers-than-a-file-holds", "simulate --material G4_W -n 100000000000000000000 --energy 1 --out {t}/x.h5", 2, "showers fit one showerdata file", ("x.h5", "x.h5.partial")),
    Case("simulate-energy-and-range-together", "simulate -n 2 --energy 5 --energy-range 1 2 --out {t}/x.h5", 2, "not allowed with", ("x.h5",)),
    # convert
    Case("convert-missing-input", "convert {d}/nothing.h5 --to getting_high --out {t}/x.h5", 2, "no such file", ("x.h5", "x.h5.partial")),
    Case("convert-input-is-a-directory", "convert {d}/a_directory.h5 --to getting_high --out {t}/x.h5", 2, "is a directory", ("x.h5",)),
    Case("convert-empty-file", "convert {d}/empty.h5 --to getting_high --out {t}/x.h5", 2, "not a readable HDF5 file", ("x.h5",)),
    Case("convert-text-file", "convert {d}/notes.h5 --to getting_high --out {t}/x.h5", 2, "not a readable HDF5 file", ("x.h5",)),
    Case("convert-hdf5-without-shower-groups", "convert {d}/no_groups.h5 --to getting_high --out {t}/x.h5", 2, "unknown layout", ("x.h5",)),
    Case("convert-getting-high-without-energy", "convert {d}/gh_no_energy.h5 --to showerdata --out {t}/x.h5", 2, "needs datasets 'layers' and 'energy'", ("x.h5",)),
    Case("convert-getting-high-3d-layers", "convert {d}/gh_3d_layers.h5 --to showerdata --out {t}/x.h5", 2, "must be (N, layer, x, y)", ("x.h5",)),
    Case("convert-getting-high-count-mismatch", "convert {d}/gh_count_mismatch.h5 --to showerdata --out {t}/x.h5", 2, "one energy per shower", ("x.h5",)),
    Case("convert-getting-high-other-grid", "convert {d}/gh_wrong_grid.h5 --to showerdata --out {t}/x.h5", 2, "does not match the detector", ("x.h5",)),
    Case("convert-getting-high-negative-cells", "convert {d}/gh_negative_cells.h5 --to showerdata --out {t}/x.h5", 2, "negative", ("x.h5", "x.h5.partial")),
    Case("convert-nan-incident-energy", "convert {d}/nan_incident.h5 --to getting_high --out {t}/x.h5", 2, "NaN", ("x.h5", "x.h5.partial")),
    Case("convert-negative-incident-energy", "convert {d}/negative_incident.h5 --to getting_high --out {t}/x.h5", 2, "negative values", ("x.h5", "x.h5.partial")),
    Case("convert-negative-point-energies", "convert {d}/negative_points.h5 --to getting_high --out {t}/x.h5", 2, "point energies contain negative", ("x.h5", "x.h5.partial")),
    Case("convert-malformed-calofm-metadata", "convert {d}/bad_metadata.h5 --to getting_high --out {t}/x.h5", 2, "malformed calofm metadata", ("x.h5",)),
    Case("convert-file-without-showers", "convert {d}/no_showers.h5 --to getting_high --out {t}/x.h5", 2, "holds no showers", ("x.h5", "x.h5.partial")),
    Case("convert-metadata-not-a-json-object", "convert {d}/metadata_not_an_object.h5 --to getting_high --out {t}/x.h5", 2, "not a JSON object", ("x.h5", "x.h5.partial")),
    Case("convert-detector-config-not-an-object", "convert {d}/detector_not_an_object.h5 --to getting_high --out {t}/x.h5", 2, "malformed detector config", ("x.h5", "x.h5.partial")),
    Case("convert-point-counts-beyond-the-points", "convert {d}/num_points_beyond_points.h5 --to getting_high --out {t}/x.h5", 2, "shower 1 has", ("x.h5", "x.h5.partial")),
    Case("convert-more-energies-than-showers", "convert {d}/energies_of_other_showers.h5 --to getting_high --out {t}/x.h5", 2, "one of each per shower", ("x.h5", "x.h5.partial")),
    Case("convert-getting-high-energies-as-text", "convert {d}/gh_text_energy.h5 --to showerdata --out {t}/x.h5", 2, "must hold numbers", ("x.h5", "x.h5.partial")),
    Case("convert-damaged-compressed-showers", "convert {d}/damaged_gh.h5 --to showerdata --out {t}/x.h5", 2, "damaged HDF5 file", ("x.h5", "x.h5.partial")),
    Case("convert-complete-output-exists", "convert {d}/w.h5 --to getting_high --out {t}/x.h5", 2, "add --overwrite", ("x.h5.partial",), _existing("x.h5")),
    Case("convert-output-is-the-input", "convert {d}/w.h5 --to showerdata --overwrite --out {d}/w.h5", 2, "is the input file", ("{d}/w.h5.partial",)),
    Case("convert-partial-of-other-arguments", "convert {d}/w.h5 --to showerdata --out {t}/x.h5", 2, "other arguments", ("x.h5",), _foreign_partial("x.h5")),
    Case("convert-unknown-layout-name", "convert {d}/w.h5 --to dense --out {t}/x.h5", 2, "invalid choice", ("x.h5",)),
    # generate
    Case("generate-missing-model", GEN.replace("{d}/model", "{d}/nothing") + " --out {t}/x.h5", 2, "no such model directory", ("x.h5", "x.h5.partial")),
    Case("generate-truncated-weights", GEN.replace("{d}/model", "{d}/truncated_model") + " --out {t}/x.h5", 2, "unreadable weights", ("x.h5", "x.h5.partial")),
    Case("generate-malformed-manifest", GEN.replace("{d}/model", "{d}/bad_manifest_model") + " --out {t}/x.h5", 2, "malformed JSON", ("x.h5", "x.h5.partial")),
    Case("generate-class-the-model-lacks", GEN.replace("G4_W", "G4_Ta") + " --out {t}/x.h5", 2, "G4_W:gamma", ("x.h5", "x.h5.partial")),
    Case("generate-graphs-on-a-cpu", GEN + " --engine graphs --device cpu --out {t}/x.h5", 2, "needs a CUDA device", ("x.h5", "x.h5.partial")),
    Case("generate-unknown-particle", GEN.replace("gamma", "photon") + " --out {t}/x.h5", 2, "unknown particle", ("x.h5", "x.h5.partial")),
    Case("generate-complete-output-exists", GEN + " --out {t}/x.h5", 2, "add --overwrite", ("x.h5.partial",), _existing("x.h5")),
    Case("generate-partial-of-other-arguments", GEN + " --out {t}/x.h5", 2, "other arguments", ("x.h5",), _foreign_partial("x.h5")),
    Case("generate-out-under-a-file", GEN + " --out {t}/notes.txt/x.h5", 2, "is a file, not a directory", (), _existing("notes.txt")),
    Case("generate-more-showers-than-a-file-holds", GEN.replace("-n 3", "-n 100000000000000000000") + " --out {t}/x.h5", 2, "showers fit one showerdata file", ("x.h5", "x.h5.partial")),
    Case("generate-seed-beyond-32-bits", GEN + " --seed 4294967296 --out {t}/x.h5", 2, "must be at most 4294967295", ("x.h5", "x.h5.partial")),
    Case("generate-adapter-manifest-with-malformed-stacked-on", GEN + " --adapter {d}/adapter_bad_stacked_on --out {t}/x.h5", 2, "stacked_on must list", ("x.h5", "x.h5.partial")),
    Case("generate-top-p-above-one", GEN + " --top-p 1.5 --out {t}/x.h5", 2, "argument --top-p", ("x.h5",)),
    Case("generate-temperature-and-dynamic-temperature", GEN + " --temperature 1 --dynamic-temperature 0.9 1.1 --out {t}/x.h5", 2, "not allowed with", ("x.h5",)),
    # evaluate
    Case("evaluate-too-few-showers", "evaluate {d}/one.h5 {d}/one.h5 --out {t}/report", 2, "need at least", ("report",)),
    Case("evaluate-missing-candidate", EVAL + " {d}/nothing.h5 --out {t}/report", 2, "no such file", ("report",)),
    Case("evaluate-candidate-on-another-grid", "evaluate {d}/w.h5 {d}/small_grid.h5 --out {t}/report", 2, "differs from the reference", ("report",)),
    Case("evaluate-names-do-not-match-candidates", EVAL + " --names a b --out {t}/report", 2, "2 names for 1 candidates", ("report",)),
    Case("evaluate-out-is-a-file", EVAL + " --out {t}/report", 2, "is a file", ("report/metrics.json",), _existing("report")),
    Case("evaluate-complete-report-exists", EVAL + " --out {t}/report", 2, "add --overwrite", ("report/metrics.json",), _existing("report/report.html")),
    Case("evaluate-negative-seed", EVAL + " --seed -1 --out {t}/report", 2, "must be 0 or more", ("report",)),
    Case("evaluate-seed-beyond-32-bits", EVAL + " --seed 4294967296 --out {t}/report", 2, "must be at most 4294967295", ("report",)),
    Case("evaluate-bad-energy-slice", EVAL + " --slices 20-10 --out {t}/report", 2, "need 0 <= LO < HI", ("report",)),
    Case("evaluate-description-of-an-unknown-sample", EVAL + " --describe gen=generated --out {t}/report", 2, "no candidate of that name", ("report",)),
    # show
    Case("show-missing-file", "show {d}/nothing.h5 --out {t}/s.png", 2, "no such file", ("s.png",)),
    Case("show-file-is-not-hdf5", "show {d}/notes.h5 --out {t}/s.png", 2, "not a readable HDF5", ("s.png",)),
    Case("show-file-without-showers", "show {d}/no_showers.h5 --out {t}/s.png", 2, "holds no showers", ("s.png",)),
    Case("show-index-out-of-range", "show {d}/w.h5 --index 12 --out {t}/s.png", 2, "out of range (0-11)", ("s.png",)),
    Case("show-negative-index", "show {d}/w.h5 --index -1 --out {t}/s.png", 2, "argument --index", ("s.png",)),
    Case("show-index-and-energy-together", "show {d}/w.h5 --index 1 --energy 50 --out {t}/s.png", 2, "not allowed with", ("s.png",)),
    Case("show-compare-with-a-missing-file", "show {d}/w.h5 --compare {d}/nothing.h5 --out {t}/s.png", 2, "no such file", ("s.png",)),
    Case("show-unknown-image-format", "show {d}/w.h5 --out {t}/s.jpg", 2, ".png, .pdf or .svg", ("s.jpg",)),
    Case("show-complete-output-exists", "show {d}/w.h5 --out {t}/s.png", 2, "add --overwrite", (), _existing("s.png")),
    # train
    Case("train-without-a-budget", "train --data G4_W:gamma={d}/w.h5 --preset tiny --out {t}/m", 2, "needs a budget", ("m",)),
    Case("train-existing-model-directory", "train --data G4_W:gamma={d}/w.h5 --preset tiny --max-steps 1 --out {t}/m", 2, "already holds a model", ("m/train_log.jsonl",), _model_copy("m")),
    Case("train-overwrite-with-bad-data-keeps-the-old-model", "train --data G4_W:gamma={d}/nan_incident.h5 --preset tiny --max-steps 1 --overwrite --out {t}/m", 2, "NaN", ("m/train_log.jsonl",), _model_copy("m")),
    Case("train-unknown-model-option", "train --data G4_W:gamma={d}/w.h5 --preset tiny --max-steps 1 --set colour=red --out {t}/m", 2, "cannot set 'colour=red'", ("m",)),
    Case("train-model-option-of-the-wrong-type", "train --data G4_W:gamma={d}/w.h5 --preset tiny --max-steps 1 --set falling_energy=maybe --out {t}/m", 2, "takes a bool", ("m",)),
    Case("train-resume-and-overwrite-together", "train --data G4_W:gamma={d}/w.h5 --preset tiny --max-steps 1 --resume --overwrite --out {t}/m", 2, "give one of them", ("m",)),
    Case("train-data-of-another-material", "train --data G4_W:gamma={d}/pb.h5 --preset tiny --max-steps 1 --out {t}/m", 2, "G4_Pb", ("m",)),
    Case("train-out-under-a-file", "train --data G4_W:gamma={d}/w.h5 --preset tiny --max-steps 1 --out {t}/notes.txt/m", 2, "is a file, not a directory", (), _existing("notes.txt")),
    Case("train-seed-beyond-32-bits", "train --data G4_W:gamma={d}/w.h5 --preset tiny --max-steps 1 --seed 4294967296 --out {t}/m", 2, "must be at most 4294967295", ("m",)),
    Case("train-infinite-learning-rate", "train --data G4_W:gamma={d}/w.h5 --preset tiny --max-steps 1 --lr inf --out {t}/m", 2, "positive and finite", ("m",)),
    Case("train-reversed-incident-range", "train --data G4_W:gamma={d}/w.h5 --preset tiny --max-steps 1 --incident-range 100 10 --out {t}/m", 2, "LO must be below HI", ("m",)),
    # extend, adapt-particle
    Case("extend-missing-data", "extend --material G4_Pb --particle gamma " + STAGE.replace("pb.h5", "nothing.h5"), 2, "no such file", ("adapter",)),
    Case("extend-existing-adapter", "extend --material G4_Pb --particle gamma " + STAGE, 2, "already holds an adapter", ("adapter/train_log.jsonl",), _existing("adapter/adapter.json", "{}")),
    Case("extend-class-the-model-has", "extend --material G4_W --particle gamma " + STAGE, 2, "G4_W:gamma", ("adapter",)),
    Case("extend-resume-and-overwrite-together", "extend --material G4_Pb --particle gamma --resume --overwrite " + STAGE, 2, "give one of them", ("adapter",)),
    Case("adapt-particle-unknown-particle", "adapt-particle --particle photon --material G4_W " + STAGE, 2, "unknown particle", ("adapter",)),
    # adapters list
    Case("adapters-list-truncated-weights", "adapters list {d}/truncated_model", 2, "unreadable weights", ()),
    Case("adapters-list-missing-model", "adapters list {d}/nothing", 2, "no such model directory", ()),
    Case("adapters-list-adapter-manifest-with-a-number-for-a-hash", "adapters list {d}/model --adapter {d}/adapter_hash_not_a_string", 2, "base_weights_sha256 is not a hash", ()),
    Case("adapters-list-model-given-as-adapter", "adapters list {d}/model --adapter {d}/truncated_model", 2, "not a calofm adapter", ()),
    # models
    Case("models-json-with-a-value", "models --json=yes", 2, "ignored explicit argument", ()),
    Case("generate-unknown-model-name", "generate --model small-w-zz --material G4_W --particle gamma -n 2 --energy 50 --out {t}/g.h5", 2, "shipped: small-w-ta", ("g.h5", "g.h5.partial")),
    # bench
    Case("bench-out-exists", "bench model --quick --out {t}/bench.json", 2, "add --overwrite", (), _existing("bench.json")),
    Case("bench-zero-threads", "bench model --quick --threads 0", 2, "argument --threads", ()),
    Case("bench-generate-no-model", "bench generate --preset tiny", 2, "--random-weights", ()),
    Case("bench-generate-graphs-on-cpu", "bench generate --random-weights --mode graphs", 2, "CUDA", ()),
    Case("bench-generate-bad-mode", "bench generate --random-weights --mode warp", 2, "unknown mode", ()),
    # study finetune
    Case("study-missing-test-file", STUDY + " --test {d}/nothing.h5 --sizes 2 --max-steps 1 --out {t}/study", 2, "no such file", ("study",)),
    Case("study-test-file-is-not-hdf5", STUDY + " --test {d}/notes.h5 --sizes 2 --max-steps 1 --out {t}/study", 2, "not a readable HDF5", ("study",)),
    Case("study-more-showers-than-the-data", STUDY + " --test {d}/pb.h5 --sizes 500 --max-steps 1 --out {t}/study", 2, "500", ("study",)),
    Case("study-forgetting-class-the-model-lacks", STUDY + " --test {d}/pb.h5 --sizes 2 --max-steps 1 --forgetting G4_Ta:gamma={d}/w.h5 --out {t}/study", 2, "--forgetting", ("study",)),
    Case("study-test-file-of-another-class", STUDY + " --test {d}/w.h5 --sizes 2 --max-steps 1 --out {t}/study", 2, "--test", ("study",)),
    Case("study-data-of-another-class", STUDY.replace("{d}/pb.h5", "{d}/w.h5") + " --test {d}/pb.h5 --sizes 2 --max-steps 1 --out {t}/study", 2, "holds G4_W:gamma showers, not G4_Pb:gamma", ("study",)),
    Case("study-folder-of-other-settings", STUDY + " --test {d}/pb.h5 --sizes 2 --max-steps 1 --out {t}/study", 2, "other settings", ("study/runs/expert_n2_r0", "study/study.json"), _study_dir),
    # merge
    Case("merge-one-file", "merge {d}/w.h5 --out {t}/m.h5", 2, "at least two", ("m.h5",)),
    Case("merge-same-file-twice", "merge {d}/w.h5 {d}/w.h5 --out {t}/m.h5", 2, "given twice", ("m.h5",)),
    Case("merge-other-material", "merge {d}/w.h5 {d}/pb.h5 --out {t}/m.h5", 2, "hold different showers", ("m.h5",)),
    Case("merge-getting-high-input", "merge {d}/w.h5 {d}/w_gh.h5 --out {t}/m.h5", 2, "--to showerdata", ("m.h5",)),
    Case("merge-nan-incident-energy", "merge {d}/w.h5 {d}/nan_incident.h5 --out {t}/m.h5", 2, "NaN", ("m.h5",)),
    Case("merge-negative-point-energies", "merge {d}/w.h5 {d}/negative_points.h5 --out {t}/m.h5", 2, "point energies contain negative", ("m.h5",)),
    Case("merge-input-without-directions", "merge {d}/w.h5 {d}/no_directions.h5 --out {t}/m.h5", 2, "lacks the dataset 'directions'", ("m.h5",)),
    Case("merge-output-exists", "merge {d}/w.h5 {d}/one.h5 --out {t}/m.h5", 2, "add --overwrite", (), _existing("m.h5")),
    Case("merge-missing-input", "merge {d}/w.h5 {d}/nothing.h5 --out {t}/m.h5", 2, "no such file", ("m.h5",)),
    # quickstart
    Case("quickstart-unknown-material", QS + " --material G4_Unobtainium --out {t}/qs", 2, "unknown material", ("qs",)),
    Case("quickstart-material-the-base-has", QS + " --material W --out {t}/qs", 2, "already has G4_W:gamma", ("qs",)),
    Case("quickstart-unknown-model", QS + " --model small-w-zz --out {t}/qs", 2, "not a model directory", ("qs",)),
    Case("quickstart-unknown-scale", QS + " --scale huge --out {t}/qs", 2, "argument --scale", ("qs",)),
    Case("quickstart-out-is-a-file", QS + " --out {t}/qs", 2, "needs a directory", (), _existing("qs")),
    Case("quickstart-folder-of-other-settings", QS + " --out {t}/qs", 2, "other settings", ("qs/geant4/Pb_gamma_test.h5", "qs/geant4/Pb_gamma_train.h5.partial"), _quickstart_dir),
]  # fmt: skip


def _snapshot(*roots: Path) -> dict[str, tuple[str, str]]:
    """Every file and folder under ``roots`` with a hash of each file's bytes."""
    seen = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            kind = "dir" if path.is_dir() else "file"
            digest = "" if kind == "dir" else hashlib.sha256(path.read_bytes()).hexdigest()
            seen[str(path)] = (kind, digest)
    return seen


def test_the_table_covers_every_sub_command_with_distinct_cases():
    from calofm.cli import build_parser

    commands = {c.argv.split()[0] for c in CASES}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert commands == set(sub.choices)
    assert len({c.id for c in CASES}) == len(CASES) >= 40


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing_behind(case, inputs, tmp_path, capsys):
    torch.set_num_threads(1)
    work = tmp_path / "work"
    work.mkdir()
    if case.setup:
        case.setup(work, inputs)
    before = _snapshot(inputs, work)
    argv = [a.format(d=inputs, t=work) for a in case.argv.split()]
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not TQDM_LINE.search(line)]
    assert code == case.code, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"calofm {argv[0]}"), lines[0]
    assert case.message in lines[0]
    assert "Traceback" not in err
    for name in case.absent:
        path = Path(name.format(d=inputs, t=work)) if "{" in name else work / name
        assert not path.exists(), path
    assert _snapshot(inputs, work) == before


def test_generate_failing_before_its_first_shower_leaves_no_partial_to_refuse_the_rerun(
    inputs, tmp_path, monkeypatch, capsys
):
    """A run that stops before it holds a shower has nothing to resume: its partial file goes, so
    the corrected command is not refused as 'an interrupted run made with other arguments'."""
    import calofm.generation.engine as engine

    def fails(*args, **kwargs):
        raise CalofmError("the decoder failed")

    out = tmp_path / "x.h5"
    argv = GEN.format(d=inputs).split() + ["--out", str(out)]
    monkeypatch.setattr(engine, "generate", fails)
    assert main(argv) == 2
    assert "the decoder failed" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "x.h5.partial").exists()
    monkeypatch.undo()
    assert main([*argv, "--seed", "1"]) == 0
    assert out.exists()


def test_an_output_directory_without_write_permission_is_refused_before_anything_runs(
    inputs, tmp_path, monkeypatch, capsys
):
    """(Root writes anywhere, so the permission is taken away where calofm asks for it.)"""
    import calofm.files

    report = tmp_path / "report"
    report.mkdir()
    real_access = calofm.files.os.access
    monkeypatch.setattr(
        calofm.files.os, "access", lambda p, mode: Path(p) != report and real_access(p, mode)
    )
    before = _snapshot(tmp_path)
    assert main(EVAL.format(d=inputs).split() + ["--out", str(report)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"calofm evaluate: error: --out {report}: cannot write in it (permission denied)"
    assert _snapshot(tmp_path) == before


def test_generate_refuses_a_batch_beyond_free_memory_before_making_a_file(
    inputs, tmp_path, monkeypatch, capsys
):
    """Too many showers decoded at once for the memory: one line saying so, before any file is
    made, not the allocator's traceback a minute in (free memory made small, so that without the
    check the run is small and succeeds instead of exhausting the machine)."""
    import calofm.generation.decoder as decoder

    monkeypatch.setattr(decoder, "free_memory", lambda device: 2**20)
    assert main(GEN.format(d=inputs).split() + ["--out", str(tmp_path / "x.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "GiB free on cpu; lower --batch-size" in err[0], err
    assert list(tmp_path.iterdir()) == []


def test_quickstart_at_the_largest_seed_gives_every_step_a_seed_it_accepts(tmp_path):
    """The quickstart seeds its k-th sample with seed + k: at 2**32 - 1 those must wrap, or a
    step hours into the run refuses its seed."""
    from calofm.cli import build_parser
    from calofm.cli._quickstart_plan import make_plan
    from calofm.cli._quickstart_steps import make_steps

    parser = build_parser()
    args = parser.parse_args(["quickstart", "--out", str(tmp_path), "--seed", str(2**32 - 1)])
    seeds = []
    for step in make_steps(make_plan(args)):
        if step.argv and "--seed" in step.argv:
            parser.parse_args(step.argv)  # argparse exits on a seed out of range
            seeds.append(int(step.argv[step.argv.index("--seed") + 1]))
    assert 2**32 - 1 in seeds and 0 in seeds
