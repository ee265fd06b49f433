"""``calofm generate``: sample showers from a trained model into a showerdata file.

The output has the same format as ``calofm simulate``, so ``calofm evaluate`` compares the two.
Showers are written in chunks under ``OUT.partial``; running the same command again resumes.

Under ``torchrun`` each process decodes every W-th batch (rank k: rows ``first + k * B`` to
``first + (k + 1) * B`` of each round of W batches) and rank 0 gathers them and writes the one
output file. Every row draws from its own seeded stream and the batches are those one process
would decode, so the file equals the one-process output of the same command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from calofm.cli._args import (
    DEVICE_HELP,
    PRECISION_CHOICES,
    add_energy_options,
    energy_bounds,
    positive_int,
    random_seed,
    shower_count,
)

if TYPE_CHECKING:
    from calofm.data.writers import ShowerWriter
    from calofm.generation.sampler import SamplingConfig
    from calofm.training.distributed import DistEnv

HELP = "generate showers with a trained model (KV-cache decoding)"

# Batches of showers per generate call (and per chunk written): continuous batching refills a
# finished shower's slot from the same call, so a call of several batches keeps the slots busy.
CHUNK_BATCHES = 4


def _temperature(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _batch_size(text: str) -> int | str:
    return "auto" if text == "auto" else positive_int(text)


def _top_p(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate",
        help=HELP,
        description=(
            "Generate showers of one (material, particle) class with a trained model. A model "
            "with shower totals draws each shower's hit count and visible energy first and ends "
            "the shower there; otherwise a shower ends at end-of-sequence (the voxel head's, or "
            "either head's for a model with two stop decisions). A shower that reaches --max-hits "
            "hits keeps those hits and is counted and reported as truncated. A model that uses "
            "voxels once never repeats one; otherwise duplicates are merged (energies summed) and "
            "their rate reported. The same command gives the same showers; an interrupted run "
            "resumes from its .partial file."
        ),
    )
    p.add_argument("--model", required=True, metavar="DIR", help="model directory")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="DIR",
        help="adapter directory to load on top of the model (repeatable, any order)",
    )
    p.add_argument("--material", required=True, help="absorber material, e.g. G4_W (or W)")
    p.add_argument("--particle", required=True, help="particle, e.g. gamma or e-")
    p.add_argument("-n", type=shower_count, required=True, help="number of showers")
    add_energy_options(p)
    p.add_argument("--seed", type=random_seed, default=0, help="random seed >= 0 (default 0)")
    p.add_argument("--out", required=True, metavar="FILE", help="output showerdata HDF5 file")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing output (and discard a partial one of other arguments)",
    )
    p.add_argument(
        "--batch-size",
        type=_batch_size,
        default=64,
        help=(
            "showers decoded together (default 64), or auto: as many as half the free memory "
            "holds (GPU memory on CUDA)"
        ),
    )
    temp = p.add_mutually_exclusive_group()
    temp.add_argument(
        "--temperature",
        type=_temperature,
        default=1.0,
        help="sampling temperature (default 1; 0 = greedy)",
    )
    temp.add_argument(
        "--dynamic-temperature",
        type=_temperature,
        nargs=2,
        metavar=("LO", "HI"),
        help="temperature rising linearly from LO to HI over --max-hits (e.g. 0.95 1.05)",
    )
    p.add_argument("--top-k", type=positive_int, help="sample only among the k likeliest tokens")
    p.add_argument("--top-p", type=_top_p, help="sample only within this probability mass")
    p.add_argument(
        "--unique-voxels",
        action="store_true",
        help="never sample a voxel the shower already has (instead of merging duplicates)",
    )
    p.add_argument(
        "--max-hits",
        type=positive_int,
        help="longest shower in hits (default: the model tokenizer's max_hits)",
    )
    p.add_argument(
        "--engine",
        choices=("eager", "compile", "graphs"),
        default="eager",
        help=(
            "how decode steps run (the same showers): eager (default), compile (torch.compile: "
            "about a minute of compiling first, then on a CPU 1.1-1.3x faster; needs a C++ "
            "compiler) or graphs (CUDA graph replay, CUDA only)"
        ),
    )
    p.add_argument(
        "--precision",
        choices=PRECISION_CHOICES,
        default="fp32",
        help=(
            "type of the decode step's matrix products (RoPE, attention scores and sampling stay "
            "fp32): fp32 (default); bf16 and fp16 pay only on a GPU, and change the showers a "
            "little (docs/results.md measures how much)"
        ),
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=run)


def load_generator_model(args: argparse.Namespace, device: str):
    """The model that generates: the base model plus every adapter given with --adapter."""
    from calofm.adapters import load_model_with_adapters

    return load_model_with_adapters(args.model, args.adapter, device=device)


def run(args: argparse.Namespace) -> int:
    from calofm.files import check_output_file
    from calofm.generation.sampler import SamplingConfig
    from calofm.model.config import class_name
    from calofm.training import distributed

    lo, hi = energy_bounds(args)
    cls = class_name(args.material, args.particle)  # 'W' or 'G4_W'; the particle checked
    check_output_file(args.out, args.overwrite)
    sampling = SamplingConfig(
        args.temperature,
        tuple(args.dynamic_temperature) if args.dynamic_temperature else None,
        args.top_k,
        args.top_p,
        args.unique_voxels,
    )
    env = distributed.setup(args.device)  # joins the process group under torchrun
    try:
        return _run(args, cls, env, lo, hi, sampling)
    finally:
        distributed.teardown(env)


@contextmanager
def _drop_if_empty(writer: ShowerWriter | None) -> Iterator[None]:
    """Remove the writer's partial file when the run fails before it holds a shower: there is
    nothing to resume, and a rerun with corrected arguments must not find a foreign partial."""
    try:
        yield
    except BaseException:
        if writer is not None and writer.n_written == 0:
            writer.partial.unlink(missing_ok=True)
        raise


def _share(env: DistEnv, value: object) -> object:
    """Rank 0's ``value`` on every process (the value itself without torchrun)."""
    if not env.active:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _gather(env: DistEnv, value: object) -> list:
    """Every process's ``value`` on rank 0, in rank order (an empty list on the others)."""
    if not env.active:
        return [value]
    import torch.distributed as dist

    values = [None] * env.world_size if env.is_main else None
    dist.gather_object(value, values, dst=0)
    return values or []


