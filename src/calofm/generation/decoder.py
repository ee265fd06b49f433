"""The static decode step: fixed shapes, no host synchronisation, rows at their own positions.

A ``StaticDecoder`` owns a batch of ``slots``. Each slot decodes one shower: at hidden position 0
it feeds the conditions token, then SOS and the hits drawn so far, one position per step; its
KV-cache rows, uniforms, voxels used and tokens live in buffers allocated once. A step reads and
writes only those buffers (the position is a tensor, RoPE comes from a precomputed table, the
attention covers a fixed window of the cache with a per-row mask, the stop decision is a tensor),
so one step can be

- run eagerly (``engine="eager"``, the reference),
- captured once per attention window and replayed (``engine="graphs"``, CUDA only),
- compiled (``engine="compile"``, ``torch.compile``).

``precision`` "bf16" or "fp16" runs the model's matrix products of a step under autocast in that
type; RoPE, the attention scores and their softmax, the KV cache and the sampling stay in fp32
(``calofm.model.attention``). Whether a reduced precision distorts showers is measured on the
evaluation metrics (docs/results.md) before anyone relies on it; fp32 is the default.

The host looks at the slots only every ``check_every`` steps: finished slots are read out and,
with continuous batching, loaded with the next showers while the others go on. A finished slot
stops advancing, so the steps it runs until the next check change nothing. Rows draw their
randomness from their own uniforms, so a shower does not depend on its slot, its batch or when it
was loaded.

The window (how many cache positions attention covers) is the longest position any slot can have
reached, rounded up to ``window_step``: 1 on a CPU (the work grows with the length written, as
without padding; a compiled step's window is symbolic after its first change); a multiple of 64
for graphs and compilation on CUDA, so that a few captured graphs or compiled kernels serve every
length.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from calofm.errors import CalofmError
from calofm.generation.sampler import SamplingConfig
from calofm.model.conditions import Conditions
from calofm.model.linear import prepacked
from calofm.model.transformer import CaloFM

ENGINES = ("eager", "compile", "graphs")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# Uniforms per row and decode step: layer, x, y (a flat voxel head uses the first) and energy.
N_UNIFORMS = 4


@dataclass(frozen=True)
class EngineConfig:
    """How decode steps run; ``resolve`` fills the defaults for a device."""

    engine: str = "eager"
    check_every: int = 8  # steps between two looks of the host at the slots
    window_step: int = 1  # attention window rounded up to a multiple of this
    prepack: bool = True  # oneDNN-packed weights of the large heads on a CPU (fp32 only)
    precision: str = "fp32"  # the matrix products' type (see the module's docstring)

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise CalofmError(f"unknown decode engine {self.engine!r}; choose one of {ENGINES}")
        if self.precision not in PRECISIONS:
            raise CalofmError(
                f"unknown decode precision {self.precision!r}; choose one of {list(PRECISIONS)}"
            )
        if self.check_every <= 0 or self.window_step <= 0:
            raise CalofmError("decode engine: check_every and window_step must be positive")

    @classmethod
    def for_device(
        cls, engine: str, device: torch.device | str, precision: str = "fp32"
    ) -> EngineConfig:
        """The engine's settings: graphs need CUDA and use windows of 64 (one graph each), as
        compiled steps on CUDA do; a compiled step on a CPU covers exact windows (its window turns
        symbolic: one compilation serves every length; 1.24x eager there, windows of 64 1.15x)."""
        cuda = torch.device(device).type == "cuda"
        if engine == "graphs" and not cuda:
            raise CalofmError("decode engine 'graphs' needs a CUDA device")
        exact = engine == "eager" or (engine == "compile" and not cuda)
        return cls(engine=engine, window_step=1 if exact else 64, precision=precision)


@dataclass
class Finished:
    """Showers read out of their slots: tokens, hit counts, truncation (reached max_hits)."""

    slots: np.ndarray  # (k,) slot indices
    spatial: np.ndarray  # (k, max_hits) int64, PAD after the last hit
    energy: np.ndarray  # (k, max_hits) int64
    n_hits: np.ndarray  # (k,) int64
    truncated: np.ndarray  # (k,) bool


class StaticDecoder:
    """Slots decoding showers with one static step (module docstring). Use as a context manager:
    it sets up the model's KV cache (and prepacked heads) on entry and clears them on exit."""

    def __init__(
        self,
        model: CaloFM,
        class_id: torch.Tensor,
        sampling: SamplingConfig,
        max_hits: int,
        engine: EngineConfig | None = None,
    ):
        self.model, self.sampling, self.max_hits = model, sampling, max_hits
        self.config = engine or EngineConfig()
        tok = model.tokenizer
        dev = model.energy_head.weight.device
        b = len(class_id)
        self.n_slots, self.device = b, dev
        self.routing = model.routing(class_id.to(dev))
        self.max_len = max_hits + 2  # the conditions token, SOS and max_hits hits
        long = dict(dtype=torch.long, device=dev)
        self.rows = torch.arange(b, device=dev)
        self.keys = torch.arange(self.max_len, device=dev)
        cos, sin = model.rope(self.keys)
        self.cos, self.sin = cos, sin
        # Per-slot state, updated in place by the step.
        self.pos = torch.zeros(b, **long)
        self.spatial = torch.full((b,), tok.spatial_sos, **long)  # the token fed next
        self.energy = torch.full((b,), tok.energy_sos, **long)
        self.done = torch.ones(b, dtype=torch.bool, device=dev)  # empty slots count as done
        self.truncated = torch.zeros(b, dtype=torch.bool, device=dev)
        self.n_hits = torch.zeros(b, **long)
        self.out_s = torch.full((b, max_hits + 2), tok.spatial_pad, **long)
        self.out_e = torch.full((b, max_hits + 2), tok.energy_pad, **long)
        unique = model.config.exclude_used_voxels or sampling.unique_voxels
        self.used = torch.zeros(b, tok.n_voxels, dtype=torch.bool, device=dev) if unique else None
        n_layers = model.detector.n_layers  # each row's energy per layer (layer_energy)
        self.layer_mev = torch.zeros(b, n_layers, device=dev) if model.config.layer_energy else None
        # each row's energy and its moments in x and y (centre_pull)
        self.centre_sums = torch.zeros(b, 3, device=dev) if model.config.centre_pull else None
        self.greedy = sampling.greedy
        self.uniforms = (
            None
            if self.greedy
            else torch.zeros(b, max_hits + 1, N_UNIFORMS, dtype=torch.float64, device=dev)
        )
        self.totals = model.config.totals
        zeros = torch.zeros(b, device=dev)
        self.cond = Conditions(
            zeros.clone(),
            torch.zeros(b, **long) if self.totals else None,
            zeros.clone() if self.totals else None,
        )
        self.host_pos = np.full(b, -1)  # an upper bound of each slot's position (-1: empty)
        self.steps = 0
        self._run = self._runner()
        self._pack = None

    # ---- set-up ---------------------------------------------------------------------------------

    def __enter__(self) -> StaticDecoder:
        # One position to spare, so that no window covers the whole cache: a slice of all of it
        # is contiguous, and a compiled step would be compiled again for that one case.
        self.model.setup_cache(self.n_slots, self.max_hits + 2, device=self.device)
        if self.config.prepack and self.config.precision == "fp32":
            self._pack = prepacked(self.model, self.n_slots)
            self._pack.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pack is not None:
            self._pack.__exit__(None, None, None)
            self._pack = None
        self.model.clear_cache()

    def load(self, slots: np.ndarray, cond: Conditions, uniforms: torch.Tensor | None) -> None:
        """Start new showers in ``slots`` (empty or finished and read out) with their conditions
        (k rows) and uniforms (k, >= max_hits + 1, N_UNIFORMS) (None when greedy)."""
        tok = self.model.tokenizer
        idx = torch.as_tensor(slots, device=self.device)
        self.cond.incident[idx] = cond.incident.to(self.device, self.cond.incident.dtype)
        if self.totals:
            if not cond.has_totals:
                raise CalofmError("decode: a model with shower totals needs them in the conditions")
            self.cond.n_hits[idx] = cond.n_hits.to(self.device)
            self.cond.visible[idx] = cond.visible.to(self.device, self.cond.visible.dtype)
        if self.uniforms is not None:
            if uniforms is None:
                raise CalofmError("decode: sampling needs uniforms")
            self.uniforms[idx] = uniforms[:, : self.max_hits + 1].to(self.device)
        self.pos[idx] = 0
        self.spatial[idx], self.energy[idx] = tok.spatial_sos, tok.energy_sos
        self.done[idx] = False
        self.truncated[idx] = False
        self.n_hits[idx] = 0
        self.out_s[idx], self.out_e[idx] = tok.spatial_pad, tok.energy_pad
        if self.used is not None:
            self.used[idx] = False
        if self.layer_mev is not None:
            self.layer_mev[idx] = 0.0
        if self.centre_sums is not None:
            self.centre_sums[idx] = 0.0
        self.host_pos[slots] = 0

    # ---- the step -------------------------------------------------------------------------------

    def _temperature(self, hit: torch.Tensor) -> float | torch.Tensor:
        """The temperature for each row's next hit: a number, or (B, 1) when it changes."""
        s = self.sampling
        if s.dynamic_temperature is None:
            return s.temperature
        lo, hi = s.dynamic_temperature
        frac = hit.clamp(max=self.max_hits).to(torch.float32) / max(self.max_hits, 1)
        return (lo + (hi - lo) * frac)[:, None]

    def _precision(self) -> contextlib.AbstractContextManager:
        dtype = PRECISIONS[self.config.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    def _step(self, window: int) -> None:
        """One step of every slot; reads and writes only the decoder's buffers."""
        model, tok, s = self.model, self.model.tokenizer, self.sampling
        pos = self.pos
        rope = (self.cos[pos][:, None, None, :], self.sin[pos][:, None, None, :])
        mask = (self.keys[:window] <= pos[:, None])[:, None, None, :]
        hit = (pos - 1).clamp(min=0)  # the hit this step draws, counted from 0
        u = None if self.uniforms is None else self.uniforms[self.rows, hit]
        at_end = self.n_hits >= self.cond.n_hits if self.totals else None
        with self._precision():
            h = model.decode_step(
                self.spatial, self.energy, pos, self.cond, self.routing, rope, mask
            )
            sp, en = model.next_tokens(
                h,
                self.routing,
                u,
                self.used,
                self.energy,
                self._temperature(hit),
                s.top_k,
                s.top_p,
                at_end,
                model.energy_shift(self.cond),
                self.layer_mev,
                self.centre_sums,
            )
        if at_end is not None:
            sp = torch.where(at_end, tok.spatial_eos, sp)
        live = (pos > 0) & ~self.done
        ended = (sp == tok.spatial_eos) | (en == tok.energy_eos)
        last = hit >= self.max_hits
        record = live & ~ended & ~last
        self.truncated |= live & ~ended & last
        self.done |= live & (ended | last)
        slot = hit + 1
        self.out_s[self.rows, slot] = torch.where(record, sp, tok.spatial_pad)
        self.out_e[self.rows, slot] = torch.where(record, en, tok.energy_pad)
        if self.used is not None:
            self.used[self.rows, sp.clamp(max=tok.n_voxels - 1)] |= record
        if self.layer_mev is not None:
            layer = model.geometry[sp, 0].clamp(max=self.layer_mev.shape[1] - 1)
            self.layer_mev[self.rows, layer] += torch.where(record, model.bin_mev[en], 0.0)
        if self.centre_sums is not None:
            drawn = model.centre_sums(sp[:, None], en[:, None])[:, 0]
            self.centre_sums += torch.where(record[:, None], drawn, 0.0)
        self.n_hits += record.long()
        first = pos == 0
        self.spatial.copy_(torch.where(first, tok.spatial_sos, sp))
        self.energy.copy_(torch.where(first, tok.energy_sos, en))
        self.pos.copy_(torch.where(self.done, pos, pos + 1))

    def _runner(self) -> Callable[[int], None]:
        engine = self.config.engine
        if engine == "eager":
            return self._step
        if engine == "compile":
            return torch.compile(self._step)  # the window turns symbolic at its first change
        return GraphReplay(self._step)

    def run(self, n_steps: int) -> None:
        """``n_steps`` steps of every slot, without looking at the results."""
        for _ in range(n_steps):
            reach = int(self.host_pos.max()) + 1
            step = self.config.window_step
            window = min(self.max_len, -(-reach // step) * step)
            self._run(window)
            self.steps += 1
            busy = self.host_pos >= 0
            self.host_pos[busy] = np.minimum(self.host_pos[busy] + 1, self.max_len - 1)

    # ---- the host's look ------------------------------------------------------------------------

    def finished(self) -> Finished:
        """Read out (and free) the slots whose shower has ended since the last look."""
        busy = torch.from_numpy(self.host_pos >= 0).to(self.device)
        slots = torch.nonzero(self.done & busy).flatten().cpu().numpy()  # the host sync
        idx = torch.as_tensor(slots, device=self.device)
        width = self.max_hits
        out = Finished(
            slots=slots,
            spatial=self.out_s[idx, 1 : 1 + width].cpu().numpy(),
            energy=self.out_e[idx, 1 : 1 + width].cpu().numpy(),
            n_hits=self.n_hits[idx].cpu().numpy(),
            truncated=self.truncated[idx].cpu().numpy(),
        )
        self.host_pos[slots] = -1
        return out

    def busy(self) -> int:
        """Slots holding a shower that has not been read out."""
        return int((self.host_pos >= 0).sum())

    def kv_cache_bytes_per_shower(self) -> int:
        return self.model.cache_bytes() // self.n_slots


def bytes_per_shower(model: CaloFM, max_hits: int) -> int:
    """Memory one decoding slot needs: its KV cache, both heads' logits with the sampler's
    working copies (about four of each), the voxels it used, its uniforms and tokens."""
    c, tok = model.config, model.tokenizer
    dtype_bytes = model.energy_head.weight.element_size()
    kv = 2 * c.n_blocks * c.d_model * (max_hits + 3) * dtype_bytes  # as the decoder allocates
    logits = 4 * 4 * (tok.spatial_vocab + tok.energy_vocab)
    return kv + logits + tok.n_voxels + (max_hits + 1) * N_UNIFORMS * 8 + 4 * (max_hits + 2) * 8


def free_memory(device: torch.device | str) -> int:
    """Bytes free for decoding: the GPU's free memory, or the system's available memory."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# Largest automatic batch: beyond these a CPU (memory-bound heads) or a GPU gains little.
AUTO_BATCH_MAX = {"cpu": 256, "cuda": 8192}


def auto_batch_size(model: CaloFM, max_hits: int, device: torch.device | str) -> int:
    """Slots that fit half of the free memory (at most ``AUTO_BATCH_MAX`` for the device)."""
    kind = torch.device(device).type
    fits = free_memory(device) // 2 // bytes_per_shower(model, max_hits)
    return int(max(1, min(fits, AUTO_BATCH_MAX.get(kind, AUTO_BATCH_MAX["cpu"]))))


class GraphReplay:
    """A CUDA graph of ``step`` per attention window: the first call runs it eagerly (warm-up:
    cuBLAS handles, lazy initialisation), later calls capture a window once and replay it."""

    def __init__(self, step: Callable[[int], None]):
        self.step = step
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.warm = False

    def __call__(self, window: int) -> None:
        graph = self.graphs.get(window)
        if graph is None:
            if not self.warm:
                stream = torch.cuda.Stream()
                stream.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(stream):
                    self.step(window)  # a real step, on a side stream as capture requires
                torch.cuda.current_stream().wait_stream(stream)
                self.warm = True
                return
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.step(window)  # recorded, not run
            self.graphs[window] = graph
        graph.replay()
