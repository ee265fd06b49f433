"""Token sequences for training: the dataset, the length-bucketed batch sampler and ``collate``.

Showers vary from a few dozen to about a thousand hits, so random batches would be mostly padding.
The sampler shuffles, cuts the epoch into large pools, sorts each pool by length and slices it into
batches, then shuffles the batches: padding stays small and batch order stays random. Every class
contributes equally many showers per epoch (smaller classes are repeated), so a large class cannot
drown out a small one. Under DDP every process builds the same global batches from the same seed and
takes its own share of each, so all processes run the same number of steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from calofm.data.showers import SparseShowers
from calofm.errors import CalofmError
from calofm.tokens import Tokenizer, TokenizerConfig


@dataclass
class SourceReport:
    """What encoding one class's showers changed or excluded."""

    class_name: str
    n_showers: int
    n_too_long: int
    longest: int
    n_clipped: int
    n_hits: int

    def messages(self, max_hits: int) -> list[str]:
        out = []
        if self.n_too_long:
            out.append(
                f"{self.class_name}: {self.n_too_long} of {self.n_showers} showers have more than "
                f"{max_hits} hits (longest {self.longest}) and are excluded, not truncated; "
                f"raise the tokenizer's max_hits (calofm train --max-hits {self.longest}) "
                "to keep them"
            )
        if self.n_clipped:
            out.append(
                f"{self.class_name}: {self.n_clipped} of {self.n_hits} hits lie above the top "
                "energy edge and were put into the top bin"
            )
        return out


class TokenDataset:
    """Encoded showers of one or more classes, stored flat (CSR), with a class id per shower.

    Showers longer than ``max_hits`` are left out (and counted in ``reports``): truncating them
    would teach the model to stop early.
    """

    def __init__(
        self,
        sources: list[tuple[str, SparseShowers]],
        tokenizer: Tokenizer,
        classes: list[str],
    ):
        self.config: TokenizerConfig = tokenizer.config
        self.classes = list(classes)
        self.reports: list[SourceReport] = []
        spatial, energy, lengths, incident, class_id = [], [], [], [], []
        for name, showers in sources:
            if name not in self.classes:
                raise CalofmError(f"class {name!r} is not one of {', '.join(self.classes)}")
            enc = tokenizer.encode(showers)
            keep = ~enc.too_long
            hit_keep = np.repeat(keep, enc.lengths)
            spatial.append(enc.spatial[hit_keep].astype(np.int32))
            energy.append(enc.energy[hit_keep].astype(np.int32))
            lengths.append(enc.lengths[keep])
            incident.append(enc.incident[keep])
            class_id.append(np.full(int(keep.sum()), self.classes.index(name), dtype=np.int64))
            self.reports.append(
                SourceReport(
                    class_name=name,
                    n_showers=len(enc),
                    n_too_long=int(enc.too_long.sum()),
                    longest=int(enc.lengths.max(initial=0)),
                    n_clipped=enc.n_clipped,
                    n_hits=len(enc.spatial),
                )
            )
        self.lengths = (
            np.concatenate(lengths).astype(np.int64) if lengths else np.zeros(0, np.int64)
        )
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)]).astype(np.int64)
        self.spatial = np.concatenate(spatial) if spatial else np.zeros(0, np.int32)
        self.energy = np.concatenate(energy) if energy else np.zeros(0, np.int32)
        self.incident = np.concatenate(incident) if incident else np.zeros(0, np.float32)
        self.class_id = np.concatenate(class_id) if class_id else np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self.lengths)

    def messages(self) -> list[str]:
        return [m for r in self.reports for m in r.messages(self.config.max_hits)]

    def n_targets(self, indices: np.ndarray) -> int:
        """Target tokens per stream of these showers: every hit plus EOS."""
        return int(np.sum(self.lengths[indices] + 1))


def collate(dataset: TokenDataset, indices: np.ndarray) -> dict[str, torch.Tensor]:
    """Full sequences ``[SOS, hits.., EOS, PAD..]`` of the showers at ``indices``.

    Returns spatial and energy (B, T+1) int64, incident (B,) float32 (scaled), class_id (B,) int64.
    """
    c = dataset.config
    indices = np.asarray(indices, dtype=np.int64)
    lengths = dataset.lengths[indices]
    width = int(lengths.max(initial=0)) + 2
    rows = np.repeat(np.arange(len(indices)), lengths)
    cols = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths) + 1
    source = np.repeat(dataset.offsets[indices] - (np.cumsum(lengths) - lengths), lengths)
    source = source + np.arange(len(source))
    out = {}
    for key, stream, sos, eos, pad in (
        ("spatial", dataset.spatial, c.spatial_sos, c.spatial_eos, c.spatial_pad),
        ("energy", dataset.energy, c.energy_sos, c.energy_eos, c.energy_pad),
    ):
        seq = np.full((len(indices), width), pad, dtype=np.int64)
        seq[:, 0] = sos
        seq[rows, cols] = stream[source]
        seq[np.arange(len(indices)), lengths + 1] = eos
        out[key] = torch.from_numpy(seq)
    out["incident"] = torch.from_numpy(dataset.incident[indices].astype(np.float32))
    out["class_id"] = torch.from_numpy(dataset.class_id[indices])
    return out


