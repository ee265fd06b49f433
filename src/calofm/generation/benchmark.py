"""How fast generation is: KV cache against recomputing the prefix, experts, memory.

Method. A model of the chosen preset with random weights and its end-of-sequence logits pushed to
-1e9, so every shower runs the full length. The cost of one decode step (model step + sampling of
both heads + bookkeeping) is measured at several prefix lengths L (the median of a few repeats),
for the KV cache (the static decode step of generation: one new token per row against the cached
prefix) and for recomputation (a full causal pass over the L+1 positions, heads on the last
position only: the fair no-cache baseline); both with the heads as generation runs them (packed
for oneDNN on a CPU). The step cost
is fitted with a + b L + c L^2 (least squares), and the time of an N-token shower batch is the sum
of the fit over L = 0..N-1. So recomputation at batch 128 x 1000 tokens (hours on this CPU) costs a
few probe steps; one full KV decode is also run end to end and compared with its extrapolation.
Times are this process's CPU seconds when torch uses one thread (robust on a machine shared with
other work), wall-clock seconds otherwise.

Experts: the same step with 2, 6 and 12 experts per block, for a batch of one class (how generation
runs) and for a batch whose rows are spread over all classes, timed in interleaved rounds.
"""

from __future__ import annotations

import platform
import resource
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from calofm import __version__
from calofm.generation.decoder import N_UNIFORMS
from calofm.generation.engine import decode
from calofm.generation.sampler import SamplingConfig
from calofm.generation.step_timing import (
    StepRunner,
    StepTimes,
    clock,
    fixed_length,
    median_time,
    random_model,
)
from calofm.model.linear import prepacked


