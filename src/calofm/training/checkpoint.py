"""Training checkpoints without pickle: tensors in safetensors files, everything else in JSON.

A checkpoint directory holds ``model.safetensors`` (the full state dict),
``optimizer.safetensors`` (the optimizer's per-parameter tensors, flattened as
``"<param index>.<name>"``) and ``state.json`` (the run's ``Progress``, elapsed time, the
optimizer's scalar settings and the run's signature). Training draws no random numbers from
torch's global generators (the batches come from seeded numpy generators), so none are saved, and
resuming leaves the caller's generators alone. Checkpoints of earlier versions also hold
``rng.safetensors``; it is ignored.
It is written under a temporary name and swapped in, so an interruption leaves the previous one.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from calofm.errors import CalofmError
from calofm.tensorfiles import cpu_copy

FORMAT_VERSION = 1


@dataclass
class Progress:
    """Where a training run stands: saved in every checkpoint, restored on resume."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # batches of this epoch done
    best_val: float | None = None
    last_val: float | None = None
    last_val_step: int = -1


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
    model_state = cpu_copy(model.state_dict())
    save_file(model_state, tmp / "model.safetensors")
    tensors, opt_json = _optimizer_tensors(optimizer)
    save_file(tensors, tmp / "optimizer.safetensors")
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
    """Restore the model and optimizer states in place; returns the JSON state."""
    directory = Path(directory)
    try:
        doc = json.loads((directory / "state.json").read_text())
        model_state = load_file(directory / "model.safetensors")
        tensors = load_file(directory / "optimizer.safetensors")
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
    return doc


def resume_checkpoint(
    directory: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, signature: dict
) -> tuple[Progress, dict]:
    """Restore the last checkpoint in ``directory`` made with ``signature``: its progress and
    JSON state (elapsed time, the log's running sums). Another run's checkpoint is refused."""
    found = find_checkpoint(directory)
    if found is None:
        raise CalofmError(f"{directory.parent.parent}: no checkpoint to resume from in {directory}")
    doc = load_checkpoint(found, model, optimizer)
    if doc["signature"] != signature:
        changed = [k for k in signature if doc["signature"].get(k) != signature[k]]
        raise CalofmError(
            f"{found}: checkpoint was made with other settings ({', '.join(changed)}); "
            "resume with the original command"
        )
    return Progress(**{k: doc[k] for k in asdict(Progress())}), doc