def shard(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
    """This process's share of a global batch: every ``world_size``-th row from ``rank``.

    Batches are sorted by length, so strided shares have nearly equal lengths across processes.
    """
    return batch[rank::world_size]


def _cut(
    order: np.ndarray,
    lengths: np.ndarray,
    batch_size: int | None,
    batch_tokens: int | None,
    min_rows: int,
) -> list[np.ndarray]:
    """Slice showers already sorted by length into batches of a fixed count or a token budget."""
    if batch_size is not None:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    padded = lengths[order] + 2
    batches, start = [], 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (
            (stop + 1 - start) * padded[stop] <= batch_tokens or stop - start < min_rows
        ):
            stop += 1
        batches.append(order[start:stop])
        start = stop
    return batches


class BucketBatchSampler:
    """Global batches for one epoch: class-balanced, pooled, sorted by length in a pool, shuffled.

    Exactly one of ``batch_size`` (showers per global batch) and ``batch_tokens`` (padded tokens per
    global batch and stream) is given. A pool holds ``pool_batches`` batches' worth of showers.
    Batches with fewer rows than processes are dropped (at most the tail of a pool).
    """

    def __init__(
        self,
        lengths: np.ndarray,
        class_id: np.ndarray,
        *,
        seed: int,
        batch_size: int | None = None,
        batch_tokens: int | None = None,
        pool_batches: int = 64,
        world_size: int = 1,
    ):
        if (batch_size is None) == (batch_tokens is None):
            raise ValueError("give exactly one of batch_size and batch_tokens")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.class_id = np.asarray(class_id, dtype=np.int64)
        self.seed = seed
        self.batch_size = batch_size
        self.batch_tokens = batch_tokens
        self.pool_batches = pool_batches
        self.world_size = world_size
        self.by_class = [np.flatnonzero(self.class_id == c) for c in np.unique(self.class_id)]
        self._counts: dict[int, int] = {}

    def _pool_size(self) -> int:
        if self.batch_size is not None:
            return self.batch_size * self.pool_batches
        mean = float(self.lengths.mean()) + 2 if len(self.lengths) else 1.0
        return max(1, int(self.batch_tokens * self.pool_batches / mean))

    def batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        per_class = max((len(c) for c in self.by_class), default=0)
        draws = []
        for members in self.by_class:
            reps = -(-per_class // len(members))
            draws.append(
                np.concatenate([rng.permutation(members) for _ in range(reps)])[:per_class]
            )
        order = rng.permutation(np.concatenate(draws)) if draws else np.zeros(0, np.int64)
        pool = self._pool_size()
        out = []
        for start in range(0, len(order), pool):
            chunk = order[start : start + pool]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            out.extend(
                _cut(chunk, self.lengths, self.batch_size, self.batch_tokens, self.world_size)
            )
        out = [b for b in out if len(b) >= self.world_size]
        return [out[i] for i in rng.permutation(len(out))]

    def n_batches(self, epoch: int) -> int:
        if epoch not in self._counts:
            self._counts[epoch] = len(self.batches(epoch))
        return self._counts[epoch]


def eval_batches(
    lengths: np.ndarray, batch_size: int | None = None, batch_tokens: int | None = None
) -> list[np.ndarray]:
    """Every shower exactly once, sorted by length, for validation (no shuffling, no balancing)."""
    order = np.argsort(np.asarray(lengths), kind="stable")
    return _cut(order, np.asarray(lengths), batch_size, batch_tokens, 1)


def padding_fraction(lengths: np.ndarray, batches: list[np.ndarray]) -> float:
    """Share of padded positions over all batches (sequences are ``length + 2`` long)."""
    real = sum(int(np.sum(lengths[b] + 2)) for b in batches)
    total = sum(len(b) * int(np.max(lengths[b] + 2)) for b in batches if len(b))
    return 1 - real / total if total else 0.0
