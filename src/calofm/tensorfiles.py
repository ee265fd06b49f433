"""Tensor files: a safetensors file of named tensors beside a JSON manifest holding its hash.

Models and adapters are both stored so, and both go through these helpers: the write is atomic
(temporary names, renamed tensors first, so an interrupted save leaves a hash mismatch, never a
silently wrong file) and the read refuses unreadable files and tensors other than expected by name,
shape or dtype, each with one line naming the file.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calofm.errors import CalofmError


def weights_hash(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes in name order; independent of file layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def cpu_copy(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors (what safetensors writes and the hash reads)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def write_tensor_files(
    directory: str | os.PathLike[str],
    tensors_file: str,
    tensors: dict[str, torch.Tensor],
    manifest_file: str,
    manifest: dict,
) -> Path:
    """Write ``tensors`` and ``manifest`` into ``directory`` (created; other files left alone)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_tensors = directory / f".{tensors_file}.{os.getpid()}.tmp"
    tmp_manifest = directory / f".{manifest_file}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(tmp_tensors), metadata={"format": "pt"})
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp_tensors, directory / tensors_file)
        os.replace(tmp_manifest, directory / manifest_file)
    finally:
        tmp_tensors.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
    return directory


def read_tensor_file(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of ``path``; ``what`` ("weights", "tensors") names them in the error lines."""
    if not path.is_file():
        raise CalofmError(f"{path.parent}: missing {path.name}")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CalofmError(f"{path}: unreadable {what} ({exc.__class__.__name__}: {exc})") from None


def check_tensors(
    path: Path,
    tensors: dict[str, torch.Tensor],
    expected: dict[str, torch.Tensor],
    what: str,
) -> None:
    """Refuse ``tensors`` unless they have exactly ``expected``'s names, shapes and dtypes.

    ``what`` says what they should match ("the manifest's model", "the adapter's config").
    """
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CalofmError(
            f"{path}: tensors do not match {what}: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for name, t in tensors.items():
        want = expected[name]
        if t.shape != want.shape or t.dtype != want.dtype:
            raise CalofmError(
                f"{path}: tensor {name} is {t.dtype} {tuple(t.shape)}, the model expects "
                f"{want.dtype} {tuple(want.shape)}"
            )
