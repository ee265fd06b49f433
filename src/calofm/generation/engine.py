"""Batched autoregressive generation of showers with the static KV cache.

Decoding runs on the static decode step (``calofm.generation.decoder``): every step has the same
shapes, finished rows are masked, not removed, and the host looks at the batch every few steps. A
shower ends when a head emits EOS, or after ``max_hits`` hits: a shower that reaches ``max_hits``
hits without EOS keeps those hits and is counted as truncated in the statistics (never silently
cut). With continuous batching (the default of ``generate``) a finished shower's slot takes the
next shower, so long showers do not hold a whole batch back.

A model with shower totals (``ModelConfig.totals``) first draws each shower's hit count and
visible energy; the shower then ends at exactly that hit count (end-of-sequence is masked before it
and forced at it), and its cell energies above the hit threshold are scaled so that they sum to the
drawn visible energy (``match_visible``: every hit stays a hit). Knowing every length in advance,
the showers are decoded longest first, so that those side by side end together.

Reproducibility: row ``r`` (counted from ``first_row``) draws all its randomness (four uniforms
per step, and the energies inside their bins) from its own stream
``seeded_rng(seed, ROWS, r)``, and its totals from ``seeded_rng(seed, TOTALS, r)``, so a shower
depends on the seed and its row number, not on the batch size, the other rows, its slot or when
it started (up to float round-off in batched matrix products).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from calofm.data.showers import SparseShowers, concatenate
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.generation.decoder import N_UNIFORMS, EngineConfig, StaticDecoder
from calofm.generation.sampler import SamplingConfig
from calofm.model.conditions import Conditions
from calofm.model.config import parse_class
from calofm.model.totals import from_point, match_visible
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
    steps: int  # draws of the longest shower: its hits and one more (EOS, or past max_hits)
    engine_steps: int = 0  # decode steps the engine ran (the conditions token, checks included)


__all__ = ["N_UNIFORMS", "DecodedBatch", "EngineConfig", "decode", "generate", "seeded_rng"]


@torch.no_grad()
def decode(
    model: CaloFM,
    cond: Conditions | torch.Tensor,
    class_id: torch.Tensor,
    sampling: SamplingConfig,
    max_hits: int,
    uniforms: torch.Tensor | None,
    use_cache: bool = True,
    engine: EngineConfig | None = None,
) -> DecodedBatch:
    """Generate one batch of token sequences, all rows started together.

    ``cond``: the conditions, or a bare (B,) tensor of scaled incident energies; where it carries
    shower totals, row i ends after exactly ``cond.n_hits[i]`` hits (at most ``max_hits``).
    ``uniforms`` (B, max_hits + 1, N_UNIFORMS) float64 (None for greedy decoding). With the cache
    the static decode step runs on ``engine`` (default: eager); ``use_cache=False`` recomputes the
    whole prefix at every step instead (the reference for tests and benchmarks; only the last
    position goes through the heads). A voxel is never drawn twice when the model was trained so
    (``exclude_used_voxels``) or when ``sampling.unique_voxels`` asks for it.
    """
    cond = Conditions.of(cond)
    if not use_cache:
        return _decode_recomputing(model, cond, class_id, sampling, max_hits, uniforms)
    b = len(cond)
    with StaticDecoder(model, class_id, sampling, max_hits, engine) as dec:
        dec.load(np.arange(b), cond, uniforms)
        parts = []
        while dec.busy():
            dec.run(dec.config.check_every)
            parts.append(dec.finished())
    order = np.argsort(np.concatenate([p.slots for p in parts]))
    n_hits = np.concatenate([p.n_hits for p in parts])[order]
    truncated = np.concatenate([p.truncated for p in parts])[order]
    width = int(n_hits.max()) if b else 0
    return DecodedBatch(
        spatial=np.concatenate([p.spatial for p in parts])[order, :width],
        energy=np.concatenate([p.energy for p in parts])[order, :width],
        n_hits=n_hits,
        truncated=truncated,
        steps=int(n_hits.max()) + 1 if b else 0,
        engine_steps=dec.steps,
    )


def _decode_recomputing(
    model: CaloFM,
    cond: Conditions,
    class_id: torch.Tensor,
    sampling: SamplingConfig,
    max_hits: int,
    uniforms: torch.Tensor | None,
) -> DecodedBatch:
    """``decode`` without a cache: the whole prefix through the model at every step."""
    tok = model.tokenizer
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
    steps = 0
    layer_energy = model.config.layer_energy
    for step in range(max_hits + 1):
        hidden = model.hidden_states(seq_s[:, : step + 1], seq_e[:, : step + 1], cond, routing)
        steps += 1
        at_end = None if stop_at is None else n_hits >= stop_at
        s, e = model.next_tokens(
            hidden[-1][:, -1],
            routing,
            None if uniforms is None else uniforms[:, step],
            used,
            seq_e[:, step],
            sampling.temperature_at(step, max_hits),
            sampling.top_k,
            sampling.top_p,
            at_end,
            model.energy_shift(cond),
            model.layer_mev(seq_s[:, : step + 1], seq_e[:, : step + 1])[:, -1]
            if layer_energy
            else None,
            model.centre_sums(seq_s[:, : step + 1], seq_e[:, : step + 1])[:, -1]
            if model.config.centre_pull
            else None,
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
    width = int(n_hits.max()) if b else 0
    return DecodedBatch(
        spatial=seq_s[:, 1 : 1 + width].cpu().numpy(),
        energy=seq_e[:, 1 : 1 + width].cpu().numpy(),
        n_hits=n_hits.cpu().numpy(),
        truncated=(~done).cpu().numpy(),
        steps=steps,
        engine_steps=steps,
    )


@torch.no_grad()
def draw_totals(
    model: CaloFM, cond: Conditions, class_id: int, u: np.ndarray, max_hits: int
) -> Conditions:
    """``cond`` with each row's hit count and visible energy drawn from the class's totals model,
    from the row's uniforms ``u`` (B, 3). Row by row: a batched product rounds differently with
    the batch, and a shower must not depend on the showers drawn beside it."""
    assert model.totals is not None
    features = cond.features(model.energy_head.weight.dtype)
    routing = model.routing(torch.tensor([class_id], device=features.device))
    uniforms = torch.from_numpy(u).to(features.device)
    points = [
        model.totals.sample(features[i : i + 1], routing, uniforms[i : i + 1])
        for i in range(len(u))
    ]
    return cond.with_totals(*from_point(torch.cat(points), max_hits))


@contextmanager
def _borrowed(model: CaloFM, device: str | torch.device | None) -> Iterator[torch.device]:
    """``model`` in eval mode (and on ``device``, if given) inside the block; after it, back in
    the caller's mode and on the caller's device."""
    was_training = model.training
    home = model.energy_head.weight.device
    if device is not None:
        model.to(device)
    model.eval()
    try:
        yield model.energy_head.weight.device
    finally:
        model.train(was_training)
        model.to(home)


@dataclass
class _ClassSlots:
    """One class's rows in ``generate``: its block of slots, conditions and queue of rows left."""

    rows: np.ndarray  # the class's row numbers
    slots: np.ndarray  # its block of decoder slots
    class_id: int
    cond: Conditions  # of ``rows``, totals drawn
    queue: list[int]  # positions in ``rows`` still to decode, in order
    detector: DetectorConfig
    particle: str


