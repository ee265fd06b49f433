"""Reproducible train/validation splits and subsets over lists of shower files.

Showers of one class may span several files; they are addressed by one global index (file order,
then row order). A split or a subset is a set of global indices, decided by a seed alone, and only
the selected rows are read. Three independent random streams derive from one seed:

- the validation split (``[seed, 0]``), the same for every subset size and repeat, so that studies
  at 1k and 10k fine-tuning showers are validated on the same showers;
- the subset order (``[seed, 1]``): one permutation of the training pool; subset ``repeat`` r
  of size n is its slice ``[r*n, (r+1)*n)``, so repeats are disjoint and, for repeat 0, a smaller
  subset is contained in a larger one;
- bootstrap resamples (``[seed, 2, repeat]``), used only for a repeat whose disjoint slice would run
  past the end of the pool: n showers drawn with replacement from the whole training pool.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from calofm.data.formats import file_info, read_showers
from calofm.data.layouts import ShowerFileInfo
from calofm.data.showers import SparseShowers, concatenate
from calofm.errors import CalofmError

SPLIT_STREAM, SUBSET_STREAM, BOOTSTRAP_STREAM = 0, 1, 2


def expand_paths(patterns: list[str]) -> list[Path]:
    """File paths from paths or glob patterns, in the given order, globs sorted; no duplicates."""
    out: list[Path] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern))
            if not matches:
                raise CalofmError(f"{pattern}: no file matches this pattern")
            found = [Path(m) for m in matches]
        else:
            found = [Path(pattern)]
        out.extend(p for p in found if p not in out)
    return out


@dataclass(frozen=True)
class ShowerPool:
    """The showers of one class across several files, addressed by one global index."""

    infos: tuple[ShowerFileInfo, ...]

    @classmethod
    def open(cls, paths: list[str | os.PathLike[str]]) -> ShowerPool:
        """Read the files' headers (not their showers); all must hold one class and detector."""
        if not paths:
            raise CalofmError("no shower files given")
        infos = tuple(file_info(p) for p in paths)
        first = infos[0]
        for info in infos[1:]:
            if info.detector != first.detector or info.particle != first.particle:
                raise CalofmError(
                    f"{info.path}: holds {info.detector.material} {info.particle} showers, "
                    f"but {first.path} holds {first.detector.material} {first.particle}"
                )
        return cls(infos)

    @property
    def n(self) -> int:
        return sum(info.n for info in self.infos)

    @property
    def starts(self) -> np.ndarray:
        """Global index of each file's first shower, plus the total at the end."""
        return np.concatenate([[0], np.cumsum([info.n for info in self.infos])]).astype(np.int64)

    def read(self, indices: np.ndarray, max_gap: int = 4) -> SparseShowers:
        """The showers at global ``indices``, in that order, reading only (nearly) those rows.

        Runs of selected rows separated by at most ``max_gap`` unselected rows are read in one
        slice: reopening a file costs about as much as decoding a few rows.
        """
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= self.n):
            raise CalofmError(f"shower index out of range (pool holds {self.n} showers)")
        unique = np.unique(indices)
        starts = self.starts
        parts, got = [], []
        for k, info in enumerate(self.infos):
            local = unique[(unique >= starts[k]) & (unique < starts[k + 1])] - starts[k]
            if not len(local):
                continue
            breaks = np.flatnonzero(np.diff(local) > max_gap + 1) + 1
            for run in np.split(local, breaks):
                block = read_showers(info.path, int(run[0]), int(run[-1]) + 1)
                parts.append(block.select(run - run[0]))
                got.append(run + starts[k])
        if not parts:
            first = self.infos[0]
            return SparseShowers(
                offsets=np.zeros(1, np.int64),
                voxels=np.zeros(0, np.int32),
                energies=np.zeros(0, np.float32),
                incident=np.zeros(0, np.float32),
                detector=first.detector,
                particle=first.particle,
                metadata=dict(first.metadata),
            )
        showers = concatenate(parts)
        position = np.searchsorted(np.concatenate(got), indices)
        return showers.select(position)

    def provenance(self) -> list[dict]:
        """Enough to recognise the data later: path, showers, size, mtime and sha256 per file."""
        return [
            {
                "path": str(Path(info.path).resolve()),
                "n_showers": info.n,
                "size": Path(info.path).stat().st_size,
                "mtime": Path(info.path).stat().st_mtime,
                "sha256": sha256_file(info.path),
            }
            for info in self.infos
        ]


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def split_indices(n_total: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) global indices, sorted; validation holds ``round(val_fraction * n)``.

    With a positive fraction at least one shower is held out, and at least one is left to train on.
    """
    if not 0 <= val_fraction < 1:
        raise CalofmError(f"validation fraction {val_fraction} must be in [0, 1)")
    n_val = int(round(val_fraction * n_total))
    if val_fraction > 0:
        n_val = max(n_val, 1)
    if n_total - n_val < 1:
        raise CalofmError(
            f"{n_total} showers are too few to hold out {val_fraction:.0%} for validation"
        )
    order = np.random.default_rng([seed, SPLIT_STREAM]).permutation(n_total)
    return np.sort(order[n_val:]), np.sort(order[:n_val])


def subset_indices(pool: np.ndarray, n: int, seed: int, repeat: int = 0) -> tuple[np.ndarray, bool]:
    """``n`` indices out of ``pool`` for subset ``repeat``; also whether it had to be bootstrapped.

    Repeats are disjoint while ``(repeat + 1) * n`` fits in the pool; past that, a repeat is a
    bootstrap resample (with replacement), still fixed by ``(seed, repeat)``.
    """
    pool = np.asarray(pool, dtype=np.int64)
    if n < 1 or repeat < 0:
        raise CalofmError(
            f"subset size must be at least 1 and repeat at least 0 (got {n}, {repeat})"
        )
    if n > len(pool):
        raise CalofmError(f"asked for {n} showers but only {len(pool)} are available for training")
    order = np.random.default_rng([seed, SUBSET_STREAM]).permutation(len(pool))
    if (repeat + 1) * n <= len(pool):
        return np.sort(pool[order[repeat * n : (repeat + 1) * n]]), False
    rng = np.random.default_rng([seed, BOOTSTRAP_STREAM, repeat])
    return np.sort(pool[rng.integers(0, len(pool), size=n)]), True


def too_few_message(n_train: int, n_total: int, n_pool: int, val_fraction: float) -> str:
    return (
        f"asked for {n_train} training showers, but the files hold {n_total} and "
        f"{n_total - n_pool} of them are held out for validation (val fraction {val_fraction:g}): "
        "ask for fewer or hold out fewer"
    )


@dataclass
class Selection:
    """The training and validation showers of one class, and how they were chosen."""

    train: SparseShowers
    val: SparseShowers
    provenance: dict


def select_showers(
    paths: list[str | os.PathLike[str]],
    *,
    n_train: int | None,
    val_fraction: float,
    seed: int,
    repeat: int = 0,
) -> Selection:
    """Hold out a validation split, then take ``n_train`` showers (all when None) to train on."""
    pool = ShowerPool.open(paths)
    train_pool, val_idx = split_indices(pool.n, val_fraction, seed)
    if n_train is None:
        train_idx, bootstrapped = train_pool, False
    elif n_train > len(train_pool):
        raise CalofmError(too_few_message(n_train, pool.n, len(train_pool), val_fraction))
    else:
        train_idx, bootstrapped = subset_indices(train_pool, n_train, seed, repeat)
    return Selection(
        train=pool.read(train_idx),
        val=pool.read(val_idx),
        provenance={
            "files": pool.provenance(),
            "n_available": pool.n,
            "n_train": len(train_idx),
            "n_val": len(val_idx),
            "seed": seed,
            "repeat": repeat,
            "val_fraction": val_fraction,
            "bootstrapped": bootstrapped,
        },
    )
