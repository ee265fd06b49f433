"""The pieces of a training step the trainer assembles: the loss module DDP wraps, the optimizer,
autocast, validation, and the fingerprints that make a resume with other data or settings fail.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from torch import nn

from calofm.data.batches import BucketBatchSampler, TokenDataset, collate, eval_batches, shard
from calofm.errors import CalofmError
from calofm.training import distributed
from calofm.training.config import TrainConfig


class LossModule(nn.Module):
    """Routes DDP's forward to ``model.loss``, so gradient averaging hooks into the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, spatial, energy, incident, class_id, fed_energy=None):
        return self.model.loss(spatial, energy, incident, class_id, fed_energy)


def loss_module(model: nn.Module, env: distributed.DistEnv) -> nn.Module:
    """``model.loss`` as a module, wrapped in DDP when several processes train.

    ``find_unused_parameters`` is needed: a batch routes its rows to the experts of the classes it
    holds, so the experts of the other classes get no gradient, and the shower-totals networks
    (fitted apart, before the run) never get one from the loss. Which parameters go unused changes
    from batch to batch and from process to process, so a static graph does not fit either.
    """
    net: nn.Module = LossModule(model)
    if env.active:
        net = nn.parallel.DistributedDataParallel(
            net,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    return net


def self_drawn_energies(
    model: nn.Module, batch: dict[str, torch.Tensor], share: float, generator: torch.Generator
) -> torch.Tensor:
    """The energy tokens a step feeds (B, T): the shower's own, with each hit's replaced by the
    model's draw at that position (``CaloFM.energy_draws``) with probability ``share``.

    The start token and the tokens past a shower's last hit are always the shower's own.
    """
    spatial, energy = batch["spatial"], batch["energy"]
    fed = energy[:, :-1]
    draws = model.energy_draws(spatial, energy, batch["incident"], batch["class_id"], generator)
    hit = torch.zeros_like(fed, dtype=torch.bool)
    hit[:, 1:] = fed[:, 1:] < model.tokenizer.n_bins
    chosen = hit & (torch.rand(fed.shape, generator=generator, device=fed.device) < share)
    # the token fed at position j is the one position j - 1 predicts
    drawn = torch.cat([fed[:, :1], draws[:, :-1]], dim=1)
    return torch.where(chosen, drawn, fed)


def batch_plan(
    config: TrainConfig, train_set: TokenDataset, val_set: TokenDataset | None, world_size: int
) -> tuple[BucketBatchSampler, list[np.ndarray]]:
    """The sampler of the training batches of every epoch, and the validation batches."""
    sampler = BucketBatchSampler(
        train_set.lengths,
        train_set.class_id,
        seed=config.seed,
        batch_size=config.batch_size,
        batch_tokens=config.batch_tokens,
        pool_batches=config.pool_batches,
        world_size=world_size,
    )
    if sampler.n_batches(0) == 0:
        raise CalofmError("training: too few showers for one batch per process")
    val_batches = (
        eval_batches(val_set.lengths, config.batch_size, config.batch_tokens)
        if val_set is not None and len(val_set)
        else []
    )
    return sampler, val_batches


def batch_on(
    dataset: TokenDataset, rows: np.ndarray, device: torch.device
) -> dict[str, torch.Tensor]:
    """The padded tensors of ``rows`` on ``device``."""
    return {k: v.to(device, non_blocking=True) for k, v in collate(dataset, rows).items()}


def autocast(device: torch.device, enabled: bool) -> torch.autocast:
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


class LossSums:
    """Token-weighted loss sums and the token count, kept on the device (float64): adding a step's
    losses does not wait for the accelerator; reading them (``summed``) is one synchronisation."""

    KEYS = ("loss", "spatial", "energy", "tokens")

    def __init__(self, device: torch.device, sums: dict[str, float] | None = None):
        values = [(sums or {}).get(k, 0.0) for k in self.KEYS]
        self.sums = torch.tensor(values, dtype=torch.float64, device=device)

    def add(self, losses: tuple[torch.Tensor, ...], n_tokens: int) -> None:
        self.sums[:3] += torch.stack([v.detach().double() for v in losses]) * n_tokens
        self.sums[3] += n_tokens

    def summed(self, env: distributed.DistEnv) -> dict[str, float]:
        """Summed over processes."""
        return dict(zip(self.KEYS, distributed.all_sum(env, self.sums.tolist()), strict=True))

    def clear(self) -> None:
        self.sums.zero_()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: TokenDataset,
    batches: list[np.ndarray],
    env: distributed.DistEnv,
    amp: bool = False,
) -> dict[str, float]:
    """Token-weighted mean losses over every shower of ``dataset`` (summed over processes)."""
    was_training = model.training
    model.eval()
    sums = LossSums(env.device)
    for global_batch in batches:
        part = shard(global_batch, env.rank, env.world_size)
        if not len(part):
            continue
        b = batch_on(dataset, part, env.device)
        with autocast(env.device, amp):
            losses = model.loss(b["spatial"], b["energy"], b["incident"], b["class_id"])
        sums.add(losses, dataset.n_targets(part))
    model.train(was_training)
    total = sums.summed(env)
    n = max(total["tokens"], 1.0)
    return {
        "loss": total["loss"] / n,
        "spatial": total["spatial"] / n,
        "energy": total["energy"] / n,
    }


def make_optimizer(trainable: list[nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices and embedding tables only, not on biases and norms.

    The fused implementation: on 2 CPU cores the element-wise update of the 3.5M-entry voxel
    embedding is otherwise a quarter of a step of the small preset.
    """
    decay = [p for p in trainable if p.ndim >= 2]
    rest = [p for p in trainable if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if rest:
        groups.append({"params": rest, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=True)


def dataset_fingerprint(dataset: TokenDataset) -> str:
    """A hash of the encoded data, so that a resume with different data is refused."""
    digest = hashlib.sha256()
    for array in (
        dataset.lengths,
        dataset.class_id,
        dataset.incident,
        dataset.spatial,
        dataset.energy,
    ):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def run_signature(
    config: TrainConfig,
    train_set: TokenDataset,
    val_set: TokenDataset | None,
    n_trainable: int,
    n_total: int,
) -> dict:
    """What a checkpoint must have been made with to be resumed."""
    return {
        "train_config": config.to_dict(),
        "data": dataset_fingerprint(train_set),
        "val_data": dataset_fingerprint(val_set) if val_set is not None else None,
        "classes": list(train_set.classes),
        "n_trainable": n_trainable,
        "n_parameters": n_total,
    }