def _slot_shares(per_row: list[str], batch_size: int) -> dict[str, int]:
    """Slots of each class (in order of first appearance): ``batch_size`` shared by the classes'
    numbers of rows, at least one each and never more than a class has rows."""
    counts = {name: per_row.count(name) for name in dict.fromkeys(per_row)}
    n = len(per_row)
    return {c: min(k, max(1, batch_size * k // n)) for c, k in counts.items()}


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
    continuous: bool = True,
    engine: EngineConfig | None = None,
) -> tuple[dict[str, SparseShowers], dict]:
    """Generate one shower per incident energy; ``classes`` is one class name or one per row.

    Returns the showers of each class (rows in input order) and statistics: hits generated,
    duplicate voxels merged, showers truncated at ``max_hits``, speed, KV-cache bytes per shower.
    ``first_row`` numbers the rows for seeding, so generating rows in several calls gives the same
    showers as one call. All classes are decoded together in ``batch_size`` slots, each class in
    its own block (a share by its number of rows, at least one slot); ``continuous`` refills a
    slot as soon as its shower ends, otherwise a class's block restarts when all of its showers
    have ended.
    The model runs in eval mode, on ``device`` if given; it is left in its mode and on its device.
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
    with _borrowed(model, device) as dev:
        tokenizer = Tokenizer(model.tokenizer)
        threshold = model.tokenizer.threshold_mev
        scaled = tokenizer.scale_incident(incident_gev)
        class_ids = np.array([model.class_index(c) for c in per_row])

        showers: dict[int, SparseShowers] = {}
        stats = dict(
            n_showers=n, n_hits=0, n_duplicates=0, n_truncated=0, steps=0, max_hits=max_hits
        )
        scales: list[float] = []  # drawn over decoded visible energy, per shower with totals
        t0 = time.perf_counter()
        rngs: dict[int, np.random.Generator] = {}  # of the showers being decoded
        visible: dict[int, float] = {}  # their drawn visible energies (models with totals)

        def start(
            slots: np.ndarray, todo: np.ndarray, cond: Conditions, dec: StaticDecoder
        ) -> None:
            """Load the showers of rows ``todo``, conditions ``cond``, into ``slots``."""
            for r in todo:
                rngs[r] = seeded_rng(seed, ROWS, first_row + r)
            uniforms = None
            if not sampling.greedy:
                draws = np.stack([rngs[r].random((max_hits + 1, N_UNIFORMS)) for r in todo])
                uniforms = torch.from_numpy(draws)
            dec.load(slots, cond, uniforms)

        # Every class in one batch, each in its own block of slots (a share of ``batch_size``
        # by its number of rows, at least one) refilled from its own queue: one step serves all
        # classes, so a step's fixed cost is paid once, and a block's routing never changes.
        groups: list[_ClassSlots] = []
        for name, share in _slot_shares(per_row, batch_size).items():
            rows = np.array([r for r in range(n) if per_row[r] == name])
            first = sum(len(g.slots) for g in groups)
            cond = Conditions(torch.from_numpy(scaled[rows]).to(dev))
            queue = list(range(len(rows)))  # positions in ``rows``
            if model.totals is not None:
                u = np.stack([seeded_rng(seed, TOTALS, first_row + r).random(3) for r in rows])
                cond = draw_totals(model, cond, int(class_ids[rows[0]]), u, max_hits)
                visible.update(zip(rows.tolist(), cond.visible.cpu().tolist(), strict=True))
                # Longest first: the showers decoded side by side then end together, and attention
                # covers the positions they have reached, not those of one long straggler.
                queue = np.argsort(-cond.n_hits.cpu().numpy(), kind="stable").tolist()
            material, particle = parse_class(name)
            groups.append(
                _ClassSlots(
                    rows,
                    np.arange(first, first + share),
                    int(class_ids[rows[0]]),
                    cond,
                    queue,
                    model.detector.with_material(material),
                    particle,
                )
            )
        class_id = torch.tensor(
            [g.class_id for g in groups for _ in g.slots], dtype=torch.long, device=dev
        )
        slot_row = np.full(len(class_id), -1)
        slot_group = np.concatenate([np.full(len(g.slots), i) for i, g in enumerate(groups)])
        with StaticDecoder(model, class_id, sampling, max_hits, engine) as dec:
            stats["kv_cache_bytes_per_shower"] = dec.kv_cache_bytes_per_shower()
            while any(g.queue for g in groups) or dec.busy():
                for g in groups:
                    free = g.slots[slot_row[g.slots] < 0]
                    if g.queue and len(free) and (continuous or len(free) == len(g.slots)):
                        picked = np.array(g.queue[: len(free)])
                        del g.queue[: len(picked)]
                        todo = g.rows[picked]
                        start(free[: len(todo)], todo, g.cond[torch.from_numpy(picked)], dec)
                        slot_row[free[: len(todo)]] = todo
                dec.run(dec.config.check_every)
                out = dec.finished()
                for i, slot in enumerate(out.slots):
                    r, k, g = int(slot_row[slot]), int(out.n_hits[i]), groups[slot_group[slot]]
                    slot_row[slot] = -1
                    one, n_dup = tokenizer.decode(
                        [out.spatial[i, :k]],
                        [out.energy[i, :k]],
                        incident_gev[r : r + 1],
                        g.detector,
                        g.particle,
                        rngs.pop(r),
                    )
                    if r in visible and k:  # the drawn visible energy, exactly
                        target = visible.pop(r)
                        scales.append(target / one.energies.sum(dtype=np.float64))
                        one.energies[:] = match_visible(one.energies, target, threshold)
                    showers[r] = one
                    stats["n_hits"] += k
                    stats["n_duplicates"] += n_dup
                    stats["n_truncated"] += int(out.truncated[i])
                if progress is not None and len(out.slots):
                    progress(len(out.slots))
            stats["steps"] = dec.steps
        seconds = time.perf_counter() - t0
        stats.update(
            seconds=seconds,
            duplicate_rate=stats["n_duplicates"] / max(stats["n_hits"], 1),
            showers_per_s=n / seconds if seconds > 0 else float("inf"),
            hits_per_s=stats["n_hits"] / seconds if seconds > 0 else float("inf"),
            sampling=sampling.to_dict(),
            engine=(engine or EngineConfig()).engine,
            continuous=continuous,
        )
        if scales:  # how far the hits' own energies were from the drawn visible energy
            stats["visible_scale_quantiles"] = np.quantile(scales, [0.05, 0.5, 0.95]).tolist()
        return {
            c: concatenate([showers[r] for r in range(n) if per_row[r] == c])
            for c in dict.fromkeys(per_row)
        }, stats
