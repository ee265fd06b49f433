"""``calofm extend``: a new material for a known particle, as an expert adapter."""

from __future__ import annotations

import argparse

from calofm.cli._stage import add_stage_options, run_stage_command


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "extend",
        help="add a material (one new expert) to a model, training only the expert",
        description=(
            "Add the class MATERIAL:PARTICLE to a model as an expert adapter: one FFN expert per "
            "block (a copy of --init-from's expert, or random), trained on --data while everything "
            "else stays frozen, and saved on its own in ADAPTER_DIR (adapter.safetensors + "
            "adapter.json, with the training log). For a particle that the base model lacks, load "
            "its particle adapter with --adapter: only the new expert trains, LoRA and particle "
            "heads stay frozen. Use the adapter with --adapter in calofm generate."
        ),
    )
    p.add_argument("--material", required=True, help="the new material, e.g. G4_Pb (or Pb)")
    p.add_argument("--particle", required=True, help="the particle, e.g. gamma")
    p.add_argument(
        "--init-from",
        metavar="MATERIAL|CLASS",
        help="start from this expert: a material (same particle) or a class such as G4_Ta:gamma "
        "(default: random)",
    )
    p.add_argument(
        "--condition",
        action="store_true",
        help="also learn a per-class layer-embedding shift and layer bias of the spatial logits, "
        "so the expert can move the longitudinal profile",
    )
    add_stage_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calofm.adapters.config import AdapterConfig, init_class
    from calofm.model.config import class_name

    def make_config(model):
        name = class_name(args.material, args.particle)
        return AdapterConfig(
            class_name=name,
            init_from=init_class(model.classes, args.init_from, args.particle),
            condition=args.condition,
        )

    return run_stage_command(args, "extend", make_config)
