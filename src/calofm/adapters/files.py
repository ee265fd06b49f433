"""Adapter files: ``adapter.safetensors`` (the adapter's tensors only) and ``adapter.json``.

The manifest holds the adapter's config (kind, particle or class, rank and scale), its parameter
counts, the content hash of its tensors, the content hash of the base weights it was trained on
(``weights_sha256`` of the base model's manifest), the adapters it was stacked on with their hashes,
and provenance (command, training data, training summary). Loading refuses an adapter made for
another base model, a missing dependency, or tensors that do not match the manifest.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calofm import __version__
from calofm.adapters.attach import AttachedAdapter, attach, detach, registry
from calofm.adapters.config import AdapterConfig
from calofm.errors import CalofmError
from calofm.files import read_manifest_file
from calofm.model.io import load_model, weights_hash
from calofm.model.transformer import CaloFM

FORMAT_VERSION = 1
TENSORS_FILE = "adapter.safetensors"
MANIFEST_FILE = "adapter.json"


def save_adapter(
    model: CaloFM, name: str, directory: str | os.PathLike[str], provenance: dict
) -> Path:
    """Write one attached adapter into ``directory`` (other files there are left alone)."""
    reg = registry(model)
    if name not in reg.adapters:
        raise CalofmError(f"no adapter named {name} is attached")
    adapter = reg.adapters[name]
    stacked_on = []
    for under in adapter.stacked_on:
        digest = weights_hash(_cpu(reg.adapters[under].tensors()))
        if reg.adapters[under].sha256 != digest:
            raise CalofmError(
                f"adapter {name} sits on adapter {under}, which is not saved as it is now; "
                "save that one first"
            )
        stacked_on.append({"name": under, "sha256": digest})
    tensors = _cpu(adapter.tensors())
    digest = weights_hash(tensors)
    config = adapter.config
    manifest = {
        "format": "calofm-adapter",
        "format_version": FORMAT_VERSION,
        "calofm_version": __version__,
        "name": config.name,
        "kind": config.kind,
        "particle": config.class_particle,
        "class": config.class_name,
        "config": config.to_dict(),
        "lora_scale": config.scale if config.particle is not None else None,
        "n_parameters": adapter.counts(),
        "n_base_parameters": sum(
            v.numel() for k, v in model.state_dict().items() if k in reg.base_keys
        ),
        "base_weights_sha256": reg.base_hash,
        "base_classes": list(reg.base_classes),
        "stacked_on": stacked_on,
        "adapter_sha256": digest,
        "provenance": provenance,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tmp_tensors = directory / f".{TENSORS_FILE}.{os.getpid()}.tmp"
    tmp_manifest = directory / f".{MANIFEST_FILE}.{os.getpid()}.tmp"
    try:
        save_file(tensors, str(tmp_tensors), metadata={"format": "pt"})
        tmp_manifest.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
        os.replace(tmp_tensors, directory / TENSORS_FILE)
        os.replace(tmp_manifest, directory / MANIFEST_FILE)
    finally:
        tmp_tensors.unlink(missing_ok=True)
        tmp_manifest.unlink(missing_ok=True)
    adapter.sha256, adapter.source, adapter.manifest = digest, str(directory), manifest
    return directory


def _cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


def read_manifest(directory: str | os.PathLike[str]) -> dict:
    required = ("config", "base_weights_sha256", "stacked_on", "adapter_sha256")
    manifest = read_manifest_file(
        Path(directory), MANIFEST_FILE, "calofm-adapter", FORMAT_VERSION, required, "adapter"
    )
    AdapterConfig.from_dict(manifest["config"])
    return manifest


def load_adapter(model: CaloFM, directory: str | os.PathLike[str]) -> AttachedAdapter:
    """Attach the adapter saved in ``directory`` to ``model`` (its dependencies attached first)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    reg = registry(model)
    config = AdapterConfig.from_dict(manifest["config"])
    if manifest["base_weights_sha256"] != reg.base_hash:
        raise CalofmError(
            f"{directory}: adapter {config.name} was trained on another base model (weights "
            f"{manifest['base_weights_sha256'][:12]}, this model's {reg.base_hash[:12]})"
        )
    attached = {a.sha256 for a in reg.adapters.values()}
    for dep in manifest["stacked_on"]:
        if dep["sha256"] not in attached:
            raise CalofmError(
                f"{directory}: adapter {config.name} was trained on top of adapter {dep['name']} "
                f"({dep['sha256'][:12]}); load that one too"
            )
    path = directory / TENSORS_FILE
    if not path.is_file():
        raise CalofmError(f"{directory}: missing {TENSORS_FILE}")
    try:
        tensors = load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise CalofmError(f"{path}: unreadable tensors ({exc.__class__.__name__}: {exc})") from None
    if weights_hash(tensors) != manifest["adapter_sha256"]:
        raise CalofmError(f"{path}: tensors do not match the manifest's hash (corrupt or replaced)")
    adapter = attach(model, config, generator=torch.Generator(), initialise=False)
    try:
        _copy_tensors(adapter, tensors, path)
    except CalofmError:
        detach(model, config.name)
        raise
    for p in adapter.parameters():
        p.requires_grad_(False)  # a loaded adapter is frozen; a stage trains only its new one
    adapter.stacked_on = [e["name"] for e in manifest["stacked_on"]]
    adapter.sha256, adapter.source, adapter.manifest = (
        manifest["adapter_sha256"],
        str(directory),
        manifest,
    )
    return adapter


def _copy_tensors(adapter: AttachedAdapter, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = adapter.tensors()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CalofmError(
            f"{path}: tensors do not match the adapter's config: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    for name, t in tensors.items():
        if t.shape != expected[name].shape or t.dtype != expected[name].dtype:
            raise CalofmError(
                f"{path}: tensor {name} is {t.dtype} {tuple(t.shape)}, the model expects "
                f"{expected[name].dtype} {tuple(expected[name].shape)}"
            )
    with torch.no_grad():
        for name, t in tensors.items():
            expected[name].copy_(t)


def load_adapters(
    model: CaloFM, directories: list[str | os.PathLike[str]]
) -> list[AttachedAdapter]:
    """Attach every adapter in ``directories``, each after the adapters it was stacked on."""
    pending = [(Path(d), read_manifest(d)) for d in directories]
    hashes = [m["adapter_sha256"] for _, m in pending]
    if len(set(hashes)) != len(hashes):
        raise CalofmError("the same adapter is given twice")
    out = []
    while pending:
        attached = {a.sha256 for a in registry(model).adapters.values()}
        ready = [
            i
            for i, (_, m) in enumerate(pending)
            if all(dep["sha256"] in attached for dep in m["stacked_on"])
        ]
        directory, _ = pending.pop(ready[0] if ready else 0)  # none ready: load_adapter explains
        out.append(load_adapter(model, directory))
    return out


def load_model_with_adapters(
    model_dir: str | os.PathLike[str],
    adapter_dirs: list[str | os.PathLike[str]],
    device: str | torch.device = "cpu",
) -> CaloFM:
    """The base model in ``model_dir`` with the adapters in ``adapter_dirs`` attached."""
    model = load_model(model_dir, "cpu")
    load_adapters(model, list(adapter_dirs))
    return model.to(device).eval()
