"""Training checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint directory holds ``model.safetensors`` (the full state dict),
``optimizer.safetensors`` (the optimizer's per-parameter tensors, flattened as
``"<param index>.<name>"``), ``rng.safetensors`` (torch's CPU and CUDA generator states) and
``state.json`` (step, epoch, position in the epoch, elapsed time, best validation loss, the
optimizer's scalar settings and the run's signature).
It is written under a temporary name and swapped in, so an interruption leaves the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calofm.errors import CalofmError

FORMAT_VERSION = 1


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def save_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict
) -> None:
    """Write a complete checkpoint to ``directory`` (replacing the previous one only when done)."""
    directory = Path(directory)
    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(f"{directory.name}.old")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    model_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(model_state, tmp / "model.safetensors")
    tensors, opt_json = _optimizer_tensors(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors")
    save_file(_rng_tensors(), tmp / "rng.safetensors")
    doc = {"format_version": FORMAT_VERSION, "optimizer": opt_json, **state}
    (tmp / "state.json").write_text(json.dumps(doc, indent=1, sort_keys=True))
    if directory.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)


def find_checkpoint(directory: Path) -> Path | None:
    """The checkpoint to resume from; the previous one if a swap was interrupted half-way."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(f"{directory.name}.old")):
        if (candidate / "state.json").is_file():
            return candidate
    return None


def load_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> dict:
    """Restore model, optimizer and RNG states in place; returns the JSON state."""
    directory = Path(directory)
    try:
        doc = json.loads((directory / "state.json").read_text())
        model_state = load_file(directory / "model.safetensors")
        tensors = load_file(directory / "optimizer.safetensors")
        rng = load_file(directory / "rng.safetensors")
    except (OSError, ValueError, json.JSONDecodeError) as exc:
        raise CalofmError(
            f"{directory}: unreadable checkpoint ({exc.__class__.__name__})"
        ) from None
    if doc.get("format_version") != FORMAT_VERSION:
        raise CalofmError(
            f"{directory}: checkpoint format {doc.get('format_version')} not supported"
        )
    try:
        missing, unexpected = model.load_state_dict(model_state, strict=False)
    except RuntimeError:
        raise CalofmError(
            f"{directory}: checkpoint tensors have other shapes than the model"
        ) from None
    if missing or unexpected:
        raise CalofmError(
            f"{directory}: checkpoint does not match the model "
            f"(missing {len(missing)}, unexpected {len(unexpected)} tensors)"
        )
    per_param: dict[int, dict] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    for key, value in doc["optimizer"]["scalars"].items():
        index, name = key.split(".", 1)
        per_param.setdefault(int(index), {})[name] = value
    try:
        optimizer.load_state_dict(
            {"state": per_param, "param_groups": doc["optimizer"]["param_groups"]}
        )
    except (ValueError, KeyError) as exc:
        raise CalofmError(f"{directory}: optimizer state does not match ({exc})") from None
    torch.set_rng_state(rng["torch"])
    cuda = [rng[k] for k in sorted(rng) if k.startswith("cuda.")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return doc
