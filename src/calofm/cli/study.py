"""``calofm study finetune``: expert adapters against full fine-tuning, over sizes and repeats."""

from __future__ import annotations

import argparse

from calofm.cli._args import (
    add_budget_options,
    fraction,
    positive_float,
    positive_int,
    random_seed,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("study", help="multi-run studies (fine-tuning)")
    sub = p.add_subparsers(dest="study", required=True, metavar="STUDY")
    f = sub.add_parser(
        "finetune",
        help="learn a new class from few showers: expert adapter vs full fine-tuning",
        description=(
            "For every --methods, --n-events N and repeat r (disjoint subsets of the training "
            "pool while it allows, bootstrap resamples after), train on N showers of "
            "MATERIAL:PARTICLE, generate showers at the incident energies of --test, and evaluate "
            "all runs against --test together. Writes OUT/runs/*/ (adapters or models, showers), "
            "OUT/eval/ (metrics.json, report.html), OUT/study.json (mean and std over repeats per "
            "method and N) and OUT/study.png. --forgetting CLASS=TEST compares a base class's "
            "showers before and after (adapters must leave them bit-identical). A stopped study "
            "continues where it stopped when run again."
        ),
    )
    f.add_argument("--model", required=True, metavar="MODEL_DIR", help="the base model")
    f.add_argument("--adapter", action="append", default=[], metavar="ADAPTER_DIR")
    f.add_argument("--material", required=True, help="the new material, e.g. G4_Pb")
    f.add_argument("--particle", required=True, help="its particle, e.g. gamma")
    f.add_argument("--init-from", metavar="MATERIAL|CLASS", help="start from this expert")
    f.add_argument("--data", action="append", required=True, metavar="PATH")
    f.add_argument("--test", required=True, metavar="PATH", help="test showers of the new class")
    f.add_argument(
        "--n-events",
        "--sizes",
        type=positive_int,
        nargs="+",
        required=True,
        metavar="N",
        help="training-set sizes",
    )
    f.add_argument("--repeats", type=positive_int, default=1)
    f.add_argument(
        "--methods",
        nargs="+",
        default=["expert", "full"],
        choices=["expert", "expert+condition", "full"],
    )
    f.add_argument("--n-generate", type=positive_int, help="showers per run (default: the test's)")
    f.add_argument(
        "--forgetting",
        action="append",
        default=[],
        metavar="CLASS=PATH",
        help="a class of the model (or of --adapter) and its test showers",
    )
    f.add_argument(
        "--n-forgetting",
        type=positive_int,
        help="showers per --forgetting class (default: --n-generate)",
    )
    f.add_argument("--out", required=True, metavar="DIR")
    f.add_argument(
        "--overwrite", action="store_true", help="replace a study made with other settings in DIR"
    )
    add_budget_options(f)
    f.add_argument("--val-fraction", type=fraction, default=0.05)
    f.add_argument("--seed", type=random_seed, default=0)
    f.add_argument("--batch-size", type=positive_int, help="showers per step (default 32)")
    f.add_argument("--lr", type=positive_float, help="peak learning rate (default 1e-3)")
    f.add_argument("--generate-batch", type=positive_int, default=128)
    f.add_argument("--max-hits", type=positive_int, help="longest generated shower (model's)")
    f.add_argument("--splits", type=positive_int, default=5, help="evaluation splits (default 5)")
    f.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    f.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from calofm.adapters.config import init_class
    from calofm.adapters.files import load_model_with_adapters
    from calofm.cli._stage import stage_train_config
    from calofm.errors import CalofmError
    from calofm.model.config import class_name
    from calofm.study.config import StudyConfig
    from calofm.study.finetune import run_finetune_study

    classes = list(load_model_with_adapters(args.model, args.adapter).classes)
    forgetting = []
    for spec in args.forgetting:
        cls, sep, path = spec.partition("=")
        if not sep or cls not in classes:
            raise CalofmError(f"--forgetting {spec}: expected BASE_CLASS=PATH, classes {classes}")
        forgetting.append((cls, path))
    config = StudyConfig(
        class_name=class_name(args.material, args.particle),
        train_paths=tuple(args.data),
        test_path=args.test,
        n_events=tuple(args.n_events),
        repeats=args.repeats,
        methods=tuple(args.methods),
        init_from=init_class(classes, args.init_from, args.particle),
        n_generate=args.n_generate,
        n_forgetting=args.n_forgetting,
        forgetting=tuple(forgetting),
        val_fraction=args.val_fraction,
        seed=args.seed,
        generate_batch=args.generate_batch,
        max_hits=args.max_hits,
        eval_splits=args.splits,
        adapter_dirs=tuple(args.adapter),
    )
    train_config = stage_train_config(args)
    summary = run_finetune_study(
        args.model, config, train_config, args.out, args.device, overwrite=args.overwrite
    )
    keys = ["energy_sum", "n_hits", "cog_z", "classifier_auc"]
    keys = [k for k in keys if k in summary["floor"]]
    print(f"{summary['class']}: {summary['n_compared']} vs {summary['n_compared']} showers")
    print(f"{'':24}" + "".join(f"{k:>22}" for k in keys))
    print(f"{'floor':24}" + "".join(f"{_num(summary['floor'][k]):>22}" for k in keys))
    for name, scores in summary["groups"].items():
        cells = "".join(
            f"{_num(scores[k]['mean']):>13} ± {_num(scores[k]['std']):<6}" for k in keys
        )
        print(f"{name:24}{cells}")
    print(f"summary: {args.out}/study.json")
    return 0


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
