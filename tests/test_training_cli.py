"""``calofm train`` end to end: bad input, a run on two processes (DDP) against one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_toy_showers

from calofm.cli import main
from calofm.data.formats import write_showers
from calofm.detector import DetectorConfig
from calofm.model import CaloFM, load_model, preset

DET = DetectorConfig(absorber_mm=(2.1,) * 6, nx=6, ny=6)


@pytest.fixture
def data(tmp_path):
    paths = {}
    for k, material in enumerate(("G4_W", "G4_Ta")):
        s = make_toy_showers(40, seed=k, detector=DET.with_material(material), energy_range=(1, 5))
        paths[material] = write_showers(s, tmp_path / f"{material}.h5")
    return paths


def run_cli(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


@pytest.mark.parametrize(
    ("data_arg", "extra", "message"),
    [
        ("G4_W:gamma=/no/such/file.h5", [], "no such file"),
        ("G4_W-gamma=x.h5", [], "expected MATERIAL:particle=PATH"),
        ("G4_W:photon=x.h5", [], "unknown particle"),
        (None, ["--preset", "huge"], "unknown preset"),
        (None, [], "needs a budget"),
        (None, ["--self-drawn-energy", "1"], "must be in [0, 1)"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, data, capsys, data_arg, extra, message):
    spec = data_arg or f"G4_W:gamma={data['G4_W']}"
    budget = [] if message == "needs a budget" else ["--max-steps", "1"]
    code, err = run_cli(
        [
            "train",
            "--data",
            spec,
            "--preset",
            "tiny",
            "--out",
            str(tmp_path / "m"),
            *budget,
            *extra,
        ],
        capsys,
    )
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and message in err


def test_file_of_another_class_is_refused(tmp_path, data, capsys):
    code, err = run_cli(
        ["train", "--data", f"G4_W:gamma={data['G4_Ta']}", "--preset", "tiny"]
        + ["--out", str(tmp_path / "m"), "--max-steps", "1"],
        capsys,
    )
    assert code == 2 and "G4_Ta" in err


def _train_command(data, out) -> list[str]:
    return [
        "train",
        "--data",
        f"G4_W:gamma={data['G4_W']}",
        "--data",
        f"Ta:gamma={data['G4_Ta']}",
        "--preset",
        "tiny",
        "--out",
        str(out),
        "--max-steps",
        "10",
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--seed",
        "3",
    ]


@pytest.mark.slow
def test_two_process_ddp_run_matches_one_process_with_the_same_global_batch(tmp_path, data):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "calofm", *_train_command(data, tmp_path / "one")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert single.returncode == 0, single.stderr
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
        + ["--standalone", "-m", "calofm", *_train_command(data, tmp_path / "two")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("trained 10 steps") == 1  # only rank 0 reports
    # The gradients themselves agree (AdamW would hide a gradient summed over processes instead
    # of averaged): the pre-clipping gradient norm and the loss logged at step 10 match.
    logs = [
        [json.loads(x) for x in (tmp_path / run / "train_log.jsonl").read_text().splitlines()]
        for run in ("one", "two")
    ]
    train_one, train_two = ([r for r in log if r["kind"] == "train"] for log in logs)
    assert [r["step"] for r in train_one] == [r["step"] for r in train_two] == [10]
    for key in ("grad_norm", "loss"):
        assert train_two[0][key] == pytest.approx(train_one[0][key], rel=1e-4), key
    one, two = load_model(tmp_path / "one"), load_model(tmp_path / "two")
    torch.manual_seed(3)
    initial = CaloFM(preset("tiny"), one.tokenizer, one.detector, one.classes).state_dict()
    assert any(not torch.equal(initial[k], v) for k, v in one.state_dict().items())
    for name, a in one.state_dict().items():
        torch.testing.assert_close(two.state_dict()[name], a, rtol=1e-4, atol=1e-5)
    summary = json.loads((tmp_path / "two" / "training.json").read_text())
    assert summary["world_size"] == 2 and summary["step"] == 10


def test_run_without_validation_saves_the_last_weights(tmp_path, data, capsys):
    out = tmp_path / "m"
    argv = _train_command(data, out) + ["--val-fraction", "0", "--max-steps", "3"]
    rng = torch.get_rng_state()
    assert main(argv) == 0
    assert torch.equal(torch.get_rng_state(), rng)  # the model was seeded on a forked generator
    summary = json.loads((out / "training.json").read_text())
    assert summary["step"] == 3 and summary["best_val_loss"] is None
    assert summary["n_val_showers"] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["provenance"]["data"]["G4_Ta:gamma"]["n_train"] == 40
    assert load_model(out).classes == ["G4_W:gamma", "G4_Ta:gamma"]


def test_the_share_of_self_drawn_energies_reaches_the_run(tmp_path, data):
    out = tmp_path / "m"
    argv = _train_command(data, out) + ["--max-steps", "2", "--self-drawn-energy", "0.3"]
    assert main(argv) == 0
    summary = json.loads((out / "training.json").read_text())
    assert summary["train_config"]["self_drawn_energy"] == 0.3
