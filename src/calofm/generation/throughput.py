"""``calofm bench generate``: showers/s of every decode engine, side by side with Geant4.

Method. With ``--random-weights`` a model of each preset gets random weights and end-of-sequence
pushed out of reach, so every shower runs exactly ``steps`` decode steps: full-vocabulary exact
sampling of both tokens at temperature 1, fp32; the paper preset uses 25,000 linear 1.4 keV energy
bins (the paper's), the small preset its 1024 log bins. Each engine (mode) decodes a batch
``repeats`` times after one warm-up run (which also compiles or captures); the median time
gives showers/s and tokens/s (hits, one per row and step): the process's CPU time when torch
uses one thread on a CPU (robust on a shared machine), wall time otherwise. Modes: ``recompute`` (no cache, the
whole prefix at every step; run over ``recompute_steps`` only, it is quadratic), ``eager`` (the
static step with the KV cache), ``packed`` (the same with oneDNN-packed heads, the CPU default),
``compile`` (torch.compile of the step; on a CPU with the packed heads, where it needs a C++
compiler) and ``graphs`` (CUDA graph replay, CUDA only).

With a trained model (``--model``), showers end where the model ends them, so lengths vary: the
same showers are generated with a batch that waits for its longest shower and with continuous
batching (a finished shower's slot takes the next one), and the gain is their ratio.

Geant4 (the embedded one, in a separate process on one core) simulates showers of the same
incident-energy distribution (uniform in ``energy_range``) for the same class; its CPU time per
shower gives ``geant4_showers_per_s_per_core``, and ``speedup_vs_geant4`` is the best generation
showers/s of the run over it. Where geant4-pybind is missing (a GPU machine), ``geant4_rate``
(measured elsewhere, and said so) is used instead, or the comparison is left out.
"""

from __future__ import annotations

import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import numpy as np
import torch

from calofm import __version__
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.generation.bench_presets import BENCH_CLASS, PRESET_TOKENIZERS
from calofm.generation.decoder import N_UNIFORMS, EngineConfig
from calofm.generation.engine import decode, generate
from calofm.generation.sampler import SamplingConfig
from calofm.generation.step_timing import clock, fixed_length, random_model

MODES = ("recompute", "eager", "packed", "compile", "graphs")


@dataclass(frozen=True)
class ThroughputSettings:
    presets: tuple[str, ...] = ("paper", "small")
    batches: tuple[int, ...] = (16, 64)
    steps: int = 256
    modes: tuple[str, ...] | None = None  # None: see run_modes
    repeats: int = 2
    recompute_steps: int = 32
    device: str = "cpu"
    model: str | None = None  # a trained model (directory or shipped name) for lengths that vary
    n_showers: int = 64  # showers per batch size with a trained model
    energy_range: tuple[float, float] = (10.0, 100.0)
    geant4_showers: int = 8  # 0: no Geant4 measurement
    geant4_rate: float | None = None  # showers/s per core measured elsewhere (no geant4 here)
    precision: str = "fp32"  # of the cached modes' matrix products (decoder.PRECISIONS)

    def __post_init__(self) -> None:
        for name in self.presets:
            if name not in PRESET_TOKENIZERS:
                raise CalofmError(
                    f"bench generate: no preset {name!r}; choose {list(PRESET_TOKENIZERS)}"
                )
        for mode in self.modes or ():
            if mode not in MODES:
                raise CalofmError(f"bench generate: unknown mode {mode!r}; choose {MODES}")
        if min(self.batches, default=0) <= 0 or self.steps <= 0 or self.repeats <= 0:
            raise CalofmError("bench generate: batches, steps and repeats must be positive")

    def run_modes(self) -> tuple[str, ...]:
        cuda = torch.device(self.device).type == "cuda"
        if self.modes is not None:
            if "graphs" in self.modes and not cuda:
                raise CalofmError("bench generate: mode 'graphs' needs a CUDA device")
            return self.modes
        if cuda:
            return ("recompute", "eager", "graphs")
        cpu = ("recompute", "eager", "packed")
        return cpu + ("compile",) if shutil.which("c++") or shutil.which("g++") else cpu


def engine_of(mode: str, device: str, precision: str = "fp32") -> EngineConfig:
    if mode == "eager":
        return EngineConfig(prepack=False, precision=precision)
    if mode == "packed":
        return EngineConfig(precision=precision)
    return EngineConfig.for_device(mode, device, precision)


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _peak_bytes(device: str) -> int:
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed(fn: Callable[[], object], repeats: int, device: str) -> float:
    """Median seconds of ``fn`` after one untimed run (warm-up, compilation, capture): the
    process's CPU time with one CPU thread (it holds on a busy machine), else wall time."""
    fn()
    cpu = torch.device(device).type == "cpu"
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = clock() if cpu else time.perf_counter()
        fn()
        _sync(device)
        times.append((clock() if cpu else time.perf_counter()) - t0)
    return statistics.median(times)


