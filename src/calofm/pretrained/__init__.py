"""Pretrained base models shipped inside the package, loadable by name wherever a model directory
is accepted (``--model small-w-ta``). Each is an ordinary model directory (weights + manifest,
content-hashed); its model card is ``docs/models.md``."""

from __future__ import annotations

import os
from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent


def shipped_models() -> dict[str, Path]:
    """Name -> directory of every model shipped with this installation."""
    return {
        p.name: p
        for p in sorted(SHIPPED_DIR.iterdir())
        if p.is_dir() and (p / "manifest.json").is_file()
    }


def resolve_model(model: str | os.PathLike[str]) -> Path:
    """A model directory: ``model`` itself when it exists, else the shipped model of that name."""
    path = Path(model)
    if path.exists():
        return path
    return shipped_models().get(str(model), path)
