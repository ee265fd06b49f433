"""`calofm evaluate` end to end: outputs, JSON shape, reproducibility, bad input, Geant4 floor."""

from __future__ import annotations

import json
import re
from html import escape

import h5py
import numpy as np
import pytest
from conftest import make_toy_showers

from calofm.cli import main
from calofm.data.formats import incident_energies, write_showers
from calofm.evaluation.metrics import MetricConfig, format_number
from calofm.evaluation.observables import ObservableConfig, observable_list
from calofm.evaluation.report import evaluate
from calofm.evaluation.verdicts import verdict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    reference = write_showers(make_toy_showers(40, seed=10), d / "geant4.h5", fmt="getting_high")
    candidate = write_showers(make_toy_showers(30, seed=11), d / "model.h5")
    return reference, candidate


@pytest.fixture(scope="module")
def cli_run(toy_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "r"
    reference, candidate = toy_files
    code = main(["evaluate", str(reference), str(candidate), "--out", str(out), "--splits", "2"])
    return code, out


def test_evaluate_writes_metrics_plots_and_report(cli_run):
    code, out = cli_run
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    names = [o.name for o in observable_list(ObservableConfig())]
    html = (out / "report.html").read_text()
    for name in names:
        png = out / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f'src="{name}.png"' in html
    # one display per slice centre where the reference has showers (none in 10-20 GeV here)
    assert metrics["slice_showers"]["10-20"]["reference"] == 0
    assert [d["energy_gev"] for d in metrics["event_displays"]] == [50, 95]
    displays = [d["file"] for d in metrics["event_displays"]]
    for name in displays:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC
        assert f'src="{name}"' in html
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{n}.png" for n in names] + displays + ["metrics.json", "report.html"]
    )
    for entry in (metrics["candidates"]["model"], metrics["floor"]):
        assert set(entry["observables"]) == set(names)
        for name, values in entry["observables"].items():
            if "GeV" in name and values["w1x100"] is None:
                continue  # a toy energy slice can be empty in a split: null, not NaN
            assert values["w1x100"] >= 0 and 0 <= values["separation_power"] <= 1
        assert 0 <= entry["classifier_auc"] <= 1
    assert metrics["n_compared"] == 20  # min(40 // 2, 30): floor and candidate at 20 vs 20
    assert "20 vs 20" in metrics["settings"]["caveat"]
    assert "layer_fraction_29" in metrics["classifier_features"]
    assert "classifier AUC" in html and "floor" in html


def test_report_opens_with_a_verdict_and_says_how_to_read_it(cli_run):
    """A physicist who did not write the code: the verdict first, then what each sample is, what
    the metrics mean and which way is better, then the numbers, displays and plots."""
    html = (cli_run[1] / "report.html").read_text()
    metrics = json.loads((cli_run[1] / "metrics.json").read_text())
    verdict = metrics["verdicts"]["model"]
    assert escape(verdict["words"]) in html and escape(verdict["details"]) in html
    order = [html.index(h) for h in ("Verdict", "What was compared", "How to read", "Metrics")]
    order += [html.index(h) for h in ("Event displays", "Observables")]
    assert order == sorted(order)
    for definition in (
        "lower is better",
        "0.5 is ideal",
        "dividing by the reference's standard deviation",
        "two halves of the reference",
    ):
        assert definition in html
    samples = metrics["samples"]
    assert samples["reference"]["label"] == "reference: geant4"
    assert "origin not recorded" in samples["model"]["description"]
    shown = re.sub(r"<[^>]+>", " ", re.sub(r"<details.*?</details>", "", html, flags=re.S))
    for code_name in ("cog_x", "energy_sum", "n_hits", "radial_profile"):
        assert code_name not in shown  # words, not code names


def test_numbers_have_one_format_everywhere():
    assert [format_number(v) for v in (0.00123456, 0.5, 1.0, 9.996, 12.34, 1234.5)] == [
        "0.00123",
        "0.500",
        "1.00",
        "10.0",
        "12.3",
        "1230",
    ]
    assert format_number(float("nan")) == format_number(None) == "-"


def _entry(w1: dict[str, float], auc: float) -> dict:
    return {"observables": {k: {"w1x100": v} for k, v in w1.items()}, "classifier_auc": auc}


def test_verdict_grades_the_distance_from_the_floor_in_words_and_numbers():
    floor = _entry({"a": 1.0, "b": 2.0, "c": 4.0}, 0.52)
    metrics = {
        "observables": ["a", "b", "c", "a_slice"],
        "floor": floor,
        "candidates": {
            "twin": _entry({"a": 1.1, "b": 1.8, "c": 4.4}, 0.53),
            "near": _entry({"a": 2.0, "b": 5.0, "c": 10.0}, 0.7),
            "far": _entry({"a": 30.0, "b": 2.0, "c": 80.0}, 0.999),
        },
    }
    headings = {"a": "Visible energy", "b": "Number of hits", "c": "Response"}
    twin, near, far = (verdict(n, metrics, headings) for n in ("twin", "near", "far"))
    assert twin["words"] == "indistinguishable from Geant4 at this sample size"
    assert near["words"] == "close to Geant4" and near["median_floor_ratio"] == 2.5
    assert far["words"] == "far from Geant4" and far["n_at_floor"] == 1
    assert far["furthest"][0] == ["a", 30.0]
    assert "visible energy (30.0×)" in far["details"] and "AUC 0.999" in far["details"]
    # the classifier alone can make it worse: the same distances with AUC 0.9
    metrics["candidates"]["twin"]["classifier_auc"] = 0.9
    assert verdict("twin", metrics, headings)["words"] == "clearly different from Geant4"


