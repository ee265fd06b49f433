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

import os
from pathlib import Path

import torch
from torch import nn

from calofm import __version__
from calofm.detector import DetectorConfig
from calofm.errors import CalofmError
from calofm.files import read_manifest_file
from calofm.model.config import ModelConfig
from calofm.model.transformer import CaloFM
from calofm.pretrained import resolve_model, shipped_models
from calofm.tensorfiles import (
    check_tensors,
    cpu_copy,
    read_tensor_file,
    weights_hash,
    write_tensor_files,
)
from calofm.tokens import TokenizerConfig

FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"


def model_hash(model: CaloFM) -> str:
    return weights_hash(model.state_dict())


def _foreign_module(model: nn.Module) -> bool:
    """Whether ``model`` holds a module a model built from its manifest would not (an adapter's),
    which ``load_model`` could not rebuild."""
    own = ("calofm.model.", "torch.nn.")
    return any(not type(m).__module__.startswith(own) for m in model.modules())


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
    if not isinstance(model, CaloFM) or _foreign_module(model):
        raise CalofmError(
            "save_model writes base models only: save an adapted model's adapters "
            "(save_adapter), or merge one particle adapter into a plain model (merge_lora) first"
        )
    stored = {
        k: v.to(STORAGE_DTYPES[storage_dtype]) if v.is_floating_point() else v
        for k, v in cpu_copy(model.state_dict()).items()
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
    return write_tensor_files(directory, WEIGHTS_FILE, stored, MANIFEST_FILE, manifest)


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
    tensors = read_tensor_file(path, "weights")
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
    check_tensors(path, tensors, model.state_dict(), "the manifest's model")
    if weights_hash(tensors) != manifest["weights_sha256"]:
        raise CalofmError(f"{path}: weights hash does not match the manifest (corrupt or replaced)")
    model.load_state_dict(tensors, strict=True)
    return model.to(device).eval()
