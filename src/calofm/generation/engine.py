"""Batched autoregressive generation of showers with the static KV cache.

A batch keeps its size for the whole run: a row that has finished (either head emitted EOS) goes on
being computed but its tokens are no longer recorded, so every decode step has the same shapes
(ready for CUDA graphs / torch.compile later). The loop ends when every row has finished, or after
``max_hits`` hits: a shower that reaches ``max_hits`` hits without EOS keeps those hits and is
counted as truncated in the statistics (never silently cut).

A model with shower totals (``ModelConfig.totals``) first draws each shower's hit count and
visible energy; the shower then ends at exactly that hit count (end-of-sequence is masked before it
and forced at it), and its cell energies are scaled so that they sum to the drawn visible energy.

Reproducibility: row ``r`` (counted from ``first_row``) draws all its randomness (four uniforms
per step, and the energies inside their bins) from its own stream
``seeded_rng(seed, ROWS, r)``, and its totals from ``seeded_rng(seed, TOTALS, r)``, so a shower
depends on the seed and its row number, not on the batch size or the other rows (up to float
round-off in batched matrix products).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from calofm.data.showers import SparseShowers, concatenate
from calofm.errors import CalofmError
from calofm.generation.sampler import SamplingConfig
from calofm.model.conditions import Conditions
from calofm.model.config import parse_class
from calofm.model.totals import from_point
from calofm.model.transformer import CaloFM
from calofm.tokens import Tokenizer

# Independent random streams derived from one seed (SeedSequence spawn keys).
ROWS, INCIDENT, TOTALS = 0, 1, 2


def seeded_rng(seed: int, *key: int) -> np.random.Generator:
    """The random stream of ``seed`` for ``key``, e.g. (ROWS, r) for row r, (INCIDENT,)."""
    if seed < 0:
        raise CalofmError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=key))


@dataclass
class DecodedBatch:
    """Hit tokens of one batch: row i has ``n_hits[i]`` hits in ``spatial[i]``, ``energy[i]``."""

    spatial: np.ndarray  # (B, max_hits) int64, PAD after the last hit
    energy: np.ndarray  # (B, max_hits) int64
    n_hits: np.ndarray  # (B,) int64
    truncated: np.ndarray  # (B,) bool, reached max_hits without EOS
    steps: int  # decode steps run


# Uniforms per row and decode step: layer, x, y (a flat voxel head uses the first) and energy.
N_UNIFORMS = 4


@torch.no_grad()
def decode(
    model: CaloFM,
    cond: Conditions | torch.Tensor,
    class_id: torch.Tensor,
    sampling: SamplingConfig,
    max_hits: int,
    uniforms: torch.Tensor | None,
    use_cache: bool = True,
) -> DecodedBatch:
    """Generate one batch of token sequences.

    ``cond``: the conditions, or a bare (B,) tensor of scaled incident energies; where it carries
    shower totals, row i ends after exactly ``cond.n_hits[i]`` hits (at most ``max_hits``).
    ``uniforms`` (B, max_hits + 1, N_UNIFORMS) float64 (None for greedy decoding). ``use_cache=False`` recomputes the whole prefix at every
    step (the reference for tests and benchmarks; only the last position goes through the heads).
    A voxel is never drawn twice when the model was trained so (``exclude_used_voxels``) or when
    ``sampling.unique_voxels`` asks for it.
    """
    tok = model.tokenizer
    cond = Conditions.of(cond)
    b, dev = len(cond), cond.incident.device
    routing = model.routing(class_id)
    stop_at = cond.n_hits if cond.has_totals else None
    seq_s = torch.full((b, max_hits + 1), tok.spatial_pad, dtype=torch.long, device=dev)
    seq_e = torch.full((b, max_hits + 1), tok.energy_pad, dtype=torch.long, device=dev)
    seq_s[:, 0], seq_e[:, 0] = tok.spatial_sos, tok.energy_sos
    done = torch.zeros(b, dtype=torch.bool, device=dev)
    n_hits = torch.zeros(b, dtype=torch.long, device=dev)
    rows = torch.arange(b, device=dev)
    unique = model.config.exclude_used_voxels or sampling.unique_voxels
    used = torch.zeros(b, tok.n_voxels, dtype=torch.bool, device=dev) if unique else None

    def last_hidden(step: int) -> torch.Tensor:
        if use_cache:
            s, e = seq_s[:, step : step + 1], seq_e[:, step : step + 1]
            h = model.hidden_states(s, e, cond if step == 0 else None, routing, start=step)
        else:
            h = model.hidden_states(seq_s[:, : step + 1], seq_e[:, : step + 1], cond, routing)
        return h[-1][:, -1]

    if use_cache:
        model.setup_cache(b, max_hits + 1, device=dev)
    try:
        steps = 0
        for step in range(max_hits + 1):
            h = last_hidden(step)
            steps += 1
            at_end = None if stop_at is None else n_hits >= stop_at
            s, e = model.next_tokens(
                h,
                routing,
                None if uniforms is None else uniforms[:, step],
                used,
                seq_e[:, step],
                sampling.temperature_at(step, max_hits),
                sampling.top_k,
                sampling.top_p,
                at_end,
            )
            if at_end is not None:
                s = torch.where(at_end, tok.spatial_eos, s)
            done |= (s == tok.spatial_eos) | (e == tok.energy_eos)
            if step == max_hits or bool(done.all()):
                break
            if used is not None:
                used[rows, s.clamp(max=tok.n_voxels - 1)] |= ~done
            seq_s[:, step + 1] = torch.where(done, tok.spatial_pad, s)
            seq_e[:, step + 1] = torch.where(done, tok.energy_pad, e)
            n_hits += (~done).long()
    finally:
        model.clear_cache()
    width = int(n_hits.max()) if b else 0
    return DecodedBatch(
        spatial=seq_s[:, 1 : 1 + width].cpu().numpy(),
        energy=seq_e[:, 1 : 1 + width].cpu().numpy(),
        n_hits=n_hits.cpu().numpy(),
        truncated=(~done).cpu().numpy(),
        steps=steps,
    )


def _class_rows(model: CaloFM, classes: str | Sequence[str], n: int) -> list[str]:
    per_row = [classes] * n if isinstance(classes, str) else list(classes)
    if len(per_row) != n:
        raise CalofmError(f"generate: {len(per_row)} class names for {n} incident energies")
    for name in dict.fromkeys(per_row):
        model.class_index(name)
    return per_row


@torch.no_grad()
def generate(
    model: CaloFM,
    classes: str | Sequence[str],
    incident_gev: np.ndarray,
    *,
    seed: int,
    batch_size: int = 128,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    dynamic_temperature: tuple[float, float] | None = None,
    unique_voxels: bool = False,
    max_hits: int | None = None,
    device: str | torch.device | None = None,
    first_row: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, SparseShowers], dict]:
    """Generate one shower per incident energy; ``classes`` is one class name or one per row.

    Returns the showers of each class (rows in input order) and statistics: hits generated,
    duplicate voxels merged, showers truncated at ``max_hits``, speed. ``first_row`` numbers the
    rows for seeding, so generating rows in several calls gives the same showers as one call.
    """
    incident_gev = np.asarray(incident_gev, dtype=np.float32).reshape(-1)
    n = len(incident_gev)
    if n == 0:
        raise CalofmError("generate: no incident energies given")
    per_row = _class_rows(model, classes, n)
    if batch_size <= 0:
        raise CalofmError(f"generate: batch size must be at least 1, got {batch_size}")
    max_hits = model.tokenizer.max_hits if max_hits is None else max_hits
    if max_hits <= 0:
        raise CalofmError(f"generate: max hits must be at least 1, got {max_hits}")
    if not np.all(np.isfinite(incident_gev)) or np.any(incident_gev <= 0):
        raise CalofmError("generate: incident energies must be positive and finite")
    sampling = SamplingConfig(temperature, dynamic_temperature, top_k, top_p, unique_voxels)
    if device is not None:
        model.to(device)
    dev = model.energy_head.weight.device
    model.eval()
    tokenizer = Tokenizer(model.tokenizer)
    scaled = tokenizer.scale_incident(incident_gev)
    class_ids = np.array([model.class_index(c) for c in per_row])

    parts: dict[str, list[SparseShowers]] = {c: [] for c in dict.fromkeys(per_row)}
    stats = dict(n_showers=n, n_hits=0, n_duplicates=0, n_truncated=0, steps=0, max_hits=max_hits)
    scales: list[float] = []  # drawn over decoded visible energy, per shower with totals
    t0 = time.perf_counter()
    for start in range(0, n, batch_size):
        rows = range(start, min(start + batch_size, n))
        rngs = [seeded_rng(seed, ROWS, first_row + r) for r in rows]
        uniforms = None
        if not sampling.greedy:
            draws = np.stack([g.random((max_hits + 1, N_UNIFORMS)) for g in rngs])
            uniforms = torch.from_numpy(draws).to(dev)
        class_id = torch.from_numpy(class_ids[rows.start : rows.stop]).to(dev)
        cond = Conditions(torch.from_numpy(scaled[rows.start : rows.stop]).to(dev))
        visible = None
        if model.totals is not None:
            u = np.stack([seeded_rng(seed, TOTALS, first_row + r).random(3) for r in rows])
            point = model.totals.sample(
                cond.features(model.energy_head.weight.dtype),
                model.routing(class_id),
                torch.from_numpy(u).to(dev),
            )
            cond = cond.with_totals(*from_point(point, max_hits))
            visible = cond.visible.cpu().numpy()
        out = decode(model, cond, class_id, sampling, max_hits, uniforms)
        stats["steps"] += out.steps
        stats["n_truncated"] += int(out.truncated.sum())
        for i, r in enumerate(rows):
            k = int(out.n_hits[i])
            material, particle = parse_class(per_row[r])
            showers, n_dup = tokenizer.decode(
                [out.spatial[i, :k]],
                [out.energy[i, :k]],
                incident_gev[r : r + 1],
                model.detector.with_material(material),
                particle,
                rngs[i],
            )
            if visible is not None and k:  # the drawn visible energy, exactly
                scale = visible[i] / showers.energies.sum(dtype=np.float64)
                showers.energies *= np.float32(scale)
                scales.append(scale)
            parts[per_row[r]].append(showers)
            stats["n_hits"] += k
            stats["n_duplicates"] += n_dup
        if progress is not None:
            progress(len(rows))
    seconds = time.perf_counter() - t0
    stats.update(
        seconds=seconds,
        duplicate_rate=stats["n_duplicates"] / max(stats["n_hits"], 1),
        showers_per_s=n / seconds if seconds > 0 else float("inf"),
        hits_per_s=stats["n_hits"] / seconds if seconds > 0 else float("inf"),
        sampling=sampling.to_dict(),
    )
    if scales:  # how far the hits' own energies were from the drawn visible energy
        stats["visible_scale_quantiles"] = np.quantile(scales, [0.05, 0.5, 0.95]).tolist()
    return {c: concatenate(p) for c, p in parts.items()}, stats
