"""What ``calofm extend`` and ``calofm adapt-particle`` share (and ``study finetune`` its training config)."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from calofm.cli._args import (
    add_budget_options,
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
)

if TYPE_CHECKING:
    from calofm.training.config import TrainConfig


def add_stage_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="MODEL_DIR", help="the base model")
    p.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="ADAPTER_DIR",
        help="an adapter to load before this stage (repeatable); kept frozen",
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="PATH",
        help="training showers of the new class (repeatable; a quoted glob works too)",
    )
    p.add_argument("--out", required=True, metavar="ADAPTER_DIR", help="output adapter directory")
    add_budget_options(p)
    data = p.add_argument_group("data selection")
    data.add_argument("--n-events", type=positive_int, metavar="N", help="training showers (all)")
    data.add_argument(
        "--repeat",
        type=non_negative_int,
        default=0,
        help="which subset of N for this seed: disjoint while the data allows, else bootstrapped",
    )
    data.add_argument(
        "--val-fraction", type=fraction, help="showers held out for validation (default 0.05)"
    )
    data.add_argument(
        "--seed", type=non_negative_int, default=0, help="data split, subset, batches, init"
    )
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch-size", type=positive_int, help="showers per step (default 32)")
    opt.add_argument("--lr", type=positive_float, help="peak learning rate (default 1e-3)")
    opt.add_argument("--warmup", type=non_negative_int, metavar="STEPS", help="(default 20)")
    opt.add_argument("--amp", action="store_true", help="bfloat16 autocast (default fp32)")
    opt.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    opt.add_argument("--resume", action="store_true", help="continue from ADAPTER_DIR/checkpoints")
    opt.add_argument(
        "--overwrite", action="store_true", help="replace an adapter or training run in ADAPTER_DIR"
    )


@contextmanager
def _stop_on_signal() -> Iterator[Callable[[int], bool]]:
    """Ctrl-C (or SIGTERM) asks the trainer to checkpoint and stop after the step; twice aborts."""
    stop = {"requested": False}

    def request(signum, frame) -> None:
        if stop["requested"]:
            raise KeyboardInterrupt
        stop["requested"] = True
        print(
            "\nstopping after this step and writing a checkpoint (again to abort)", file=sys.stderr
        )

    previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda step: stop["requested"]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def stage_train_config(
    args: argparse.Namespace, *, warmup: int | None = None, amp: bool = False
) -> TrainConfig:
    """The TrainConfig of a stage (or a study's runs): budget flags, stage defaults elsewhere."""
    from calofm.adapters.config import STAGE_DEFAULTS as d
    from calofm.training.config import TrainConfig

    return TrainConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        time_limit_min=args.time_limit,
        batch_size=args.batch_size or d.batch_size,
        lr=args.lr or d.lr,
        warmup_steps=d.warmup_steps if warmup is None else warmup,
        seed=args.seed,
        amp=amp,
    )


def run_stage_command(args: argparse.Namespace, stage: str, make_config) -> int:
    """Load the model and adapters, build the new adapter's config, train it, report."""
    from calofm.adapters.config import STAGE_DEFAULTS as d
    from calofm.adapters.files import MANIFEST_FILE, TENSORS_FILE, load_model_with_adapters
    from calofm.adapters.stage import run_stage
    from calofm.cli._rundir import plan_run_dir
    from calofm.data.subsets import ShowerPool, expand_paths
    from calofm.training import distributed

    train_config = stage_train_config(args, warmup=args.warmup, amp=args.amp)
    out_plan = plan_run_dir(
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        products=(TENSORS_FILE, MANIFEST_FILE),
        what="an adapter",
    )
    env = distributed.setup(args.device)  # joins the process group under torchrun
    try:
        with _stop_on_signal() as should_stop:
            model = load_model_with_adapters(args.model, args.adapter, "cpu")
            config = make_config(model)
            provenance = {
                "command": " ".join(["calofm", *sys.argv[1:]]),
                "stage": stage,
                "base_model": str(args.model),
                "seed": args.seed,
            }
            ShowerPool.open(expand_paths(args.data))  # refused before an old run is removed
            resume = out_plan.apply()
            result = run_stage(
                model,
                config,
                args.data,
                train_config,
                args.out,
                n_events=args.n_events,
                val_fraction=d.val_fraction if args.val_fraction is None else args.val_fraction,
                repeat=args.repeat,
                device=args.device,
                resume=resume,
                provenance=provenance,
                should_stop=should_stop,
            )
    finally:
        distributed.teardown(env)
    if not env.is_main:
        return 0
    if result.train.interrupted:
        print(f"calofm {stage}: stopped; run the same command with --resume", file=sys.stderr)
        return 130
    best = result.train.best_val_loss
    print(
        f"adapter {config.name} ({config.kind}, {result.counts['total']:,} parameters) in "
        f"{result.adapter_dir}; {result.train.steps} steps in {result.train.elapsed_s / 60:.1f} "
        f"min; best validation loss {'n/a' if best is None else f'{best:.4f}'}"
    )
    return 0
