"""Outputs appear under their final name only when complete: write to a temporary name, then rename."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
