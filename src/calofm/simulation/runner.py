"""Run the embedded Geant4 in worker processes, chunk by chunk, into a resumable shower file.

A run is split into chunks of ``chunk_size`` showers. Chunk ``i`` draws its incident energies and
its Geant4 seed from ``SeedSequence(seed, spawn_key=(i,))``, so the showers depend only on the
request, never on how many workers simulate them. A job of an array starts ``offset`` showers into
the run of its seed (a whole number of chunks), so jobs with offsets 0, n, 2n, ... simulate
exactly the showers of one run of their total, and ``calofm merge`` joins them into its file. Each worker is its own spawned process, because
Geant4 keeps global state per process; chunks come back in order and are appended to
``OUT.partial`` as they finish, so an interrupted run resumes at the first missing chunk.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np
from tqdm import tqdm

from calofm.data.showers import SparseShowers, concatenate
from calofm.data.writers import ShowerWriter, file_metadata
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.files import check_output_file
from calofm.particles import pdg_code
from calofm.simulation.tables import PHYSICS_NOTE, TABLES_VERSION

G4_SEED_MAX = 2**31 - 1  # Geant4's engines take a positive 32-bit seed


@dataclass(frozen=True)
class SimulationRequest:
    """Everything that determines the simulated showers."""

    detector: DetectorConfig
    particle: str
    n: int
    energy_gev: tuple[float, float]  # (lo, hi); lo == hi for a fixed energy
    seed: int = 0
    chunk_size: int = 50
    offset: int = 0  # showers of this seed's run that other jobs simulate before this one

    def __post_init__(self) -> None:
        pdg_code(self.particle)  # the shower file stores the PDG code: reject unknown names now
        lo, hi = (float(e) for e in self.energy_gev)
        object.__setattr__(self, "energy_gev", (lo, hi))  # one spelling, one signature
        if not 0 < lo <= hi:
            raise CalofmError(
                f"incident energy range [{lo:g}, {hi:g}] GeV must satisfy 0 < lo <= hi"
            )
        if self.n < 1 or self.chunk_size < 1:
            raise CalofmError("the number of showers and the chunk size must be at least 1")
        if self.seed < 0:
            raise CalofmError(f"seed must be a non-negative integer, got {self.seed}")
        if self.offset < 0 or self.offset % self.chunk_size:
            raise CalofmError(
                f"offset {self.offset} must be a whole number of chunks of {self.chunk_size} "
                "showers (0, n, 2n, ... for the jobs of an array)"
            )

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.chunk_size)

    def chunk(self, index: int) -> tuple[np.ndarray, int]:
        """Incident energies (GeV, float32 as stored) and Geant4 seed of chunk ``index``."""
        key = (self.offset // self.chunk_size + index,)
        rng = np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=key))
        size = min(self.chunk_size, self.n - index * self.chunk_size)
        energies = rng.uniform(*self.energy_gev, size=size).astype(np.float32)
        return energies, int(rng.integers(1, G4_SEED_MAX))

    def describe(self, simulator: str) -> dict:
        """The run's entries in the file metadata (the detector and particle are added there);
        ``offset`` only for a job that does not start the run (older files stay resumable)."""
        run = dict(
            simulator=simulator,
            physics_note=PHYSICS_NOTE,
            tables_version=TABLES_VERSION,
            seed=self.seed,
            energy_range_gev=list(self.energy_gev),
            n=self.n,
            chunk_size=self.chunk_size,
        )
        return {**run, "offset": self.offset} if self.offset else run

    def signature(self, simulator: str) -> str:
        """A hash of everything that determines the output, so only the same run resumes a file."""
        run = dict(
            self.describe(simulator), detector=self.detector.to_dict(), particle=self.particle
        )
        return hashlib.sha256(json.dumps(run, sort_keys=True).encode()).hexdigest()[:16]


def check_request(request: SimulationRequest) -> str:
    """Check what only Geant4 knows (the material) before any worker starts; return the version."""
    from calofm.simulation import geant4

    geant4.check_material(request.detector.material)
    return geant4.simulator_version()


_calorimeter = None  # the worker process's Geant4 set-up, built by its first chunk


def init_worker(parent: int | None = None) -> None:
    """Set up a Geant4 worker process: silence Geant4's banner on stdout, let Ctrl-C end the
    worker at once (the parent reports the interruption; finished chunks are already on disk),
    and end it when ``parent`` (the parent's pid, passed by the parent) is gone."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.close(devnull)
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if parent is not None:  # the parent's pid, from the parent: it may be gone already
        threading.Thread(target=_exit_with_parent, args=(parent,), daemon=True).start()


def _exit_with_parent(parent: int) -> None:
    """A worker whose parent was killed (SIGKILL) would wait for work forever, holding the
    parent's terminal and memory; it exits instead, once its current chunk is done."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _simulate_chunk(task: tuple[SimulationRequest, int]) -> SparseShowers:
    global _calorimeter
    from calofm.simulation.geant4 import Calorimeter

    request, index = task
    if _calorimeter is None:
        _calorimeter = Calorimeter(request.detector)
    energies, seed = request.chunk(index)
    return _calorimeter.simulate(request.particle, energies, seed)


@contextmanager
def _workers(n: int) -> Iterator[ProcessPoolExecutor]:
    """Worker processes; on an error or interruption, queued chunks are dropped and this returns
    at once (a worker still busy with a chunk exits when it is done, before the program ends)."""
    executor = ProcessPoolExecutor(
        n,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=init_worker,
        initargs=(os.getpid(),),
    )
    try:
        yield executor
    except BrokenProcessPool:
        executor.shutdown(wait=False, cancel_futures=True)
        raise CalofmError("a Geant4 worker process died (see Geant4's messages above)") from None
    except BaseException:
        executor.shutdown(wait=False, cancel_futures=True)
        raise
    executor.shutdown()


def iter_chunks(
    request: SimulationRequest, workers: int = 1, first_chunk: int = 0
) -> Iterator[SparseShowers]:
    """Simulate chunks ``first_chunk..`` in order; each worker holds one chunk at a time."""
    if workers < 1:
        raise CalofmError(f"need at least one worker, got {workers}")
    todo = iter(range(first_chunk, request.n_chunks))
    n_workers = min(workers, request.n_chunks - first_chunk)
    if n_workers < 1:
        return
    with _workers(n_workers) as executor:
        running = deque(
            executor.submit(_simulate_chunk, (request, i)) for i in islice(todo, n_workers)
        )
        while running:
            showers = running.popleft().result()
            running.extend(executor.submit(_simulate_chunk, (request, i)) for i in islice(todo, 1))
            yield showers


def simulate(request: SimulationRequest, workers: int = 1) -> SparseShowers:
    """The whole request in memory, for tests and benchmarks (files: ``simulate_to_file``)."""
    check_request(request)
    return concatenate(list(iter_chunks(request, workers)))


def open_writer(
    request: SimulationRequest,
    out: str | os.PathLike[str],
    simulator: str,
    replace_partial: bool = False,
) -> ShowerWriter:
    """The resumable writer of ``out``: it resumes a partial file only if the same run wrote it,
    and refuses one of another run unless ``replace_partial``."""
    empty = SparseShowers(
        offsets=np.zeros(1),
        voxels=np.zeros(0),
        energies=np.zeros(0),
        incident=np.zeros(0),
        detector=request.detector,
        particle=request.particle,
    )
    meta = file_metadata(empty, **request.describe(simulator))
    return ShowerWriter(
        out, request.n, meta, request.signature(simulator), replace_partial=replace_partial
    )


def simulate_to_file(
    request: SimulationRequest,
    out: str | os.PathLike[str],
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Simulate into a showerdata file; rerunning the same request resumes an interrupted run.

    A complete ``out`` is replaced only with ``overwrite`` (and only once the new file is complete).
    """
    check_output_file(out, overwrite)
    simulator = check_request(request)
    writer = open_writer(request, out, simulator, replace_partial=overwrite)
    done = writer.n_written  # whole chunks: the signature pins the chunk size
    desc = f"simulate {request.detector.material} {request.particle}"
    bar = tqdm(total=request.n, initial=done, unit="shower", desc=desc, disable=not progress)
    try:
        with bar:
            for showers in iter_chunks(request, workers, first_chunk=done // request.chunk_size):
                writer.append(showers)
                bar.update(len(showers))
    except BaseException:
        if writer.n_written == 0:  # nothing worth resuming
            writer.partial.unlink(missing_ok=True)
        raise
    return writer.finish()
