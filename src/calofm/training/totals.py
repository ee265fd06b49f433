"""Fitting the shower-totals model (``calofm.model.totals``) before the transformer trains.

The totals model is a small density model of two numbers per shower; fitted jointly with the
transformer at its batch size of a few showers it is still far off after an epoch. Fitted apart,
on every training shower's totals in large batches, it converges in seconds. Only the networks of
classes being trained are fitted (a new material's, when an expert is added), so the totals of
classes already learned never change. The transformer is then trained conditioned on each
shower's own totals; the totals networks get no gradient from its loss.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from torch import nn

from calofm.data.batches import TokenDataset
from calofm.model.conditions import Conditions
from calofm.model.totals import to_point
from calofm.model.transformer import CaloFM


def dataset_totals(model: CaloFM, dataset: TokenDataset) -> tuple[np.ndarray, np.ndarray]:
    """Hit count and visible MeV per shower of ``dataset``, as ``CaloFM.totals_of`` counts them."""
    bin_mev = model.bin_mev.cpu().numpy().astype(np.float64)
    mev = bin_mev[dataset.energy]
    visible = np.zeros(len(dataset))
    nonempty = dataset.lengths > 0
    visible[nonempty] = np.add.reduceat(mev, dataset.offsets[:-1][nonempty])
    return dataset.lengths.copy(), np.maximum(visible, model.tokenizer.threshold_mev)


def fit_totals(
    model: CaloFM,
    dataset: TokenDataset,
    classes: list[int],
    *,
    steps: int | None = None,
    batch_size: int = 256,
    lr: float = 3e-3,
    seed: int = 0,
) -> dict[str, float]:
    """Fit the totals networks of ``classes`` (class ids) on ``dataset``; returns the final
    mean NLL per class name (nats of the density in log hits and log MeV).

    ``steps`` (per class) defaults to one per shower of the class, at least 200 and at most
    4000: 5000 showers need ~4000 steps to place the mixture at fixed energies within the
    spread of two Geant4 samples; a few hundred showers need far fewer.
    """
    assert model.totals is not None
    n_hits, visible = dataset_totals(model, dataset)
    ref = model.energy_head.weight
    incident = torch.from_numpy(dataset.incident).to(ref.device)
    features = Conditions(incident).features(ref.dtype)
    n_hits_t = torch.from_numpy(n_hits).to(ref.device)
    visible_t = torch.from_numpy(visible).to(device=ref.device, dtype=torch.float32)
    result: dict[str, float] = {}
    for c in classes:
        rows = np.flatnonzero(dataset.class_id == c)
        if len(rows) == 0:
            continue
        net = model.totals.nets[c]
        n_steps = steps if steps is not None else min(4000, max(200, len(rows)))
        batch = min(batch_size, 4 * len(rows))  # a few dozen showers need no batch of 256
        result[model.classes[c]] = _fit_one(
            model, net, c, rows, features, n_hits_t, visible_t, n_steps, batch, lr, seed + c
        )
    return result


def _fit_one(
    model: CaloFM,
    net: nn.Module,
    class_id: int,
    rows: np.ndarray,
    features: torch.Tensor,
    n_hits: torch.Tensor,
    visible: torch.Tensor,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
) -> float:
    """Adam with warm-up and cosine decay on one class's network; the last 100 steps' mean NLL."""
    assert model.totals is not None
    gen = torch.Generator().manual_seed(seed)
    rows_t = torch.from_numpy(rows).to(features.device)
    with torch.no_grad():  # the network predicts in units of the class's own spread
        half = torch.full((len(rows),), 0.5, device=features.device)
        points = to_point(n_hits[rows_t], visible[rows_t], half)
        net.center.copy_(points.mean(0))
        net.spread.copy_(points.std(0).clamp(min=1e-3) if len(rows) > 1 else torch.ones(2))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    routing = model.routing(torch.full((batch_size,), class_id, device=features.device))
    tail: list[float] = []
    for step in range(steps):
        scale = min(1.0, (step + 1) / 50) * max(0.05, 0.5 * (1 + math.cos(math.pi * step / steps)))
        for group in optimizer.param_groups:
            group["lr"] = lr * scale
        pick = rows_t[torch.randint(len(rows_t), (batch_size,), generator=gen).to(features.device)]
        u = torch.rand(batch_size, generator=gen).to(features.device)
        point = to_point(n_hits[pick], visible[pick], u)
        loss = -model.totals.log_prob(features[pick], routing, point).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= steps - 100:
            tail.append(loss.item())
    for p in net.parameters():
        p.grad = None
    return float(np.mean(tail))


def fit_trainable_totals(
    model: nn.Module, dataset: TokenDataset, trainable: set[int], seed: int
) -> str | None:
    """Fit the totals networks whose parameters are all being trained; a log line, or None."""
    totals = getattr(model, "totals", None)
    if not isinstance(model, CaloFM) or totals is None:
        return None
    classes = [
        c for c, net in enumerate(totals.nets) if all(id(p) in trainable for p in net.parameters())
    ]
    if not classes:
        return None
    t0 = time.monotonic()
    nll = fit_totals(model, dataset, classes, seed=seed)
    parts = ", ".join(f"{name} {value:.3f}" for name, value in nll.items())
    return f"shower totals fitted in {time.monotonic() - t0:.0f} s (NLL per shower: {parts})"
