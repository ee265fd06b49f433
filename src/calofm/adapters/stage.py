"""One adaptation stage: add a new adapter, train only it with the shared trainer, save only it.

Before and after training the stage records the logits of every class the model had before, on
one fixed random batch per class; with the base-weight hash this proves, at run time, that the
stage changed nothing but its own adapter.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from calofm.adapters.config import AdapterConfig
from calofm.adapters.files import save_adapter
from calofm.adapters.model import AdaptedModel
from calofm.data.batches import TokenDataset
from calofm.errors import CalofmError
from calofm.model.conditions import Conditions
from calofm.model.transformer import CaloFM
from calofm.tokens import Tokenizer
from calofm.training import distributed
from calofm.training.config import TrainConfig
from calofm.training.data import build_datasets, load_classes
from calofm.training.run import CHECKPOINT_DIR, TrainResult
from calofm.training.trainer import train

PROBE_TOKENS = 16


@dataclass
class StageResult:
    adapter_dir: Path
    counts: dict[str, int]  # the adapter's parameters per part and in total, and the model's total
    train: TrainResult


def stage_datasets(
    model: CaloFM | AdaptedModel,
    class_name: str,
    paths: list[str],
    *,
    n_events: int | None,
    val_fraction: float,
    seed: int,
    repeat: int = 0,
) -> tuple[TokenDataset, TokenDataset, dict]:
    """Training and validation tokens of one class (with the model's tokenizer) and provenance."""
    (data,) = load_classes(
        {class_name: paths}, n_train=n_events, val_fraction=val_fraction, seed=seed, repeat=repeat
    )
    ours = {k: v for k, v in model.detector.to_dict().items() if k != "material"}
    theirs = {k: v for k, v in data.selection.train.detector.to_dict().items() if k != "material"}
    if ours != theirs:
        raise CalofmError(f"{paths[0]}: detector geometry differs from the model's")
    train_set, val_set = build_datasets([data], Tokenizer(model.tokenizer), model.classes)
    return train_set, val_set, data.selection.provenance


@torch.no_grad()
def class_probe(model: CaloFM | AdaptedModel, classes: list[str]) -> list[torch.Tensor]:
    """Logits of each class on one fixed random batch (one class per forward pass), and its
    totals model's mixture where the model has one."""
    tok = model.tokenizer
    g = torch.Generator().manual_seed(0)
    spatial = torch.randint(0, tok.n_voxels, (2, PROBE_TOKENS), generator=g)
    energy = torch.randint(0, tok.energy_sos, (2, PROBE_TOKENS), generator=g)
    spatial[:, 0], energy[:, 0] = tok.spatial_sos, tok.energy_sos
    dev = model.energy_head.weight.device
    cond = Conditions((torch.rand(2, generator=g) * 2 - 1).to(dev))
    if model.totals is not None:
        hits, visible = torch.tensor([10, 100], device=dev), torch.tensor([50.0, 800.0], device=dev)
        cond = cond.with_totals(hits, visible)
    was_training = model.training
    model.eval()
    out = []
    for name in classes:
        class_id = torch.full((2,), model.class_index(name), device=dev)
        out.extend(model(spatial.to(dev), energy.to(dev), cond, class_id))
        if model.totals is not None:  # and the class's totals model
            features = cond.features(model.energy_head.weight.dtype)
            out.extend(model.totals.mixture(features, model.routing(class_id)))
    model.train(was_training)
    return out


def run_stage(
    model: AdaptedModel,
    config: AdapterConfig,
    paths: list[str],
    train_config: TrainConfig,
    out_dir: str | Path,
    *,
    n_events: int | None,
    val_fraction: float,
    repeat: int = 0,
    data_seed: int | None = None,
    device: str | None = None,
    resume: bool = False,
    provenance: dict | None = None,
    should_stop: Callable[[int], bool] | None = None,
    progress: bool = True,
) -> StageResult:
    """Add ``config``'s adapter to ``model`` (on the CPU), train it on ``paths``, save it.

    The new adapter is initialised from ``train_config.seed``; the training subset is drawn with
    ``data_seed`` (default: the same seed), so repeats can differ in seed yet keep disjoint
    subsets. Only the adapter's parameters train. The
    adapter (best by validation loss) goes to ``out_dir`` with the training log; the checkpoint
    the trainer keeps for resuming is removed once the stage has finished.
    """
    out_dir = Path(out_dir)
    model.to("cpu")
    known = list(model.classes)
    before = class_probe(model, known)
    others = [{"name": a.config.name, "sha256": a.sha256} for a in model.adapters.values()]
    generator = torch.Generator().manual_seed(train_config.seed)
    adapter = model.add_adapter(config, generator=generator)
    try:
        if config.class_name is None:
            raise CalofmError("a stage trains an adapter with an expert part (it needs a class)")
        train_set, val_set, data = stage_datasets(
            model,
            config.class_name,
            paths,
            n_events=n_events,
            val_fraction=val_fraction,
            seed=train_config.seed if data_seed is None else data_seed,
            repeat=repeat,
        )
    except Exception:
        model.remove_adapter(config.name)
        raise
    counts = {**adapter.counts(), "model_total": sum(p.numel() for p in model.parameters())}
    parts = ", ".join(f"{k} {v:,}" for k, v in counts.items() if k not in ("total", "model_total"))
    if distributed.setup(device).is_main:  # one process prints under torchrun
        print(
            f"adapter {config.name} ({config.kind}): {counts['total']:,} trainable parameters "
            f"({parts}) of {counts['model_total']:,} in the model "
            f"({100 * counts['total'] / counts['model_total']:.2f}%); everything else frozen",
            flush=True,
        )
        for message in train_set.messages() + val_set.messages():
            print(message, flush=True)
    prov = {
        **(provenance or {}),
        "data": data,
        "train": train_config.to_dict(),
        "adapters_present": others,
    }
    result = train(
        model.base,  # the adapters act from inside it; its checkpoints keep the base's names
        train_set,
        val_set,
        train_config,
        adapter.parameters(),
        out_dir,
        provenance=prov,
        resume=resume,
        device=device,
        save=lambda _, d, p: save_adapter(model, config.name, d, p),
        should_stop=should_stop,
        progress=progress,
    )
    model.to("cpu")
    model.check_base()
    after = class_probe(model, known)
    if not all(torch.equal(a, b) for a, b in zip(before, after, strict=True)):
        raise CalofmError("the stage changed the outputs of classes it should not touch")
    if not result.interrupted:
        shutil.rmtree(out_dir / CHECKPOINT_DIR, ignore_errors=True)
    return StageResult(out_dir, counts, result)