def _run(
    args: argparse.Namespace,
    cls: str,
    env: DistEnv,
    lo: float,
    hi: float,
    sampling: SamplingConfig,
) -> int:
    import numpy as np
    from tqdm import tqdm

    from calofm import __version__
    from calofm.data.showers import SparseShowers
    from calofm.data.writers import ShowerWriter, file_metadata
    from calofm.errors import CalofmError
    from calofm.files import partial_path
    from calofm.generation.decoder import (
        EngineConfig,
        auto_batch_size,
        bytes_per_shower,
        free_memory,
    )
    from calofm.generation.engine import INCIDENT, generate, seeded_rng
    from calofm.model.config import parse_class
    from calofm.pretrained import resolve_model

    engine = EngineConfig.for_device(args.engine, env.device, args.precision)
    model = load_generator_model(args, env.device)
    material = parse_class(cls)[0]
    model.class_index(cls)
    tok = model.tokenizer
    max_hits = args.max_hits or tok.max_hits
    if args.batch_size == "auto":  # every process the smallest, so the row split agrees
        fits = _gather(env, auto_batch_size(model, max_hits, env.device))
        args.batch_size = _share(env, min(fits) if env.is_main else None)
        if env.is_main:
            print(
                f"calofm generate: batch size {args.batch_size} "
                f"({bytes_per_shower(model, max_hits) / 2**20:.1f} MiB per shower)"
            )
    slots = min(args.batch_size, args.n)
    need, free = slots * bytes_per_shower(model, max_hits), free_memory(env.device)
    if need > free:  # refused before any file is made, not by the allocator a minute in
        raise CalofmError(
            f"{slots} showers of up to {max_hits} hits at once need {need / 2**30:.1f} GiB, more "
            f"than the {free / 2**30:.1f} GiB free on {env.device}; lower --batch-size (or use "
            "--batch-size auto) or --max-hits"
        )
    if env.is_main and (lo < tok.incident_min_gev or hi > tok.incident_max_gev):
        asked = f"{lo:g} GeV" if lo == hi else f"{lo:g} to {hi:g} GeV"
        print(
            f"calofm generate: warning: the model was trained on {tok.incident_min_gev:g} to "
            f"{tok.incident_max_gev:g} GeV; showers at {asked} are an extrapolation, check them "
            "against Geant4 before use",
            file=sys.stderr,
        )
    incident = seeded_rng(args.seed, INCIDENT).uniform(lo, hi, args.n).astype(np.float32)

    composition = model.describe()
    generator = {
        "program": f"calofm {__version__}",
        "model_sha256": composition["base_weights_sha256"],
        "adapters": composition["adapters"],
        "class": cls,
        "sampling": sampling.to_dict(),
        "max_hits": max_hits,
        "precision": args.precision,
        "seed": args.seed,
        "energy_range_gev": [lo, hi],
    }
    signature = hashlib.sha256(
        json.dumps({**generator, "n": args.n}, sort_keys=True).encode()
    ).hexdigest()
    detector = model.detector.with_material(material)
    empty = SparseShowers([0], [], [], [], detector=detector, particle=args.particle)
    meta = file_metadata(
        empty,
        simulator="calofm-generate",
        seed=args.seed,
        generator={**generator, "model": str(resolve_model(args.model).resolve())},
    )
    state: object = None
    if env.is_main:  # rank 0 alone writes; the others learn where to start (or why not)
        try:
            writer = ShowerWriter(args.out, args.n, meta, signature, replace_partial=args.overwrite)
            state = writer.n_written
        except CalofmError as exc:
            state = str(exc)
    state = _share(env, state)
    if isinstance(state, str):
        raise CalofmError(state)
    start = int(state)
    if start and env.is_main:
        print(f"calofm generate: resuming {partial_path(args.out)} at shower {start} of {args.n}")
    totals = {"n_hits": 0, "n_duplicates": 0, "n_truncated": 0}
    if env.is_main:
        totals = writer.metadata.get("generation_stats", totals)
    seconds, n_new = 0.0, args.n - start
    chunk = CHUNK_BATCHES * args.batch_size  # showers per generate call: slots get refilled
    per_round = chunk * env.world_size
    bar = tqdm(total=args.n, initial=start, unit="shower", desc="generate", disable=not env.is_main)
    with _drop_if_empty(writer if env.is_main else None), bar:
        for first in range(start, args.n, per_round):
            mine = first + env.rank * chunk
            last = min(mine + chunk, args.n)
            result = None
            if mine < last:
                showers, stats = generate(
                    model,
                    cls,
                    incident[mine:last],
                    seed=args.seed,
                    batch_size=args.batch_size,
                    temperature=sampling.temperature,
                    top_k=sampling.top_k,
                    top_p=sampling.top_p,
                    dynamic_temperature=sampling.dynamic_temperature,
                    unique_voxels=sampling.unique_voxels,
                    max_hits=max_hits,
                    first_row=mine,
                    engine=engine,
                )
                result = (showers[cls], stats)
            done = [r for r in _gather(env, result) if r is not None]
            for showers, stats in done:
                for key in totals:
                    totals[key] += stats[key]
                writer.append(showers, generation_stats=totals)
                bar.update(len(showers))
            seconds += max((stats["seconds"] for _, stats in done), default=0.0)
    if not env.is_main:
        return 0
    path = writer.finish()

    rate = totals["n_duplicates"] / max(totals["n_hits"], 1)
    print(
        f"calofm generate: wrote {args.n} {cls} showers to {path} "
        f"({n_new / max(seconds, 1e-9):.2f} showers/s this run); {totals['n_hits']} hits, "
        f"{totals['n_duplicates']} duplicate voxels merged ({100 * rate:.2f}% of hits)"
    )
    if totals["n_truncated"]:
        print(
            f"calofm generate: warning: {totals['n_truncated']} of {args.n} showers reached the "
            f"limit of {max_hits} hits without the model ending them, and were cut there. The model "
            "rarely emits end-of-sequence (untrained or badly trained?): those showers have too "
            "few hits and too little energy; train longer or raise --max-hits",
            file=sys.stderr,
        )
    return 0
