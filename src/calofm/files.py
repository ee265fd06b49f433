"""Outputs appear under their final name only when complete: write to a temporary name, then rename."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from calofm.errors import CalofmError


def partial_path(path: str | os.PathLike[str]) -> Path:
    """The temporary name a file is written under until it is complete (also the resume point)."""
    path = Path(path)
    return path.with_name(path.name + ".partial")


@contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to ``path``, on failure removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_manifest_file(
    directory: Path, filename: str, fmt: str, version: int, required: tuple[str, ...], what: str
) -> dict:
    """The JSON manifest of a calofm directory (model or adapter), checked for format and keys."""
    path = directory / filename
    if not path.is_file():
        raise CalofmError(f"{directory}: not a calofm {what} (no {filename})")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CalofmError(f"{path}: malformed JSON") from None
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise CalofmError(f"{path}: not a calofm {what} manifest")
    if manifest.get("format_version") != version:
        raise CalofmError(
            f"{path}: format version {manifest.get('format_version')!r}, this calofm reads "
            f"{version}"
        )
    missing = [k for k in required if k not in manifest]
    if missing:
        raise CalofmError(f"{path}: manifest lacks {', '.join(missing)}")
    return manifest
