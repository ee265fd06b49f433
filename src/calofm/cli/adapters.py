"""``calofm adapters list``: a base model's classes and the adapters given or found next to it."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "adapters",
        help="inspect adapters",
        description="Inspect a base model and its adapters.",
    )
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    ls = sub.add_parser(
        "list",
        help="list a model's classes and adapters",
        description=(
            "List the base model's classes, then each adapter given with --adapter or found in "
            "MODEL_DIR/*/ and MODEL_DIR/adapters/*/: kind, class or particle, parameters, LoRA "
            "rank and scale, whether it was made for this base model, what it was stacked on and "
            "what it was trained on; then the classes the model has with all of them loaded."
        ),
    )
    ls.add_argument("model", metavar="MODEL_DIR")
    ls.add_argument("--adapter", action="append", default=[], metavar="ADAPTER_DIR")
    ls.add_argument("--json", action="store_true", help="print the listing as JSON")
    ls.set_defaults(func=run_list)


def _found(model_dir: Path) -> list[Path]:
    from calofm.adapters.files import MANIFEST_FILE

    return sorted(
        p.parent
        for pattern in ("*", "adapters/*")
        for p in model_dir.glob(f"{pattern}/{MANIFEST_FILE}")
    )


def _tensors_ok(directory: Path, manifest: dict) -> bool:
    """Whether an adapter's tensor file reads and matches its manifest's hash."""
    from safetensors.torch import load_file

    from calofm.adapters.files import TENSORS_FILE
    from calofm.model.io import weights_hash

    try:
        tensors = load_file(str(directory / TENSORS_FILE))
    except Exception:  # safetensors raises its own error types for corrupt files
        return False
    return weights_hash(tensors) == manifest["adapter_sha256"]


def run_list(args: argparse.Namespace) -> int:
    from calofm.adapters.files import read_manifest
    from calofm.model.io import load_model
    from calofm.model.io import read_manifest as read_model_manifest
    from calofm.pretrained import resolve_model

    model_dir = resolve_model(args.model)
    base = read_model_manifest(model_dir)
    load_model(model_dir)  # a truncated or altered weights file is an error, not a listing
    dirs = list(dict.fromkeys(Path(d).resolve() for d in [*args.adapter, *_found(model_dir)]))
    manifests = {d: read_manifest(d) for d in dirs}
    hashes = {m["adapter_sha256"]: m["name"] for m in manifests.values()}
    rows = []
    for d, m in manifests.items():
        deps = m["stacked_on"]
        data = m.get("provenance", {}).get("data", {})
        rows.append(
            {
                "dir": str(d),
                "name": m["name"],
                "kind": m["kind"],
                "class": m.get("class"),
                "particle": m.get("particle"),
                "parameters": m.get("n_parameters", {}).get("total"),
                "rank": m["config"].get("rank") if m["kind"] != "expert" else None,
                "scale": m.get("lora_scale"),
                "base_ok": m["base_weights_sha256"] == base["weights_sha256"],
                "stacked_on": [e["name"] for e in deps],
                "missing": [e["name"] for e in deps if e["sha256"] not in hashes],
                "tensors_ok": _tensors_ok(d, m),
                "n_train": data.get("n_train"),
                "sha256": m["adapter_sha256"],
            }
        )
    classes = list(base["classes"]) + [
        r["class"]
        for r in rows
        if r["class"] and r["base_ok"] and not r["missing"] and r["tensors_ok"]
    ]
    if args.json:
        print(
            json.dumps(
                {
                    "model": str(model_dir),
                    "base_classes": base["classes"],
                    "weights_sha256": base["weights_sha256"],
                    "adapters": rows,
                    "classes_with_adapters": classes,
                },
                indent=1,
            )
        )
        return 0
    print(f"base model {model_dir}")
    n_base = base.get("n_parameters", 0)
    print(f"  weights sha256 {base['weights_sha256'][:12]}, {n_base:,} parameters")
    print(f"  classes: {', '.join(base['classes'])}")
    print(f"adapters: {len(rows) or 'none given or found'}")
    for r in rows:
        lora = f"rank {r['rank']} scale {r['scale']:.3g}" if r["rank"] else "no LoRA"
        status = "ok" if r["base_ok"] else "OTHER BASE MODEL (refused on load)"
        if r["missing"]:
            status += f"; needs {', '.join(r['missing'])} (not listed)"
        if not r["tensors_ok"]:
            status += "; TENSORS UNREADABLE OR ALTERED (refused on load)"
        print(
            f"  {r['name']:<16} {r['kind']:<16} {r['parameters'] or 0:>12,} params  {lora:<20} "
            f"{status}"
            + (f"; stacked on {', '.join(r['stacked_on'])}" if r["stacked_on"] else "")
            + (f"; trained on {r['n_train']} showers" if r["n_train"] is not None else "")
        )
        print(f"    {r['dir']}")
    if rows:
        print(f"classes with these adapters: {', '.join(classes)}")
    return 0