def test_descriptions_say_what_each_sample_is(toy_files, tmp_path):
    reference, candidate = toy_files
    argv = ["evaluate", str(reference), str(candidate), str(reference), "--out", str(tmp_path)]
    argv += ["--names", "gen", "g4", "--splits", "1", "--slices", "10-100"]
    argv += ["--describe", "g4=Geant4, the model's training sample"]
    argv += ["--describe", "reference=Geant4 test sample"]
    assert main(argv) == 0
    html = (tmp_path / "report.html").read_text()
    assert "Geant4, the model&#x27;s training sample" in html
    assert "Geant4 test sample" in html
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["samples"]["gen"]["description"] == "origin not recorded in the file"
    # one display, at the centre of the one slice, pairing showers of the nearest energy
    (display,) = metrics["event_displays"]
    assert display["energy_gev"] == 55
    chosen = display["showers"]
    assert list(chosen) == ["reference: geant4", "gen", "g4"]
    incident = incident_energies(candidate)
    assert chosen["gen"] == int(np.argmin(np.abs(incident - 55)))
    assert metrics["slice_showers"]["10-100"] == {"reference": 40, "gen": 30, "g4": 40}


def test_names_override_stems_and_floor_is_reproducible(toy_files, cli_run, tmp_path):
    reference, candidate = toy_files
    argv = ["evaluate", str(reference), str(candidate), str(reference), "--out", str(tmp_path)]
    assert main([*argv, "--names", "gen", "g4copy", "--splits", "2"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    first = json.loads((cli_run[1] / "metrics.json").read_text())
    assert list(metrics["candidates"]) == ["gen", "g4copy"]
    # Same seed and reference: the same floor, whichever candidates are compared with it.
    assert metrics["floor"]["observables"] == first["floor"]["observables"]
    assert metrics["floor"]["classifier_auc"] == first["floor"]["classifier_auc"]
    gen, model = metrics["candidates"]["gen"], first["candidates"]["model"]
    assert gen["observables"]["n_hits"]["w1x100_full_sample"] == pytest.approx(
        model["observables"]["n_hits"]["w1x100_full_sample"]
    )
    copy = metrics["candidates"]["g4copy"]["observables"]["energy_sum"]["w1x100_full_sample"]
    assert copy == 0.0


def test_library_call_returns_what_it_writes(toy_files, tmp_path):
    reference, candidate = toy_files
    result = evaluate(
        reference,
        {"model": candidate},
        tmp_path,
        observable_config=ObservableConfig(energy_slices_gev=((10, 55),)),
        metric_config=MetricConfig(n_splits=1, seed=3),
        max_showers=16,
        progress=False,
        event_displays=False,
    )
    assert result == json.loads((tmp_path / "metrics.json").read_text())
    assert result["n_compared"] == 8
    assert result["settings"]["seed"] == 3
    assert (tmp_path / "n_hits_10-55GeV.png").exists()
    assert result["event_displays"] == [] and not list(tmp_path.glob("event_display*"))


def _one_line_error(capsys, argv: list[str], match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and match in err[0], err


def test_bad_inputs_exit_2_with_one_line(toy_files, tmp_path, capsys):
    reference, candidate = toy_files
    out = str(tmp_path / "out")
    _one_line_error(
        capsys,
        ["evaluate", str(tmp_path / "nope.h5"), str(candidate), "--out", out],
        "no such file",
    )
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    _one_line_error(capsys, ["evaluate", str(reference), str(text), "--out", out], "not a readable")
    layout = tmp_path / "layout.h5"
    with h5py.File(layout, "w") as f:
        f["something"] = np.zeros(3)
    _one_line_error(
        capsys, ["evaluate", str(reference), str(layout), "--out", out], "unknown layout"
    )
    nan = tmp_path / "nan.h5"
    showers = make_toy_showers(12, seed=4)
    write_showers(showers, nan, fmt="getting_high")
    with h5py.File(nan, "a") as f:
        layers = f["30x30/layers"]
        layers[3, 5, 15, 15] = np.nan
    _one_line_error(capsys, ["evaluate", str(reference), str(nan), "--out", out], "NaN")
    _one_line_error(
        capsys,
        ["evaluate", str(reference), str(candidate), str(candidate), "--out", out],
        "--names",
    )
    _one_line_error(
        capsys,
        ["evaluate", str(reference), str(candidate), "--out", out, "--names", "a", "b"],
        "2 names for 1",
    )
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.slow
def test_geant4_samples_agree_at_the_floor_and_materials_separate(shared_data, tmp_path):
    metrics = evaluate(
        shared_data / "W_gamma_test.h5",
        {"W": shared_data / "W_gamma_train_0.h5", "Ta": shared_data / "Ta_gamma_test.h5"},
        tmp_path,
        max_showers=200,
        metric_config=MetricConfig(n_splits=2),
        progress=False,
    )
    same, other = metrics["candidates"]["W"], metrics["candidates"]["Ta"]
    assert abs(metrics["floor"]["classifier_auc"] - 0.5) < 0.1
    assert abs(same["classifier_auc"] - 0.5) < 0.1
    assert other["classifier_auc"] > 0.9
    floor_cog = metrics["floor"]["observables"]["cog_z"]["w1x100"]
    assert other["observables"]["cog_z"]["w1x100"] > 3 * floor_cog
