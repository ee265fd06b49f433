"""What ``calofm extend`` and ``calofm adapt-particle`` share (and ``study finetune`` its training config)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from calofm.cli._args import (
    add_budget_options,
    add_optimisation_options,
    add_selection_options,
    command_line,
    positive_int,
    stop_on_signal,
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
    add_selection_options(p, per_class=False, val_fraction=None)
    opt = add_optimisation_options(
        p,
        title="optimisation",
        out="ADAPTER_DIR",
        what="an adapter",
        defaults={"lr": " (default 1e-3)", "warmup": "(default 20)"},
    )
    opt.add_argument("--batch-size", type=positive_int, help="showers per step (default 32)")


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
        with stop_on_signal(env.is_main) as should_stop:
            model = load_model_with_adapters(args.model, args.adapter, "cpu")
            config = make_config(model)
            provenance = {
                "command": command_line(),
                "stage": stage,
                "base_model": str(args.model),
                "seed": args.seed,
            }
            ShowerPool.open(expand_paths(args.data))  # refused before an old run is removed
            resume = out_plan.apply(env)
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
