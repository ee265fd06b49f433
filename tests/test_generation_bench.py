"""The generation benchmark runs end to end (at toy sizes) and reports what it promises."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from calofm.cli import main
from calofm.generation.benchmark import BenchSettings, StepTimes, format_table, run_benchmark

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


def test_bench_model_json_prints_one_object(monkeypatch, capsys):
    settings = replace(
        TOY, lengths=(10, 1000), probes=(0, 500, 999), full_run=(1, 20), expert_counts=(2, 12)
    )
    monkeypatch.setattr(BenchSettings, "quick", classmethod(lambda cls: settings))
    assert main(["bench", "model", "--json", "--quick"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["kv_speedup_at_1000"] > 0 and result["expert_cost_ratio_12_vs_2"] > 0
