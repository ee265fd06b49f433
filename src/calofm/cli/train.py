"""``calofm train``: pre-train a model on one or more (material, particle) classes."""

from __future__ import annotations

import argparse
import sys

from calofm.cli._args import (
    add_budget_options,
    add_optimisation_options,
    add_selection_options,
    command_line,
    fraction,
    incident_energy,
    positive_int,
    stop_on_signal,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on Geant4 showers",
        description=(
            "Train a CaloFM model on one or more (material, particle) classes, class-balanced. "
            "Writes MODEL_DIR (the best weights by validation loss, loadable by every other "
            "command), train_log.jsonl, loss_curve.png, training.json and checkpoints/. "
            "Run under torchrun --nproc-per-node N for data-parallel training; batch sizes are "
            "global. Ctrl-C stops after the current step and writes a checkpoint; continue with "
            "the same command plus --resume."
        ),
    )
    p.add_argument(
        "--data",
        action="append",
        required=True,
        metavar="MATERIAL:particle=PATH",
        help="training showers of one class, e.g. G4_W:gamma=W_gamma_train_0.h5; repeat for more "
        "files or classes; PATH may be a glob (quote it)",
    )
    p.add_argument("--preset", default="small", help="model size: paper, small or tiny")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one model option of the preset, e.g. voxel_head=flat or "
        "falling_energy=false (repeatable; the options are ModelConfig's fields)",
    )
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="output model directory")
    add_budget_options(p)
    add_selection_options(p, per_class=True, val_fraction=0.05)
    opt = add_optimisation_options(
        p,
        title="optimisation (defaults from the preset)",
        out="MODEL_DIR",
        what="a model",
        defaults={},
    )
    opt.add_argument(
        "--self-drawn-energy",
        type=fraction,
        default=0.0,
        metavar="SHARE",
        help="feed this share of the hits' energy tokens from the model's own draws instead of "
        "the shower's (default 0: teacher forcing)",
    )
    size = opt.add_mutually_exclusive_group()
    size.add_argument("--batch-size", type=positive_int, help="showers per optimizer step")
    size.add_argument("--batch-tokens", type=positive_int, help="padded tokens per step and stream")
    tok = p.add_argument_group("tokenizer (defaults from the preset; edges from the data)")
    tok.add_argument("--energy-scheme", choices=("linear", "log"))
    tok.add_argument("--energy-bins", type=positive_int)
    tok.add_argument("--max-hits", type=positive_int, help="longer showers are excluded")
    tok.add_argument("--incident-range", type=incident_energy, nargs=2, metavar=("LO", "HI"))
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calofm.cli._rundir import plan_run_dir
    from calofm.errors import CalofmError
    from calofm.model import CaloFM, preset, with_overrides
    from calofm.model.io import MANIFEST_FILE, WEIGHTS_FILE
    from calofm.model.seeding import seeded_init
    from calofm.tokens import Tokenizer
    from calofm.training import distributed
    from calofm.training.config import TrainConfig, preset_defaults
    from calofm.training.data import build_datasets, fit_tokenizer, load_classes, parse_data_specs
    from calofm.training.trainer import train

    model_config = with_overrides(preset(args.preset), args.set)
    defaults = preset_defaults(args.preset)
    specs = parse_data_specs(args.data)
    if args.incident_range and args.incident_range[0] >= args.incident_range[1]:
        raise CalofmError("--incident-range LO HI: LO must be below HI")
    config = TrainConfig(
        epochs=args.epochs,
        max_steps=args.max_steps,
        time_limit_min=args.time_limit,
        batch_size=None if args.batch_tokens else (args.batch_size or defaults.batch_size),
        batch_tokens=args.batch_tokens,
        lr=args.lr or defaults.lr,
        warmup_steps=defaults.warmup_steps if args.warmup is None else args.warmup,
        seed=args.seed,
        amp=args.amp,
        self_drawn_energy=args.self_drawn_energy,
    )
    out_plan = plan_run_dir(
        args.out,
        resume=args.resume,
        overwrite=args.overwrite,
        products=(WEIGHTS_FILE, MANIFEST_FILE),
        what="a model",
    )
    env = distributed.setup(args.device)
    try:
        classes = load_classes(
            specs,
            n_train=args.n_events,
            val_fraction=args.val_fraction,
            seed=args.seed,
            repeat=args.repeat,
        )
        detector = classes[0].selection.train.detector
        tok_config = fit_tokenizer(
            [c.selection.train for c in classes],
            detector,
            defaults,
            scheme=args.energy_scheme,
            n_bins=args.energy_bins,
            max_hits=args.max_hits,
            incident_range=tuple(args.incident_range) if args.incident_range else None,
        )
        names = [c.name for c in classes]
        train_set, val_set = build_datasets(classes, Tokenizer(tok_config), names)
        if env.is_main:
            for c in classes:
                prov = c.selection.provenance
                print(
                    f"{c.name}: {prov['n_train']} training and {prov['n_val']} validation showers "
                    f"from {len(prov['files'])} file(s)"
                    + (" (bootstrapped subset)" if prov["bootstrapped"] else ""),
                    flush=True,
                )
            for message in train_set.messages() + val_set.messages():
                print(message, flush=True)
        resume = out_plan.apply(env)
        with seeded_init(args.seed):
            model = CaloFM(model_config, tok_config, detector, names)
        provenance = {
            "command": command_line(),
            "preset": args.preset,
            "model_overrides": args.set,
            "seed": args.seed,
            "data": {c.name: c.selection.provenance for c in classes},
        }
        with stop_on_signal(env.is_main) as should_stop:
            result = train(
                model,
                train_set,
                val_set,
                config,
                None,
                args.out,
                provenance=provenance,
                resume=resume,
                device=args.device,
                should_stop=should_stop,
            )
    finally:
        distributed.teardown(env)
    if result.interrupted:
        if env.is_main:
            print(
                f"calofm train: stopped at step {result.steps}; checkpoint written; run the same "
                "command with --resume to continue",
                file=sys.stderr,
            )
        return 130
    if env.is_main:
        best = "n/a" if result.best_val_loss is None else f"{result.best_val_loss:.4f}"
        print(
            f"trained {result.steps} steps in {result.elapsed_s / 60:.1f} min; best validation "
            f"loss {best}; model in {args.out}"
        )
    return 0
