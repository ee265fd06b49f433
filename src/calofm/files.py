"""Outputs appear under their final name only when complete: write to a temporary name, then rename.

Every command checks its output paths here before it creates anything, so a refused command leaves
the file system as it found it, and a complete output is replaced only when the user says so.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Iterator
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


def check_parent(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Refuse a path whose nearest existing ancestor is a file or cannot be written in; a path
    problem found here is one error line instead of an OSError half-way through a run."""
    path = Path(path)
    for parent in path.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise CalofmError(f"{option} {path}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise CalofmError(f"{option} {path}: cannot write in {parent} (permission denied)")
            break
    return path


def check_output_file(path: str | os.PathLike[str], overwrite: bool, option: str = "--out") -> Path:
    """Check an output file before anything is created: writable, not a directory, and not a
    complete output unless ``overwrite`` (the old file then stays until the new one is complete)."""
    path = check_parent(path, option)
    if path.is_dir():
        raise CalofmError(f"{option} {path}: is a directory; {option} needs a file name")
    if path.exists() and not overwrite:
        raise CalofmError(
            f"{path} exists (a complete output); add --overwrite to replace it, or choose "
            f"another {option}"
        )
    return path


def check_output_dir(path: str | os.PathLike[str], option: str = "--out") -> Path:
    """Check an output directory before anything is created: writable and not a file."""
    path = check_parent(path, option)
    if path.exists() and not path.is_dir():
        raise CalofmError(f"{option} {path}: is a file; {option} needs a directory")
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        raise CalofmError(f"{option} {path}: cannot write in it (permission denied)")
    return path


def remove_outputs(directory: Path, names: Iterable[str]) -> None:
    """Remove the named files or folders of an earlier run in ``directory`` (and nothing else)."""
    for name in names:
        target = directory / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()


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
