"""Timing one decode step of a benchmark model: the model (random weights, showers that never end
early), its step with the KV cache and by recomputing the prefix, the clock, and the fit of a
step's cost over the prefix length that turns a few timed steps into the time of a whole decode.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.generation.bench_presets import BENCH_CLASS, PRESET_TOKENIZERS
from calofm.generation.decoder import N_UNIFORMS, EngineConfig, StaticDecoder
from calofm.generation.sampler import SamplingConfig
from calofm.model.conditions import Conditions
from calofm.model.config import preset
from calofm.model.seeding import seeded_init
from calofm.model.transformer import CaloFM
from calofm.tokens import TokenizerConfig


@dataclass
class StepTimes:
    """Median seconds per decode step at each probed prefix length, and the fitted curve."""

    probes: list[int]
    seconds: list[float]
    coef: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        degree = min(2, len(self.probes) - 1)
        self.coef = np.polyfit(self.probes, self.seconds, degree).tolist()

    def total(self, n_steps: int) -> float:
        """Seconds for a decode of ``n_steps`` steps (prefix lengths 0..n_steps-1)."""
        fitted = np.polyval(self.coef, np.arange(n_steps))
        return float(np.clip(fitted, min(self.seconds) * 0.5, None).sum())


def clock() -> float:
    """Seconds of this process's CPU time with one torch thread, else wall-clock seconds.

    On a machine shared with other work, CPU time measures this process's own cost; with several
    threads it would add up the threads, so wall-clock time is used (and is noisier there).
    """
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def median_time(fn: Callable[[], object], repeats: int, warm_up: bool = True) -> float:
    if warm_up:
        fn()
    times = []
    for _ in range(repeats):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return statistics.median(times)


def random_model(preset_name: str, n_classes: int = 1, n_bins: int | None = None) -> CaloFM:
    """A random-weight model of a benchmark preset whose showers never end early (EOS logits at
    -1e9), with the preset's tokenizer (``n_bins`` given: that many bins instead)."""
    if preset_name not in PRESET_TOKENIZERS:
        raise CalofmError(
            f"bench: no preset {preset_name!r}; choose one of {sorted(PRESET_TOKENIZERS)}"
        )
    det = DetectorConfig()
    kwargs = {**PRESET_TOKENIZERS[preset_name], **({} if n_bins is None else {"n_bins": n_bins})}
    tok = TokenizerConfig.for_detector(det, **kwargs)
    classes = [BENCH_CLASS] + [f"G4_M{i}:gamma" for i in range(1, n_classes)]
    with seeded_init(0):
        model = CaloFM(preset(preset_name), tok, det, classes).eval()
    model.spatial_head.never_end()
    with torch.no_grad():
        model.energy_head.bias[model.energy_output(tok.energy_eos)] = -1e9
    return model


def fixed_length(model: CaloFM, incident: torch.Tensor, n_hits: int) -> Conditions:
    """Conditions under which a benchmark model's showers all have ``n_hits`` hits: its EOS is
    out of reach, and a model with shower totals is given that hit count (and 1 GeV visible)."""
    cond = Conditions(incident)
    if model.config.totals:
        b = len(incident)
        hits = torch.full((b,), n_hits, dtype=torch.long, device=incident.device)
        cond = cond.with_totals(hits, torch.full((b,), 1000.0, device=incident.device))
    return cond


class StepRunner:
    """One decode step of a batch at a given prefix length, with or without the KV cache."""

    def __init__(
        self,
        model: CaloFM,
        batch: int,
        max_len: int,
        class_id: torch.Tensor | None = None,
        engine: str = "eager",
    ):
        tok = model.tokenizer
        self.model, self.batch = model, batch
        g = torch.Generator().manual_seed(0)
        self.spatial = torch.randint(0, tok.n_voxels, (batch, max_len + 1), generator=g)
        self.energy = torch.randint(0, tok.n_bins, (batch, max_len + 1), generator=g)
        self.cond = fixed_length(model, torch.rand(batch, generator=g) * 2 - 1, max_len)
        self.class_id = torch.zeros(batch, dtype=torch.long) if class_id is None else class_id
        self.routing = model.routing(self.class_id)
        self.decoder: StaticDecoder | None = None
        self.decoder_cache: object = None
        self.u = torch.rand(batch, N_UNIFORMS, dtype=torch.float64, generator=g)
        # the voxels a shower has, as generation keeps them (a head may read them: occupancy)
        unique = model.config.exclude_used_voxels
        self.used = torch.zeros(batch, tok.n_voxels, dtype=torch.bool) if unique else None
        n_layers = model.detector.n_layers
        self.layer_mev = torch.zeros(batch, n_layers) if model.config.layer_energy else None
        self.centre_sums = torch.zeros(batch, 3) if model.config.centre_pull else None
        self.sampling = SamplingConfig()
        self.max_len = max_len
        # the engine as generation runs it on a CPU; packing the heads is the caller's choice
        self.engine = replace(EngineConfig.for_device(engine, "cpu"), prepack=False)

    def sample(self, h: torch.Tensor, prefix: int) -> None:
        """Both tokens from the last block's output ``h`` (B, 1, d), and the stop check."""
        s, e = self.model.next_tokens(
            h[:, -1],
            self.routing,
            self.u,
            self.used,
            self.energy[:, prefix],
            1.0,
            shift=self.model.energy_shift(self.cond),
            layer_mev=self.layer_mev,
            centre_sums=self.centre_sums,
        )
        done = (s == self.model.tokenizer.spatial_eos) | (e == self.model.tokenizer.energy_eos)
        bool(done.all())

    def setup_cache(self) -> None:
        """A fresh cache, its conditions set by a first step (later steps' timings reuse it)."""
        self.model.setup_cache(self.batch, self.max_len + 1)
        with torch.no_grad():
            self.model.hidden_states(
                self.spatial[:, :1], self.energy[:, :1], self.cond, self.routing, start=0
            )

    def kv(self, prefix: int) -> Callable[[], None]:
        """The static decode step (``calofm.generation.decoder``, run by the runner's engine)
        that feeds token ``prefix`` against a cache holding the conditions and tokens
        0..prefix-1."""
        cache = self.model.blocks[0].attn.kv_cache
        if self.decoder is None or cache is not self.decoder_cache:
            self.decoder = StaticDecoder(
                self.model, self.class_id, self.sampling, self.max_len, self.engine
            )
            self.decoder.__enter__()  # the model's cache; cleared by the next clear_cache
            self.decoder_cache = self.model.blocks[0].attn.kv_cache
            uniforms = self.u[:, None, :].expand(-1, self.max_len + 1, -1)
            self.decoder.load(np.arange(self.batch), self.cond, uniforms)
        dec = self.decoder

        def step() -> None:
            dec.pos.fill_(prefix + 1)
            dec.done.fill_(False)
            with torch.no_grad():
                dec._run(prefix + 2)
            bool(dec.done.all())  # the host's look (every step here, every few in decode)

        return step

    def recompute(self, prefix: int) -> Callable[[], None]:
        """The step that recomputes all ``prefix + 1`` tokens, heads on the last only."""
        self.model.clear_cache()
        s, e = self.spatial[:, : prefix + 1], self.energy[:, : prefix + 1]

        def step() -> None:
            with torch.no_grad():
                h = self.model.hidden_states(s, e, self.cond, self.routing)[-1][:, -1:]
                self.sample(h, prefix)

        return step
