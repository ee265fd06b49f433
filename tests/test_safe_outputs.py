"""Outputs are never lost or left half-written: --overwrite, resume, SIGTERM, warnings on stderr,
and the quickstart end to end (issue 9, and convert's resume and atomic_output of issue 13)."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from conftest import make_toy_showers

from calofm.cli import main
from calofm.data.formats import file_info, read_all, write_showers
from calofm.data.writers import GettingHighWriter, ShowerWriter
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.files import atomic_output


def assert_same_showers(a, b) -> None:
    np.testing.assert_array_equal(a.offsets, b.offsets)
    np.testing.assert_array_equal(a.voxels, b.voxels)
    np.testing.assert_array_equal(a.energies, b.energies)
    np.testing.assert_array_equal(a.incident, b.incident)


def test_atomic_output_removes_its_temporary_file_on_failure_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "result.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_output(target) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("failed half-way")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    assert target.read_text() == "old"
    with atomic_output(target) as tmp:
        tmp.write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]
    assert target.read_text() == "new"


@pytest.mark.parametrize(
    ("source_format", "target_format", "writer"),
    [
        ("showerdata", "getting_high", GettingHighWriter),
        ("getting_high", "showerdata", ShowerWriter),
    ],
)
def test_interrupted_convert_resumes_in_another_process_to_the_same_file(
    tmp_path, monkeypatch, capsys, source_format, target_format, writer
):
    source = write_showers(make_toy_showers(9, seed=4), tmp_path / "in.h5", fmt=source_format)
    argv = ["convert", str(source), "--to", target_format, "--chunk-size", "2"]
    assert main([*argv, "--out", str(tmp_path / "whole.h5")]) == 0

    append, calls = writer.append, []

    def interrupted(self, showers, **metadata):
        calls.append(len(showers))
        if len(calls) == 3:
            raise KeyboardInterrupt
        append(self, showers, **metadata)

    monkeypatch.setattr(writer, "append", interrupted)
    out = tmp_path / "out.h5"
    assert main([*argv, "--out", str(out)]) == 130
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5", "out.h5.partial", "whole.h5"]
    monkeypatch.setattr(writer, "append", append)
    monkeypatch.setattr(os, "getpid", lambda: 424242)  # the rerun is another process
    capsys.readouterr()
    assert main([*argv, "--out", str(out)]) == 0
    assert "resuming" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.h5", "out.h5", "whole.h5"]
    assert_same_showers(read_all(out), read_all(tmp_path / "whole.h5"))
    assert file_info(out).format == target_format


def test_convert_replaces_a_complete_output_only_with_overwrite(tmp_path, capsys):
    w = write_showers(make_toy_showers(4, seed=1), tmp_path / "w.h5")
    pb = make_toy_showers(6, seed=2, detector=DetectorConfig().with_material("G4_Pb"))
    pb_path = write_showers(pb, tmp_path / "pb.h5")
    out = tmp_path / "out.h5"
    assert main(["convert", str(w), "--to", "getting_high", "--out", str(out)]) == 0
    assert main(["convert", str(pb_path), "--to", "getting_high", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert file_info(out).n == 4
    assert (
        main(["convert", str(pb_path), "--to", "getting_high", "--overwrite", "--out", str(out)])
        == 0
    )
    assert (file_info(out).n, file_info(out).detector.material) == (6, "G4_Pb")


def test_simulate_replaces_a_complete_output_only_with_overwrite(tmp_path, capsys):
    out = tmp_path / "sim.h5"
    run = ["simulate", "-n", "2", "--energy", "1", "--out", str(out)]
    assert main([*run, "--material", "G4_Pb"]) == 0
    assert main([*run, "--material", "G4_W"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert file_info(out).detector.material == "G4_Pb"
    assert main([*run, "--material", "G4_W", "--overwrite"]) == 0
    assert file_info(out).detector.material == "G4_W"


def test_sigterm_stops_a_command_like_ctrl_c_with_a_message_and_keeps_the_partial(
    model_dir, tmp_path, monkeypatch, capsys
):
    append, calls = ShowerWriter.append, []

    def terminated(self, showers, **metadata):
        calls.append(1)
        append(self, showers, **metadata)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(ShowerWriter, "append", terminated)
    out = tmp_path / "gen.h5"
    argv = ["generate", "--model", str(model_dir), "--material", "G4_W", "--particle", "gamma"]
    argv += ["-n", "6", "--energy", "50", "--batch-size", "2", "--max-hits", "5", "--out", str(out)]
    assert main(argv) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "interrupted (SIGTERM)" in err and "run the same command again" in err
    assert (tmp_path / "gen.h5.partial").exists() and not out.exists()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the command


def test_sigterm_that_an_extension_turned_into_another_error_is_still_an_interruption(
    monkeypatch, capsys
):
    """h5py turns an exception raised inside its attribute writing into a TypeError (seen when
    SIGTERM arrived there): the command still stops with the one-line message, not a traceback;
    an error without an interruption behind it still propagates."""
    import calofm.cli.models as models
    from calofm.cli import Terminated

    def converted(args):
        try:
            raise Terminated
        except Terminated:
            raise TypeError("Operation not defined for data type class") from None

    monkeypatch.setattr(models, "run", converted)
    assert main(["models"]) == 128 + signal.SIGTERM
    assert "interrupted (SIGTERM)" in capsys.readouterr().err

    def plain(args):
        raise TypeError("a bug")

    monkeypatch.setattr(models, "run", plain)
    with pytest.raises(TypeError, match="a bug"):
        main(["models"])


def test_generate_warns_on_stderr_in_words_about_energies_outside_the_training_range(
    model_dir, tmp_path, capsys
):
    argv = ["generate", "--model", str(model_dir), "--material", "G4_W", "--particle", "gamma"]
    argv += ["-n", "2", "--energy", "5000", "--max-hits", "4", "--out", str(tmp_path / "g.h5")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "warning" not in out
    assert "showers at 5000 GeV are an extrapolation" in err and "5000-5000" not in err


def test_generate_says_once_how_many_showers_reached_the_hit_limit_and_what_it_means(
    model_dir, tmp_path, capsys
):
    argv = ["generate", "--model", str(model_dir), "--material", "G4_W", "--particle", "gamma"]
    argv += ["-n", "5", "--energy", "50", "--max-hits", "1", "--out", str(tmp_path / "g.h5")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    stats = file_info(tmp_path / "g.h5").metadata["generation_stats"]
    assert stats["n_truncated"] > 0
    assert err.count("reached the limit") == 1 and "reached the limit" not in out
    assert f"{stats['n_truncated']} of 5 showers reached the limit of 1 hits" in err
    assert "end-of-sequence" in err


def test_evaluate_warns_before_comparing_a_candidate_of_another_material(
    tmp_path, monkeypatch, capsys
):
    import calofm.evaluation.report as report

    w = write_showers(make_toy_showers(4, seed=1), tmp_path / "w.h5")
    pb = make_toy_showers(4, seed=2, detector=DetectorConfig().with_material("G4_Pb"))
    pb_path = write_showers(pb, tmp_path / "pb.h5")
    w2 = write_showers(make_toy_showers(4, seed=3), tmp_path / "w2.h5")
    compared = []

    def evaluate(reference, candidates, *args, **kwargs):  # the comparison itself is tested
        compared.append(capsys.readouterr().err)  # elsewhere; here: what was said before it
        raise report.CalofmError("stopped after the checks")

    monkeypatch.setattr(report, "evaluate", evaluate)
    argv = ["evaluate", str(w), str(pb_path), str(w2), "--out", str(tmp_path / "report")]
    assert main(argv) == 2
    warnings = [line for line in compared[0].splitlines() if "warning" in line]
    assert len(warnings) == 1 and "pb.h5 holds G4_Pb gamma" in warnings[0]
    assert "G4_W gamma" in warnings[0]


def _train_argv(data, out, *extra):
    return [
        "train", "--data", f"G4_W:gamma={data}", "--preset", "tiny", "--max-steps", "2",
        "--batch-size", "8", "--val-fraction", "0.2", "--out", str(out), *extra,
    ]  # fmt: skip


def test_train_resume_of_a_run_stopped_before_its_first_checkpoint_starts_it_again(
    tmp_path, capsys
):
    det = DetectorConfig(absorber_mm=(2.1,) * 6, nx=6, ny=6)
    data = write_showers(
        make_toy_showers(20, seed=0, detector=det, energy_range=(1, 5)), tmp_path / "d.h5"
    )
    assert main(_train_argv(data, tmp_path / "fresh")) == 0
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "train_log.jsonl").write_text('{"kind": "train", "step": 1}\n')  # no checkpoint
    assert main(_train_argv(data, killed)) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(_train_argv(data, killed, "--resume")) == 0
    assert "starting from step 0" in capsys.readouterr().err
    fresh = (tmp_path / "fresh" / "model.safetensors").read_bytes()
    assert (killed / "model.safetensors").read_bytes() == fresh
    assert main(_train_argv(data, killed)) == 2  # a finished run is not trained over
    assert main(_train_argv(data, killed, "--overwrite")) == 0
    assert (killed / "model.safetensors").read_bytes() == fresh


def test_quickstart_at_its_smallest_scale_runs_end_to_end_and_reruns_honestly(tmp_path, capsys):
    out = tmp_path / "qs"
    argv = ["quickstart", "--scale", "test", "--workers", "1", "--out", str(out)]
    assert main(argv) == 0
    assert (out / "report" / "report.html").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["base_classes_identical"] is True
    assert set(summary["probe"]["classes"]) == {"G4_W:gamma", "G4_Ta:gamma"}
    assert set(summary["classes"]) == {"G4_Pb:gamma"}  # the test scale tests the new class only
    assert summary["classes"]["G4_Pb:gamma"]["classifier_auc"] is not None
    assert all(v > 0 for v in summary["seconds_per_shower"].values())
    assert summary["expert"]["trainable_parameters"] < summary["expert"]["base_parameters"]
    for material in ("W", "Ta", "Pb"):  # every class, generated in one mixed batch
        assert file_info(out / "calofm" / f"{material}_gamma.h5").n == 10
    records = json.loads((out / "quickstart_steps.json").read_text())
    assert set(records) == set(summary["step_seconds"])
    assert all(r["seconds"] >= 0 for r in records.values())
    capsys.readouterr()

    assert main(argv) == 0  # the same settings: every step is reused
    assert capsys.readouterr().out.count("(skipped:") == len(records)

    report = (out / "report" / "Pb_gamma" / "metrics.json").read_bytes()
    assert main([*argv, "--seed", "2"]) == 2  # other settings: refused, nothing reused
    assert "other settings" in capsys.readouterr().err
    assert json.loads((out / "quickstart_steps.json").read_text()) == records
    assert (out / "report" / "Pb_gamma" / "metrics.json").read_bytes() == report


def test_quickstart_overwrite_recomputes_exactly_the_steps_other_settings_change(tmp_path):
    import shutil

    from calofm.cli import build_parser
    from calofm.cli._quickstart_plan import make_plan
    from calofm.cli._quickstart_runner import fingerprints, plan_actions
    from calofm.cli._quickstart_steps import make_steps
    from calofm.pretrained import resolve_model

    def plan(records, *options, overwrite=True):
        args = build_parser().parse_args(["quickstart", "--out", str(tmp_path), *options])
        steps = make_steps(make_plan(args))
        prints = fingerprints(steps, ignore=("--workers",))
        records = {k: {"fingerprint": v} for k, v in records.items()}
        return plan_actions(steps, prints, records, overwrite), prints

    actions, made = plan({})
    args = build_parser().parse_args(["quickstart", "--out", str(tmp_path)])
    for step in make_steps(make_plan(args)):
        step.output.parent.mkdir(parents=True, exist_ok=True)
        step.output.write_text("done")

    assert set(plan(made)[0].values()) == {"skip"}
    assert set(plan(made, "--workers", "7")[0].values()) == {"skip"}  # same showers
    other = shutil.copytree(resolve_model("small-w-ta"), tmp_path / "other_model")
    steps, _ = plan(made, "--model", str(other))  # another base: Geant4's samples are kept
    assert {k for k, v in steps.items() if v == "skip"} == {k for k in steps if "geant4" in k}
    assert set(plan(made, "--seed", "4")[0].values()) == {"redo"}
    with pytest.raises(CalofmError, match="other settings"):
        plan(made, "--scale", "large", overwrite=False)
