"""``calofm extend``, ``calofm adapt-particle`` and ``calofm adapters list`` end to end."""

from __future__ import annotations

import json

import pytest
import torch
from test_adapters import BASE, DET, TOKENS, base_model, logits, toy_file

from calofm.adapters import load_model_with_adapters, read_manifest
from calofm.cli import main
from calofm.model import CaloFM, model_hash, preset, save_model

BUDGET = ["--max-steps", "2", "--n-events", "12", "--batch-size", "6", "--device", "cpu"]


@pytest.fixture
def base_dir(tmp_path):
    return str(save_model(base_model(), tmp_path / "base", {"preset": "tiny"}))


def test_extend_adapt_particle_stack_and_list(tmp_path, base_dir, capsys):
    pb = str(tmp_path / "base" / "pb_gamma")  # inside MODEL_DIR: found by adapters list
    w_e, pb_e = str(tmp_path / "w_e"), str(tmp_path / "pb_e")
    common = ["--model", base_dir, *BUDGET]
    pb_data = toy_file(tmp_path, "G4_Pb", "gamma")
    argv = ["extend", *common, "--material", "Pb", "--particle", "gamma", "--init-from", "Ta"]
    assert main([*argv, "--condition", "--data", pb_data, "--out", pb]) == 0
    out = capsys.readouterr().out
    assert "adapter G4_Pb:gamma (expert):" in out and "trainable parameters" in out
    argv = ["adapt-particle", *common, "--particle", "e-", "--material", "W", "--rank", "4"]
    assert main([*argv, "--data", toy_file(tmp_path, "G4_W", "e-"), "--out", w_e]) == 0
    out = capsys.readouterr().out
    assert "(particle+expert)" in out and "lora" in out and "heads" in out
    argv = ["extend", *common, "--adapter", w_e, "--material", "G4_Pb", "--particle", "e-"]
    assert main([*argv, "--data", toy_file(tmp_path, "G4_Pb", "e-"), "--out", pb_e]) == 0
    capsys.readouterr()

    manifest = read_manifest(pb_e)
    assert manifest["stacked_on"][0]["name"] == "G4_W:e-"
    assert read_manifest(w_e)["config"]["init_from"] == "G4_W:gamma"
    assert read_manifest(pb)["config"]["condition"] is True

    model = load_model_with_adapters(base_dir, [pb_e, pb, w_e])
    assert model.classes == [*BASE, "G4_Pb:gamma", "G4_W:e-", "G4_Pb:e-"]
    base = CaloFM(preset("tiny"), TOKENS, DET, BASE)
    base.load_state_dict(
        {k: v for k, v in model.base.state_dict().items() if k in base.state_dict()}
    )
    assert (
        model_hash(base)
        == json.loads((tmp_path / "base" / "manifest.json").read_text())["weights_sha256"]
    )
    for c in BASE:
        assert all(
            torch.equal(a, b)
            for a, b in zip(logits(model, [c] * 2), logits(base.eval(), [c] * 2), strict=True)
        )

    assert main(["adapters", "list", base_dir, "--adapter", w_e, "--adapter", pb_e]) == 0
    out = capsys.readouterr().out
    assert "G4_Pb:gamma" in out and "particle+expert" in out and "stacked on G4_W:e-" in out
    assert "classes with these adapters: G4_W:gamma, G4_Ta:gamma" in out
    assert main(["adapters", "list", base_dir, "--adapter", pb_e, "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    by_name = {r["name"]: r for r in listing["adapters"]}
    assert by_name["G4_Pb:e-"]["missing"] == ["G4_W:e-"]
    assert by_name["G4_Pb:gamma"]["base_ok"] and by_name["G4_Pb:gamma"]["n_train"] == 12


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--material", "Pb", "--particle", "e-"], "unknown to the base model"),
        (["--material", "Pb", "--particle", "gamma", "--init-from", "Cu"], "no class G4_Cu:gamma"),
        (["--material", "W", "--particle", "gamma"], "already has class G4_W:gamma"),
        (["--material", "Cu", "--particle", "gamma"], "holds G4_Pb showers, not G4_Cu"),
    ],
)
def test_stage_errors_are_one_line_and_exit_2(tmp_path, base_dir, capsys, argv, message):
    data = toy_file(tmp_path, "G4_Pb", "gamma")
    code = main(
        [
            "extend",
            "--model",
            base_dir,
            *BUDGET,
            *argv,
            "--data",
            data,
            "--out",
            str(tmp_path / "x"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_an_adapter_of_another_base_model_is_refused_by_the_cli(tmp_path, base_dir, capsys):
    other = str(save_model(base_model(seed=1), tmp_path / "other", {}))
    data = toy_file(tmp_path, "G4_W", "e-")
    argv = ["adapt-particle", "--model", other, *BUDGET, "--particle", "e-", "--material", "W"]
    assert main([*argv, "--data", data, "--out", str(tmp_path / "e")]) == 0
    capsys.readouterr()
    argv = ["extend", "--model", base_dir, *BUDGET, "--adapter", str(tmp_path / "e")]
    code = main(
        [
            *argv,
            "--material",
            "Pb",
            "--particle",
            "e-",
            "--data",
            data,
            "--out",
            str(tmp_path / "x"),
        ]
    )
    assert code == 2 and "trained on another base model" in capsys.readouterr().err