def measure_fixed(
    settings: ThroughputSettings, preset_name: str, log: Callable[[str], None]
) -> dict:
    """Every mode and batch of one preset at a fixed number of steps."""
    s, dev = settings, settings.device
    model = random_model(preset_name).to(dev)
    out: dict = {"parameters": model.n_parameters(), "modes": {}}
    for mode in s.run_modes():
        steps = min(s.steps, s.recompute_steps) if mode == "recompute" else s.steps
        rows = {}
        for b in s.batches:
            g = np.random.default_rng(0)
            u = torch.from_numpy(g.random((b, steps, N_UNIFORMS))).to(dev)
            inc = torch.from_numpy(g.uniform(-1, 1, b).astype(np.float32)).to(dev)
            cid = torch.zeros(b, dtype=torch.long, device=dev)
            cached = mode != "recompute"
            engine = engine_of(mode, dev, s.precision) if cached else None

            def run(u=u, inc=inc, cid=cid, engine=engine, steps=steps, cached=cached) -> None:
                cond = fixed_length(model, inc, steps - 1)
                decoded = decode(model, cond, cid, SamplingConfig(), steps - 1, u, cached, engine)
                assert int(decoded.n_hits.min()) == steps - 1, "every row runs all its steps"

            if torch.device(dev).type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            if mode == "compile":  # a fresh start: past the recompile limit steps run eagerly
                torch._dynamo.reset()
            seconds = _timed(run, s.repeats, dev)
            model.setup_cache(b, steps)
            kv = model.cache_bytes() // b if mode != "recompute" else 0
            model.clear_cache()
            rows[str(b)] = {
                "steps": steps,
                "seconds": seconds,
                "showers_per_s": b / seconds,
                "tokens_per_s": b * steps / seconds,
                "peak_memory_bytes": _peak_bytes(dev),
                "kv_cache_bytes_per_shower": kv,
            }
            log(
                f"{preset_name:>6} {mode:>9} batch {b:5d}: {b * steps / seconds:9.0f} tokens/s "
                f"{b / seconds:8.3f} showers/s ({steps} steps)"
            )
        out["modes"][mode] = rows
    return out


def measure_continuous(settings: ThroughputSettings, log: Callable[[str], None]) -> dict:
    """A trained model's showers with and without continuous batching, per batch size."""
    from calofm.model.io import load_model
    from calofm.pretrained import resolve_model

    s = settings
    model = load_model(resolve_model(s.model), device=s.device).eval()
    cls = BENCH_CLASS if BENCH_CLASS in model.classes else model.classes[0]
    energies = np.random.default_rng(0).uniform(*s.energy_range, s.n_showers)
    mode = "graphs" if torch.device(s.device).type == "cuda" else "packed"
    out: dict = {"model": s.model, "class": cls, "mode": mode, "batches": {}}
    for b in s.batches:
        row = {}
        for continuous in (False, True):
            stats: dict = {}

            def run(b=b, continuous=continuous, stats=stats) -> None:
                stats.update(
                    generate(
                        model,
                        cls,
                        energies,
                        seed=0,
                        batch_size=b,
                        device=s.device,
                        continuous=continuous,
                        engine=engine_of(mode, s.device, s.precision),
                    )[1]
                )

            seconds = _timed(run, 1, s.device)
            key = "continuous" if continuous else "lockstep"
            row[key] = {
                "seconds": seconds,
                "showers_per_s": s.n_showers / seconds,
                "tokens_per_s": stats["n_hits"] / seconds,
                "mean_hits": stats["n_hits"] / s.n_showers,
                "engine_steps": stats["steps"],
            }
        row["gain"] = row["continuous"]["showers_per_s"] / row["lockstep"]["showers_per_s"]
        out["batches"][str(b)] = row
        log(
            f"trained model, batch {b}: {row['lockstep']['showers_per_s']:.2f} showers/s "
            f"lockstep, {row['continuous']['showers_per_s']:.2f} continuous "
            f"(x{row['gain']:.2f}; {row['continuous']['mean_hits']:.0f} hits per shower)"
        )
    return out


def _geant4_worker(material: str, particle: str, energies: list[float], seed: int) -> float:
    """CPU seconds per shower of the embedded Geant4 (one warm-up shower first)."""
    from calofm.simulation.geant4 import Calorimeter

    calorimeter = Calorimeter(DetectorConfig().with_material(material))
    calorimeter.simulate(particle, np.array([energies[0]]), seed)
    t0 = time.process_time()
    calorimeter.simulate(particle, np.array(energies), seed + 1)
    return (time.process_time() - t0) / len(energies)


def geant4_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("geant4_pybind") is not None


