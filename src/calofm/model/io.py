"""Model files: ``model.safetensors`` (weights, never pickle) and ``manifest.json`` (the rest).

The manifest holds the model, tokenizer and detector configs, the class list, provenance, the calofm
version and a sha256 content hash of the weights, so a model is rebuilt from its directory alone and
loading checks it got exactly the tensors it expects. Files are written under temporary names and
renamed, weights first: an interrupted save leaves a hash mismatch, never a silently wrong model.
A model may be stored in float16 (``storage_dtype``, for shipped models): it loads as float32, and
the hash is that of the float32 weights it loads as, so adapters check against what runs.
A name of a shipped model (``calofm.pretrained``) works wherever a directory does.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calofm import __version__
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.files import read_manifest_file
from calofm.model.config import ModelConfig
from calofm.model.transformer import CaloFM
from calofm.pretrained import resolve_model, shipped_models
from calofm.tokens import TokenizerConfig

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


def weights_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and raw bytes in name order; independent of file layout."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _weights(model: CaloFM) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def model_hash(model: CaloFM) -> str:
    return weights_hash(_weights(model))


STORAGE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def save_model(
    model: CaloFM,
    directory: str | os.PathLike[str],
    provenance: dict,
    storage_dtype: str = "float32",
) -> Path:
    """Write the model into ``directory`` (created if needed; other files there are left alone).

    ``storage_dtype="float16"`` halves the file; the float32 weights it loads as are hashed.
    """
    if storage_dtype not in STORAGE_DTYPES:
        raise CalofmError(f"model: storage dtype must be one of {', '.join(STORAGE_DTYPES)}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    stored = {
        k: v.to(STORAGE_DTYPES[storage_dtype]) if v.is_floating_point() else v
        for k, v in _weights(model).items()
    }
    tensors = _as_loaded(stored)
    manifest = {
        "format": "calofm-model",
        "format_version": FORMAT_VERSION,
        "calofm_version": __version__,
        "model": model.config.to_dict(),
        "tokenizer": model.tokenizer.to_dict(),
        "detector": model.detector.to_dict(),
        "classes": list(model.classes),
        "provenance": provenance,
        "n_parameters": model.n_parameters(),
        "weights_sha256": weights_hash(tensors),
        "storage_dtype": storage_dtype,
    }
    tmp_weights = directory / f".{WEIGHTS_FILE}.{os.getpid()}.tmp"
    tmp_manifest = directory / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
    try:
        save_file(stored, str(tmp_weights), metadata={"format": "pt"})
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp_weights, directory / WEIGHTS_FILE)
        os.replace(tmp_manifest, directory / MANIFEST_FILE)
    finally:
        tmp_weights.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
    return directory


def _as_loaded(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Stored tensors as the model holds them: floating point in float32."""
    return {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}


def read_manifest(directory: str | os.PathLike[str]) -> dict:
    directory = resolve_model(directory)
    if not directory.is_dir():
        names = ", ".join(shipped_models()) or "none"
        raise CalofmError(
            f"{directory}: no such model directory (and no shipped model of that name; shipped: "
            f"{names})"
        )
    required = ("model", "tokenizer", "detector", "classes", "weights_sha256")
    return read_manifest_file(
        directory, MANIFEST_FILE, "calofm-model", FORMAT_VERSION, required, "model"
    )


def build_from_manifest(manifest: dict) -> CaloFM:
    """An untrained model with the manifest's architecture (configs and classes)."""
    try:
        return CaloFM(
            ModelConfig.from_dict(manifest["model"]),
            TokenizerConfig.from_dict(manifest["tokenizer"]),
            DetectorConfig.from_dict(manifest["detector"]),
            list(manifest["classes"]),
        )
    except TypeError as exc:
        raise CalofmError(f"model manifest: bad config ({exc})") from None


def load_model(directory: str | os.PathLike[str], device: str | torch.device = "cpu") -> CaloFM:
    """Rebuild a model from its directory; any mismatch between manifest and weights is an error."""
    directory = resolve_model(directory)
    manifest = read_manifest(directory)
    model = build_from_manifest(manifest)
    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise CalofmError(f"{directory}: missing {WEIGHTS_FILE}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CalofmError(f"{path}: unreadable weights ({exc.__class__.__name__}: {exc})") from None
    storage = manifest.get("storage_dtype", "float32")
    if storage not in STORAGE_DTYPES:
        raise CalofmError(f"{directory}: unknown storage dtype {storage!r} in the manifest")
    if storage != "float32":
        wrong = [
            k
            for k, t in tensors.items()
            if t.is_floating_point() and t.dtype != STORAGE_DTYPES[storage]
        ]
        if wrong:
            raise CalofmError(f"{path}: tensor {wrong[0]} is not stored as {storage}")
        tensors = _as_loaded(tensors)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CalofmError(
            f"{path}: weights do not match the manifest's model: missing {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
            f"{'...' if len(unexpected) > 5 else ''}"
        )
    for name, t in tensors.items():
        want = expected[name]
        if t.shape != want.shape or t.dtype != want.dtype:
            raise CalofmError(
                f"{path}: tensor {name} is {t.dtype} {tuple(t.shape)}, expected {want.dtype} "
                f"{tuple(want.shape)}"
            )
    if weights_hash(tensors) != manifest["weights_sha256"]:
        raise CalofmError(f"{path}: weights hash does not match the manifest (corrupt or replaced)")
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()