@dataclass(frozen=True)
class BenchSettings:
    preset: str = "paper"
    batch_sizes: tuple[int, ...] = (1, 16, 128)
    lengths: tuple[int, ...] = (100, 250, 500, 1000)  # shower lengths (tokens) in the table
    probes: tuple[int, ...] = (0, 250, 500, 750, 999)  # prefix lengths where steps are timed
    repeats: int = 5  # timed repeats per probe (median); recomputation at large sizes uses fewer
    expert_counts: tuple[int, ...] = (2, 6, 12)
    expert_batch: int = 16
    expert_rounds: int = 15
    full_run: tuple[int, int] = (16, 1000)  # (batch, length) decoded end to end
    reference_batch: int = 16  # batch of the headline KV speed-up
    n_bins: int | None = None  # energy bins; None: the preset's (step_timing.PRESET_TOKENIZERS)

    @classmethod
    def quick(cls) -> BenchSettings:
        return cls(
            batch_sizes=(1, 16),
            lengths=(250, 1000),
            probes=(0, 500, 999),
            repeats=3,
            expert_rounds=6,
            full_run=(1, 500),
        )


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_benchmark(settings: BenchSettings, log: Callable[[str], None] = lambda _: None) -> dict:
    """Run every measurement; returns the JSON-ready result (see ``format_table``)."""
    s = settings
    max_len = max(max(s.lengths), max(s.probes) + 1)
    model = random_model(s.preset, s.expert_counts[0], s.n_bins)
    tok = model.tokenizer
    result: dict = {
        "calofm_version": __version__,
        "torch_version": torch.__version__,
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "clock": "process CPU time" if torch.get_num_threads() == 1 else "wall clock",
        "settings": asdict(s),
        "model": {
            "preset": s.preset,
            **model.config.to_dict(),
            "parameters": model.n_parameters(),
            "spatial_vocab": tok.spatial_vocab,
            "energy_vocab": tok.energy_vocab,
        },
        "method": __doc__.split("Method. ")[1].split("\n\nExperts")[0].replace("\n", " "),
    }

    per_step: dict[str, dict[int, StepTimes]] = {"kv": {}, "recompute": {}}
    memory: dict[int, dict] = {}
    split: dict[int, dict] = {}
    for b in s.batch_sizes:
        runner = StepRunner(model, b, max_len)
        for mode in ("kv", "recompute"):
            times = []
            with prepacked(model, b):  # the heads as generation runs them, in both modes
                for prefix in s.probes:
                    step = getattr(runner, mode)(prefix)
                    # Recomputing long prefixes of large batches takes seconds a step: time once.
                    heavy = mode == "recompute" and b * (prefix + 1) > 20_000
                    times.append(median_time(step, 1 if heavy else s.repeats, warm_up=not heavy))
                    log(f"batch {b:4d} {mode:9s} prefix {prefix:5d}: {1e3 * times[-1]:9.2f} ms")
            per_step[mode][b] = StepTimes(list(s.probes), times)
        memory[b] = {"kv_cache_bytes": model.setup_cache(b, max_len), "peak_rss_mib": _rss_mib()}
        split[b] = _sampling_share(runner, (max(s.probes) + 1) // 2, s.repeats)
        model.clear_cache()

    table = []
    for b in s.batch_sizes:
        for n in s.lengths:
            kv, rc = per_step["kv"][b].total(n), per_step["recompute"][b].total(n)
            table.append(
                {
                    "batch": b,
                    "length": n,
                    "kv_s": kv,
                    "recompute_s": rc,
                    "speedup": rc / kv,
                    "kv_showers_per_s": b / kv,
                    "kv_tokens_per_s": b * n / kv,
                    "recompute_showers_per_s": b / rc,
                    "recompute_tokens_per_s": b * n / rc,
                }
            )
    result["per_step_ms"] = {
        mode: {
            str(b): {str(p): 1e3 * t for p, t in zip(st.probes, st.seconds, strict=True)}
            for b, st in d.items()
        }
        for mode, d in per_step.items()
    }
    result["table"] = table
    longest = max(s.lengths)
    by_batch = {str(r["batch"]): r["speedup"] for r in table if r["length"] == longest}
    result[f"kv_speedup_at_{longest}_by_batch"] = by_batch
    ref = str(s.reference_batch if s.reference_batch in s.batch_sizes else s.batch_sizes[-1])
    result[f"kv_speedup_at_{longest}"] = by_batch[ref]
    result["kv_speedup_reference_batch"] = int(ref)
    result["memory"] = {str(b): m for b, m in memory.items()}
    result["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    result["sampling_share_of_kv_step"] = {str(b): v for b, v in split.items()}

    b, n = s.full_run
    log(f"full KV decode: batch {b}, {n} tokens")
    u = torch.from_numpy(np.random.default_rng(0).random((b, n + 1, N_UNIFORMS)))
    t0, wall0 = clock(), time.perf_counter()
    cond = fixed_length(model, torch.zeros(b), n)
    out = decode(model, cond, torch.zeros(b, dtype=torch.long), SamplingConfig(), n, u)
    measured, wall = clock() - t0, time.perf_counter() - wall0
    assert int(out.n_hits.min()) == n, "EOS was disabled; every shower must run the full length"
    fit = per_step["kv"][b].total(n + 1) if b in per_step["kv"] else None
    result["full_run"] = {
        "batch": b,
        "length": n,
        "measured_s": measured,
        "wall_s": wall,
        "extrapolated_s": fit,
        "tokens_per_s": b * n / measured,
    }
    del model
    result["experts"] = _bench_experts(s, max_len, log)
    result["expert_cost_ratio_12_vs_2"] = result["experts"]["ratio_single_class"].get("12")
    result["peak_rss_mib"] = _rss_mib()
    return result


def _sampling_share(runner: StepRunner, prefix: int, repeats: int) -> dict:
    """Seconds of the KV step at ``prefix`` spent in the model and in sampling both heads."""
    model = runner.model
    runner.setup_cache()
    s, e = runner.spatial[:, prefix : prefix + 1], runner.energy[:, prefix : prefix + 1]
    with torch.no_grad():

        def forward():
            return model.hidden_states(s, e, None, runner.routing, start=prefix)[-1]

        t_model = median_time(forward, repeats)
        h = forward()
        t_sample = median_time(lambda: runner.sample(h, prefix), repeats)
    model.clear_cache()
    return {
        "prefix": prefix,
        "model_ms": 1e3 * t_model,
        "sampling_ms": 1e3 * t_sample,
        "sampling_share": t_sample / (t_model + t_sample),
    }


def _bench_experts(s: BenchSettings, max_len: int, log: Callable[[str], None]) -> dict:
    b, prefix = s.expert_batch, (max(s.probes) + 1) // 2
    runners = {}
    for n in s.expert_counts:
        model = random_model(s.preset, n, s.n_bins)
        runners[n] = {
            "one": StepRunner(model, b, max_len),
            "mix": StepRunner(model, b, max_len, torch.arange(b) % n),
        }
    times: dict[tuple[int, str], list[float]] = {
        (n, k): [] for n in runners for k in ("one", "mix")
    }
    for _ in range(s.expert_rounds):  # interleaved, so slow drifts of the machine hit all alike
        for n, pair in runners.items():
            for key, runner in pair.items():
                step = runner.kv(prefix)  # the model's cache is allocated once, then reused
                step()
                t0 = clock()
                step()
                times[(n, key)].append(clock() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = s.expert_counts[0]
    for n in s.expert_counts:
        one, mix = 1e3 * med[(n, "one")], 1e3 * med[(n, "mix")]
        log(f"experts {n:3d}: one class {one:.2f} ms, mixed classes {mix:.2f} ms")
    return {
        "batch": b,
        "prefix": prefix,
        "step_ms_single_class": {str(n): 1e3 * med[(n, "one")] for n in s.expert_counts},
        "step_ms_mixed_classes": {str(n): 1e3 * med[(n, "mix")] for n in s.expert_counts},
        "ratio_single_class": {
            str(n): med[(n, "one")] / med[(base, "one")] for n in s.expert_counts
        },
        "ratio_mixed_classes": {
            str(n): med[(n, "mix")] / med[(base, "mix")] for n in s.expert_counts
        },
    }


def format_table(result: dict) -> str:
    m = result["model"]
    lines = [
        f"calofm {result['calofm_version']}, torch {result['torch_version']}, CPU, "
        f"{result['threads']} threads; preset {m['preset']} ({m['parameters'] / 1e6:.1f}M "
        f"parameters, vocabularies {m['spatial_vocab']} + {m['energy_vocab']})",
        "",
        f"{'batch':>5} {'tokens':>6} | {'recompute s':>11} {'KV s':>8} {'speed-up':>8} | "
        f"{'KV showers/s':>12} {'KV tokens/s':>11} | {'recompute tokens/s':>18}",
    ]
    for r in result["table"]:
        lines.append(
            f"{r['batch']:>5} {r['length']:>6} | {r['recompute_s']:>11.1f} {r['kv_s']:>8.2f} "
            f"{r['speedup']:>7.1f}x | {r['kv_showers_per_s']:>12.3f} {r['kv_tokens_per_s']:>11.0f}"
            f" | {r['recompute_tokens_per_s']:>18.1f}"
        )
    fr = result["full_run"]
    lines += [
        "",
        f"End-to-end KV decode, batch {fr['batch']} x {fr['length']} tokens: "
        f"{fr['measured_s']:.2f} s measured, {fr['extrapolated_s']:.2f} s from the step fit "
        f"({fr['tokens_per_s']:.0f} tokens/s)",
        "Sampling share of a KV step (both heads): "
        + ", ".join(
            f"batch {b}: {100 * v['sampling_share']:.0f}% ({v['sampling_ms']:.2f} of "
            f"{v['model_ms'] + v['sampling_ms']:.2f} ms)"
            for b, v in result["sampling_share_of_kv_step"].items()
        ),
        "Memory: "
        + ", ".join(
            f"batch {b}: KV cache {v['kv_cache_bytes'] / 2**20:.1f} MiB"
            for b, v in result["memory"].items()
        )
        + f"; model {result['model_bytes'] / 2**20:.0f} MiB; "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB",
    ]
    e = result["experts"]
    lines.append(
        f"Experts (KV step, batch {e['batch']}, prefix {e['prefix']}): "
        + ", ".join(
            f"{n}: {e['step_ms_single_class'][n]:.2f} ms (x{e['ratio_single_class'][n]:.3f}; "
            f"rows of all classes x{e['ratio_mixed_classes'][n]:.3f})"
            for n in e["step_ms_single_class"]
        )
    )
    return "\n".join(lines)