def measure_geant4(settings: ThroughputSettings) -> dict | None:
    """Geant4 showers/s on one core (its process's CPU time), or the rate given."""
    s = settings
    if s.geant4_showers > 0 and geant4_available():
        from calofm.simulation.runner import init_worker

        energies = np.random.default_rng(1).uniform(*s.energy_range, s.geant4_showers).tolist()
        material, particle = BENCH_CLASS.split(":")
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=context, initializer=init_worker) as pool:
            per_shower = pool.submit(_geant4_worker, material, particle, energies, 1).result()
        return {
            "showers_per_s_per_core": 1 / per_shower,
            "showers": s.geant4_showers,
            "source": "measured in this run (process CPU time, one core)",
        }
    if s.geant4_rate is not None:
        return {
            "showers_per_s_per_core": s.geant4_rate,
            "showers": 0,
            "source": "given (--geant4-rate): measured on another machine",
        }
    return None


def device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(torch.device(device))})"
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def run_throughput(
    settings: ThroughputSettings, log: Callable[[str], None] = lambda _: None
) -> dict:
    """Every measurement of ``calofm bench generate``; the JSON-ready result."""
    s = settings
    s.run_modes()  # refuse a mode this device cannot run before measuring anything
    result: dict = {
        "calofm_version": __version__,
        "torch_version": torch.__version__,
        "device": device_name(s.device),
        "threads": torch.get_num_threads(),
        "clock": "process CPU time"
        if torch.device(s.device).type == "cpu" and torch.get_num_threads() == 1
        else "wall clock",
        "load_average": list(os.getloadavg()),
        "settings": asdict(s),
        "batch_sizes": list(s.batches),
        "method": __doc__.split("Method. ")[1].replace("\n", " ").strip(),
        "presets": {},
    }
    best = None
    for name in s.presets:
        result["presets"][name] = measure_fixed(s, name, log)
        for mode, rows in result["presets"][name]["modes"].items():
            for b, row in rows.items():
                if mode != "recompute" and (best is None or row["showers_per_s"] > best[3]):
                    best = (name, mode, int(b), row["showers_per_s"])
    first = result["presets"][s.presets[0]]["modes"] if s.presets else {}
    result["showers_per_s"] = {
        mode: {b: row["showers_per_s"] for b, row in rows.items()} for mode, rows in first.items()
    }
    cached = [rows for mode, rows in first.items() if mode != "recompute"]
    result["tokens_per_s"] = {  # the best cached engine's, per batch
        b: max(rows[b]["tokens_per_s"] for rows in cached) for b in (cached[0] if cached else {})
    }
    if s.model is not None:
        result["continuous_batching"] = measure_continuous(s, log)
        for b, row in result["continuous_batching"]["batches"].items():
            rate = row["continuous"]["showers_per_s"]
            if best is None or rate > best[3]:
                best = ("trained", "continuous", int(b), rate)
    if best is not None:
        result["best"] = dict(zip(("preset", "mode", "batch", "showers_per_s"), best, strict=True))
    geant4 = measure_geant4(s)
    result["geant4"] = geant4
    rate = None if geant4 is None else geant4["showers_per_s_per_core"]
    result["geant4_showers_per_s_per_core"] = rate
    result["speedup_vs_geant4"] = None if rate is None or best is None else best[3] / rate
    return result


def format_throughput(result: dict) -> str:
    lines = [
        f"calofm {result['calofm_version']}, torch {result['torch_version']}, {result['device']};"
        f" load average {result['load_average'][0]:.1f}",
        "",
        f"{'preset':>6} {'mode':>9} {'batch':>5} {'steps':>5} | {'tokens/s':>9} "
        f"{'showers/s':>9} | {'KV MiB/shower':>13} {'peak MiB':>8}",
    ]
    for name, p in result["presets"].items():
        for mode, rows in p["modes"].items():
            for b, r in rows.items():
                lines.append(
                    f"{name:>6} {mode:>9} {b:>5} {r['steps']:>5} | {r['tokens_per_s']:>9.0f} "
                    f"{r['showers_per_s']:>9.3f} | {r['kv_cache_bytes_per_shower'] / 2**20:>13.2f}"
                    f" {r['peak_memory_bytes'] / 2**20:>8.0f}"
                )
    cb = result.get("continuous_batching")
    if cb:
        lines.append("")
        lines.append(f"Trained model {cb['model']} ({cb['class']}, {cb['mode']}):")
        for b, row in cb["batches"].items():
            lines.append(
                f"  batch {b}: lockstep {row['lockstep']['showers_per_s']:.2f} showers/s, "
                f"continuous {row['continuous']['showers_per_s']:.2f} (x{row['gain']:.2f}), "
                f"{row['continuous']['mean_hits']:.0f} hits per shower"
            )
    g = result["geant4"]
    lines.append("")
    if g is None:
        why = (
            "--geant4-showers 0"
            if result["settings"]["geant4_showers"] == 0
            else "no geant4-pybind"
        )
        lines.append(f"Geant4: not measured ({why} and no --geant4-rate)")
    else:
        best = result["best"]
        lines.append(
            f"Geant4: {g['showers_per_s_per_core']:.2f} showers/s per core ({g['source']}); "
            f"best generation {best['showers_per_s']:.2f} showers/s ({best['preset']}, "
            f"{best['mode']}, batch {best['batch']}): x{result['speedup_vs_geant4']:.2f}"
        )
    return "\n".join(lines)
