"""Adapter files: ``adapter.safetensors`` (the adapter's tensors only) and ``adapter.json``.

The manifest holds the adapter's config (kind, particle or class, rank and scale), its parameter
counts, the content hash of its tensors, the content hash of the base weights it was trained on
(``weights_sha256`` of the base model's manifest), the adapters it was stacked on with their hashes,
and provenance (command, training data, training summary). Loading refuses an adapter made for
another base model, a missing dependency, or tensors that do not match the manifest.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from calofm import __version__
from calofm.adapters.config import AdapterConfig
from calofm.adapters.model import AdaptedModel, Adapter
from calofm.errors import CalofmError
from calofm.files import read_manifest_file
from calofm.model.io import load_model
from calofm.tensorfiles import (
    check_tensors,
    cpu_copy,
    read_tensor_file,
    weights_hash,
    write_tensor_files,
)

FORMAT_VERSION = 1
TENSORS_FILE = "adapter.safetensors"
MANIFEST_FILE = "adapter.json"


def save_adapter(
    model: AdaptedModel, name: str, directory: str | os.PathLike[str], provenance: dict
) -> Path:
    """Write one adapter of ``model`` into ``directory`` (other files there are left alone)."""
    adapter = model.adapter(name)
    stacked_on = []
    for under in adapter.stacked_on:
        digest = weights_hash(model.adapters[under].tensors())
        if model.adapters[under].sha256 != digest:
            raise CalofmError(
                f"adapter {name} sits on adapter {under}, which is not saved as it is now; "
                "save that one first"
            )
        stacked_on.append({"name": under, "sha256": digest})
    tensors = cpu_copy(adapter.tensors())
    digest = weights_hash(tensors)
    config = adapter.config
    base_state = model.base.state_dict()
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
        "n_base_parameters": sum(base_state[k].numel() for k in model.base_keys),
        "base_weights_sha256": model.base_hash,
        "base_classes": list(model.base_classes),
        "stacked_on": stacked_on,
        "adapter_sha256": digest,
        "provenance": provenance,
    }
    write_tensor_files(directory, TENSORS_FILE, tensors, MANIFEST_FILE, manifest)
    adapter.sha256, adapter.source, adapter.manifest = digest, str(directory), manifest
    return Path(directory)


def read_manifest(directory: str | os.PathLike[str]) -> dict:
    """An adapter's manifest, its config, hashes and dependencies checked for form (an edited or
    damaged manifest is one error line naming it, never a TypeError where it is used)."""
    required = ("config", "base_weights_sha256", "stacked_on", "adapter_sha256")
    manifest = read_manifest_file(
        Path(directory), MANIFEST_FILE, "calofm-adapter", FORMAT_VERSION, required, "adapter"
    )
    path = Path(directory) / MANIFEST_FILE
    if not isinstance(manifest["config"], dict):
        raise CalofmError(f"{path}: malformed adapter manifest (config is not an object)")
    try:
        AdapterConfig.from_dict(manifest["config"])
    except CalofmError as exc:
        raise CalofmError(f"{path}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise CalofmError(f"{path}: malformed adapter manifest (config: {exc})") from None
    for key in ("base_weights_sha256", "adapter_sha256"):
        if not isinstance(manifest[key], str):
            raise CalofmError(f"{path}: malformed adapter manifest ({key} is not a hash)")
    deps = manifest["stacked_on"]
    if not isinstance(deps, list) or not all(
        isinstance(d, dict) and isinstance(d.get("name"), str) and isinstance(d.get("sha256"), str)
        for d in deps
    ):
        raise CalofmError(
            f"{path}: malformed adapter manifest (stacked_on must list adapters by name and sha256)"
        )
    return manifest


def load_adapter(model: AdaptedModel, directory: str | os.PathLike[str]) -> Adapter:
    """Add the adapter saved in ``directory`` to ``model`` (its dependencies must be there)."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    config = AdapterConfig.from_dict(manifest["config"])
    if manifest["base_weights_sha256"] != model.base_hash:
        raise CalofmError(
            f"{directory}: adapter {config.name} was trained on another base model (weights "
            f"{manifest['base_weights_sha256'][:12]}, this model's {model.base_hash[:12]})"
        )
    attached = {a.sha256 for a in model.adapters.values()}
    for dep in manifest["stacked_on"]:
        if dep["sha256"] not in attached:
            raise CalofmError(
                f"{directory}: adapter {config.name} was trained on top of adapter {dep['name']} "
                f"({dep['sha256'][:12]}); load that one too"
            )
    path = directory / TENSORS_FILE
    tensors = read_tensor_file(path, "tensors")
    if weights_hash(tensors) != manifest["adapter_sha256"]:
        raise CalofmError(f"{path}: tensors do not match the manifest's hash (corrupt or replaced)")
    adapter = model.add_adapter(config, generator=torch.Generator(), initialise=False)
    try:
        expected = adapter.tensors()
        check_tensors(path, tensors, expected, "the adapter's config")
    except CalofmError:
        model.remove_adapter(config.name)
        raise
    with torch.no_grad():
        for name, t in tensors.items():
            expected[name].copy_(t)
    for p in adapter.parameters():
        p.requires_grad_(False)  # a loaded adapter is frozen; a stage trains only its new one
    adapter.stacked_on = [e["name"] for e in manifest["stacked_on"]]
    adapter.sha256, adapter.source, adapter.manifest = (
        manifest["adapter_sha256"],
        str(directory),
        manifest,
    )
    return adapter


def load_adapters(model: AdaptedModel, directories: list[str | os.PathLike[str]]) -> list[Adapter]:
    """Add every adapter in ``directories``, each after the adapters it was stacked on."""
    pending = [(Path(d), read_manifest(d)) for d in directories]
    hashes = [m["adapter_sha256"] for _, m in pending]
    if len(set(hashes)) != len(hashes):
        raise CalofmError("the same adapter is given twice")
    out = []
    while pending:
        attached = {a.sha256 for a in model.adapters.values()}
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
) -> AdaptedModel:
    """The base model in ``model_dir`` wrapped, with the adapters in ``adapter_dirs`` loaded."""
    model = AdaptedModel(load_model(model_dir, "cpu"))
    load_adapters(model, list(adapter_dirs))
    return model.to(device).eval()
