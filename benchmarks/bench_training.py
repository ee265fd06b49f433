"""Training speed on this machine: tokens/s and s/step of ``calofm train``'s own loop.

Runs the real trainer (``calofm.training.train``) for a few steps per setting on the W and Ta
photon showers, for each thread count and batch size, then estimates how many epochs fit in a
time budget (validation included). Prints a table and writes JSON:

    python benchmarks/bench_training.py [--steps 30] [--threads 1 2] [--batch-sizes 8 16]
        [--self-drawn-energy 0 0.25] [--preset small] [--budget-min 55]
        [--data-dir ../shared/data] [--out FILE]

``--self-drawn-energy`` times each setting with each share of self-drawn energy inputs
(``TrainConfig.self_drawn_energy``; 0 only by default), so its cost is a ratio of one run.

A token is one hit (plus EOS) of one shower, i.e. one position of both streams. On a shared
machine the wall-clock numbers depend on the load (printed); CPU seconds per step do much less.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from calofm.data.batches import BucketBatchSampler, eval_batches
from calofm.files import atomic_output
from calofm.model import CaloFM, preset
from calofm.tokens import Tokenizer
from calofm.training import distributed
from calofm.training.config import TrainConfig, preset_defaults
from calofm.training.data import build_datasets, fit_tokenizer, load_classes
from calofm.training.steps import evaluate
from calofm.training.trainer import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per setting")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--self-drawn-energy", type=float, nargs="+", default=[0.0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--budget-min", type=float, default=55.0)
    parser.add_argument("--materials", nargs="+", default=["W", "Ta"])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/training.json")
    args = parser.parse_args()

    specs = {
        f"G4_{m}:gamma": [str(args.data_dir / f"{m}_gamma_train_*.h5")] for m in args.materials
    }
    classes = load_classes(specs, n_train=None, val_fraction=0.05, seed=0)
    defaults = preset_defaults(args.preset)
    detector = classes[0].selection.train.detector
    tok = fit_tokenizer([c.selection.train for c in classes], detector, defaults)
    names = [c.name for c in classes]
    train_set, val_set = build_datasets(classes, Tokenizer(tok), names)
    env = distributed.setup("cpu")
    mean_len = float(train_set.lengths.mean())
    print(
        f"{args.preset}: {len(train_set)} training showers ({', '.join(names)}), mean "
        f"{mean_len:.0f} hits; tokenizer {tok.scheme} {tok.n_bins} bins up to {tok.max_mev} MeV; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )

    rows = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch, share in ((b, s) for b in args.batch_sizes for s in args.self_drawn_energy):
            sampler = BucketBatchSampler(
                train_set.lengths, train_set.class_id, seed=0, batch_size=batch
            )
            steps_per_epoch = sampler.n_batches(0)
            tokens_per_epoch = sum(
                int(np.sum(train_set.lengths[b] + 1)) for b in sampler.batches(0)
            )
            torch.manual_seed(0)
            model = CaloFM(preset(args.preset), tok, detector, names)
            config = TrainConfig(
                max_steps=args.steps,
                batch_size=batch,
                lr=defaults.lr,
                warmup_steps=5,
                log_every=5,
                self_drawn_energy=share,
            )
            with tempfile.TemporaryDirectory() as tmp:
                t0, cpu0 = time.monotonic(), time.process_time()
                train(model, train_set, None, config, None, tmp, device="cpu", progress=False)
                wall, cpu = time.monotonic() - t0, time.process_time() - cpu0
                log = [
                    json.loads(x) for x in (Path(tmp) / "train_log.jsonl").read_text().splitlines()
                ]
            # The first interval holds start-up and warm-up; time the rest.
            timed = log[1:]
            dt = timed[-1]["elapsed_s"] - log[0]["elapsed_s"]
            n_steps = timed[-1]["step"] - log[0]["step"]
            tokens_s = float(np.mean([r["tokens_per_s"] for r in timed]))
            t_val = time.monotonic()
            evaluate(model, val_set, eval_batches(val_set.lengths, batch_size=batch), env)
            val_s = time.monotonic() - t_val
            epoch_s = tokens_per_epoch / tokens_s + val_s
            row = {
                "threads": threads,
                "batch_size": batch,
                "self_drawn_energy": share,
                "tokens_per_s": tokens_s,
                "s_per_step": dt / n_steps,
                "cpu_s_per_step": cpu / args.steps,
                "tokens_per_cpu_s": tokens_per_epoch / steps_per_epoch * args.steps / cpu,
                "steps_per_epoch": steps_per_epoch,
                "tokens_per_epoch": tokens_per_epoch,
                "epoch_min": epoch_s / 60,
                "validation_s": val_s,
                "epochs_in_budget": args.budget_min * 60 / epoch_s,
                "steps_in_budget": int(args.budget_min * 60 / epoch_s * steps_per_epoch),
                "wall_s": wall,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
                "load_average": os.getloadavg()[0],
            }
            rows.append(row)
            print(
                f"threads {threads} batch {batch} self-drawn {share:g}: {tokens_s:,.0f} tokens/s, "
                f"{row['s_per_step']:.2f} s/step, epoch {row['epoch_min']:.1f} min, "
                f"{row['epochs_in_budget']:.2f} epochs in {args.budget_min:g} min",
                flush=True,
            )

    header = (
        "| threads | batch | self-drawn | tokens/s | s/step | CPU s/step | tokens/CPU-s "
        "| steps/epoch | min/epoch | epochs in budget | load |"
    )
    print(f"\n{header}\n|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['threads']} | {r['batch_size']} | {r['self_drawn_energy']:g} | "
            f"{r['tokens_per_s']:,.0f} | "
            f"{r['s_per_step']:.2f} | {r['cpu_s_per_step']:.2f} | {r['tokens_per_cpu_s']:,.0f} | "
            f"{r['steps_per_epoch']} | {r['epoch_min']:.1f} | {r['epochs_in_budget']:.2f} | "
            f"{r['load_average']:.1f} |"
        )
    result = {
        "preset": args.preset,
        "model": preset(args.preset).to_dict(),
        "tokenizer": tok.to_dict(),
        "n_train_showers": len(train_set),
        "mean_hits": mean_len,
        "budget_min": args.budget_min,
        "steps_timed": args.steps,
        "torch": torch.__version__,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(args.out) as tmp:
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
