"""``calofm adapt-particle``: a new particle (and its first material) as one adapter."""

from __future__ import annotations

import argparse

from calofm.cli._args import non_negative_int, positive_float, positive_int
from calofm.cli._stage import add_stage_options, run_stage_command


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "adapt-particle",
        help="add a particle to a model: LoRA + particle heads + one new expert",
        description=(
            "Add PARTICLE in MATERIAL to a model as one particle+expert adapter: LoRA on q, k, v "
            "and the attention output projection of every block (scale alpha/sqrt(rank)), "
            "spatial and energy heads of its own (copies of the base heads to start with), "
            "optionally bottlenecks on the token and incident embeddings, and a new expert for "
            "MATERIAL:PARTICLE (a copy of the base expert of the same material unless "
            "--init-from says otherwise). Everything else stays frozen; the adapter is saved on "
            "its own in ADAPTER_DIR. Further materials for this particle: calofm extend "
            "--adapter ADAPTER_DIR."
        ),
    )
    p.add_argument("--particle", required=True, help="the new particle, e.g. e-")
    p.add_argument("--material", required=True, help="its first material, e.g. G4_W (or W)")
    p.add_argument("--rank", type=positive_int, default=16, help="LoRA rank (default 16)")
    p.add_argument(
        "--alpha", type=positive_float, default=16.0, help="LoRA alpha; scale alpha/sqrt(rank)"
    )
    p.add_argument(
        "--embed-bottleneck",
        type=non_negative_int,
        default=0,
        metavar="WIDTH",
        help="bottleneck adapters of this width on the embeddings (default 0: none)",
    )
    p.add_argument(
        "--init-from",
        metavar="MATERIAL|CLASS",
        help="start the expert from this class (default: the base class of the same material)",
    )
    p.add_argument(
        "--condition",
        action="store_true",
        help="also learn a per-class layer-embedding shift and layer bias of the spatial logits",
    )
    add_stage_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calofm.adapters.config import AdapterConfig, init_class, same_material_class
    from calofm.model.config import class_name

    def make_config(model):
        name = class_name(args.material, args.particle)
        if args.init_from is None:
            init = same_material_class(model.classes, args.material)
            if init is None:
                print(f"no class of material {args.material} in the model: random expert")
        else:
            init = init_class(model.classes, args.init_from, args.particle)
        return AdapterConfig(
            particle=args.particle,
            rank=args.rank,
            alpha=args.alpha,
            embed_bottleneck=args.embed_bottleneck,
            class_name=name,
            init_from=init,
            condition=args.condition,
        )

    return run_stage_command(args, "adapt-particle", make_config)
