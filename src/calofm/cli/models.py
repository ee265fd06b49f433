"""``calofm models``: the pretrained base models shipped with calofm."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the pretrained models shipped with calofm",
        description=(
            "List the pretrained base models shipped with calofm. Each name works wherever a "
            "model directory does (calofm generate --model NAME, extend, adapt-particle, study); "
            "the model card is docs/models.md."
        ),
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of a table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from calofm.model.io import WEIGHTS_FILE, read_manifest
    from calofm.pretrained import shipped_models

    rows = []
    for name, directory in shipped_models().items():
        manifest = read_manifest(directory)
        training = manifest.get("provenance", {}).get("training", {})
        rows.append(
            {
                "name": name,
                "classes": manifest["classes"],
                "parameters": manifest["n_parameters"],
                "file_mib": (directory / WEIGHTS_FILE).stat().st_size / 2**20,
                "storage_dtype": manifest.get("storage_dtype", "float32"),
                "best_val_loss": training.get("best_val_loss"),
                "directory": str(directory),
                "weights_sha256": manifest["weights_sha256"],
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print("no models are shipped with this installation")
        return 0
    for r in rows:
        loss = "n/a" if r["best_val_loss"] is None else f"{r['best_val_loss']:.3f}"
        print(
            f"{r['name']}: {', '.join(r['classes'])}; {r['parameters']:,} parameters, "
            f"{r['file_mib']:.1f} MiB ({r['storage_dtype']}); validation loss {loss}; "
            f"{r['directory']}"
        )
    return 0
