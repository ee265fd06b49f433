"""The generation benchmark runs end to end (at toy sizes) and reports what it promises."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest

from calofm.cli import main
from calofm.generation.benchmark import BenchSettings, format_table, run_benchmark
from calofm.generation.step_timing import StepTimes
from calofm.generation.throughput import ThroughputSettings

TOY = BenchSettings(
    preset="tiny",
    batch_sizes=(1, 2),
    lengths=(10, 30),
    probes=(0, 15, 29),
    repeats=1,
    expert_counts=(2, 3),
    expert_batch=2,
    expert_rounds=2,
    full_run=(2, 30),
    reference_batch=2,
    n_bins=40,
)


def test_step_fit_sums_the_steps_of_a_decode():
    linear = StepTimes([0, 10, 20], [1.0, 2.0, 3.0])
    assert linear.total(3) == pytest.approx(1.0 + 1.1 + 1.2)
    quadratic = StepTimes([0, 1, 2, 3], [0.0, 1.0, 4.0, 9.0])
    assert quadratic.total(4) == pytest.approx(0.0 * 0 + 1 + 4 + 9, abs=1e-6)


def test_benchmark_reports_speeds_speedup_experts_and_memory():
    result = run_benchmark(TOY)
    assert [(r["batch"], r["length"]) for r in result["table"]] == [
        (1, 10), (1, 30), (2, 10), (2, 30)
    ]  # fmt: skip
    assert result["kv_speedup_at_30"] == result["kv_speedup_at_30_by_batch"]["2"] > 0
    assert set(result["experts"]["ratio_single_class"]) == {"2", "3"}
    assert result["expert_cost_ratio_12_vs_2"] is None  # 12 experts were not measured here
    assert result["memory"]["2"]["kv_cache_bytes"] == 2 * result["memory"]["1"]["kv_cache_bytes"]
    assert result["full_run"]["measured_s"] > 0
    assert "speed-up" in format_table(result)
    json.dumps(result)


def test_bench_model_measures_the_shipped_design_with_its_tokenizer(monkeypatch, capsys):
    settings = replace(TOY, lengths=(10,), probes=(0, 9), full_run=(1, 10), expert_counts=(2,))
    monkeypatch.setattr(BenchSettings, "quick", classmethod(lambda cls: settings))
    assert main(["bench", "model", "--json", "--quick", "--preset", "small"]) == 0
    model = json.loads(capsys.readouterr().out)["model"]
    assert model["preset"] == "small" and model["voxel_head"] == "factorised"
    assert model["energy_vocab"] < 2 * 1024 + 10  # 1024 log bins (relative: twice), specials


def test_bench_model_json_prints_one_object(monkeypatch, capsys):
    settings = replace(
        TOY, lengths=(10, 1000), probes=(0, 500, 999), full_run=(1, 20), expert_counts=(2, 12)
    )
    monkeypatch.setattr(BenchSettings, "quick", classmethod(lambda cls: settings))
    assert main(["bench", "model", "--json", "--quick"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kv_speedup_at_1000"] > 0 and result["expert_cost_ratio_12_vs_2"] > 0


def test_bench_generate_compiles_the_step_on_a_cpu_with_a_compiler(monkeypatch):
    """The compiled engine itself is tested in test_static_decode (it takes a minute to measure)."""
    assert "compile" not in ThroughputSettings(device="cuda").run_modes()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert ThroughputSettings().run_modes() == ("recompute", "eager", "packed")
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert ThroughputSettings().run_modes() == ("recompute", "eager", "packed", "compile")


def test_bench_generate_reports_every_mode_and_the_speedup_over_geant4(monkeypatch, capsys):
    monkeypatch.setattr(shutil, "which", lambda name: None)  # no compilation: it takes a minute
    args = ["bench", "generate", "--random-weights", "--preset", "tiny", "--batch", "2"]
    args += ["--steps", "6", "--repeats", "1", "--geant4-showers", "0", "--geant4-rate", "4"]
    assert main([*args, "--json", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["device"].startswith("cpu") and result["batch_sizes"] == [2]
    modes = result["presets"]["tiny"]["modes"]
    assert set(modes) == {"recompute", "eager", "packed"}
    for mode, rows in modes.items():
        assert rows["2"]["steps"] == 6 and rows["2"]["tokens_per_s"] > 0, mode
        assert result["showers_per_s"][mode]["2"] == rows["2"]["showers_per_s"]
    assert modes["eager"]["2"]["kv_cache_bytes_per_shower"] > 0
    assert result["geant4_showers_per_s_per_core"] == 4
    best = max(modes[m]["2"]["showers_per_s"] for m in set(modes) - {"recompute"})
    assert result["speedup_vs_geant4"] == pytest.approx(best / 4)
    assert result["tokens_per_s"]["2"] == pytest.approx(best * 6)


def test_bench_generate_measures_the_precision_asked_for(monkeypatch, capsys):
    from calofm.generation import decoder

    seen = []
    precision = decoder.StaticDecoder._precision
    monkeypatch.setattr(
        decoder.StaticDecoder,
        "_precision",
        lambda self: seen.append(self.config.precision) or precision(self),
    )
    args = ["bench", "generate", "--random-weights", "--preset", "tiny", "--batch", "2"]
    args += ["--steps", "4", "--repeats", "1", "--geant4-showers", "0", "--mode", "eager"]
    assert main([*args, "--precision", "bf16", "--json", "--threads", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["settings"]["precision"] == "bf16" and set(seen) == {"bf16"}


def test_bench_generate_needs_a_model_or_random_weights(capsys):
    assert main(["bench", "generate", "--preset", "tiny"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--random-weights" in err[0]
    assert (
        main(["bench", "generate", "--random-weights", "--mode", "graphs", "--preset", "tiny"]) == 2
    )
