"""One trainer for pre-training and for every adaptation stage.

What differs between stages is only which parameters are trainable and which data is used; the
loop, the schedule, validation, checkpoints, resume and DDP are shared. Every process runs the same
loop on its share of the same global batches; rank 0 alone writes files and shows progress, and
takes the decisions that must agree across processes (stop now, time is up), which it broadcasts.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from calofm.data.batches import BucketBatchSampler, TokenDataset, collate, eval_batches, shard
from calofm.errors import CalofmError
from calofm.files import atomic_output
from calofm.training import distributed
from calofm.training.checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from calofm.training.config import TrainConfig
from calofm.training.logs import TrainLog
from calofm.training.totals import fit_trainable_totals

LOG_FILE = "train_log.jsonl"
PLOT_FILE = "loss_curve.png"
SUMMARY_FILE = "training.json"
CHECKPOINT_DIR = "checkpoints"


@dataclass
class TrainResult:
    out_dir: Path
    steps: int
    epoch: int
    best_val_loss: float | None
    last_val_loss: float | None
    interrupted: bool
    elapsed_s: float


class _LossModule(nn.Module):
    """Routes DDP's forward to ``model.loss``, so gradient averaging hooks into the loss."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, spatial, energy, incident, class_id):
        return self.model.loss(spatial, energy, incident, class_id)


def learning_rate(
    config: TrainConfig, step: int, total_steps: int | None, elapsed_s: float
) -> float:
    """Linear warm-up, then cosine from ``lr`` to ``min_lr_ratio * lr`` over the run's progress."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = 0.0
    if total_steps is not None:
        progress = (step - config.warmup_steps) / max(1, total_steps - config.warmup_steps)
    if config.time_limit_min is not None:
        progress = max(progress, elapsed_s / (60 * config.time_limit_min))
    progress = min(progress, 1.0)
    floor = config.min_lr_ratio
    return config.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


def total_steps(config: TrainConfig, sampler: BucketBatchSampler) -> int | None:
    """Optimizer steps the step budgets allow (None when only the time limit bounds the run)."""
    steps = None
    if config.epochs is not None:
        steps = sum(sampler.n_batches(e) for e in range(config.epochs))
    if config.max_steps is not None:
        steps = config.max_steps if steps is None else min(steps, config.max_steps)
    return steps


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


def parameter_counts(model: nn.Module, trainable: list[nn.Parameter]) -> tuple[int, int]:
    return sum(p.numel() for p in trainable), sum(p.numel() for p in model.parameters())


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _autocast(device: torch.device, enabled: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


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
    sums = np.zeros(4)
    for global_batch in batches:
        part = shard(global_batch, env.rank, env.world_size)
        if not len(part):
            continue
        b = _to_device(collate(dataset, part), env.device)
        with _autocast(env.device, amp):
            losses = model.loss(b["spatial"], b["energy"], b["incident"], b["class_id"])
        n = dataset.n_targets(part)
        sums += [float(v) * n for v in losses] + [n]
    model.train(was_training)
    total, spatial, energy, n = distributed.all_sum(env, sums.tolist())
    n = max(n, 1.0)
    return {"loss": total / n, "spatial": spatial / n, "energy": energy / n}


def _optimizer(trainable: list[nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
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


def _default_save(model: nn.Module, directory: Path, provenance: dict) -> Path:
    from calofm.model.io import save_model

    return save_model(model, directory, provenance)


def train(
    model: nn.Module,
    train_set: TokenDataset,
    val_set: TokenDataset | None,
    config: TrainConfig,
    trainable: list[nn.Parameter] | None,
    out_dir: str | Path,
    *,
    provenance: dict | None = None,
    resume: bool = False,
    device: str | None = None,
    save: Callable[[nn.Module, Path, dict], Path] = _default_save,
    should_stop: Callable[[int], bool] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``trainable`` (all parameters when None) of ``model``; best weights go to ``out_dir``.

    ``save(model, out_dir, provenance)`` writes the best model (by validation loss; the last one
    without validation data): ``save_model`` for a whole model, an adapter writer for a stage.
    ``should_stop(step)`` is asked after every step; when it says yes (on rank 0) the run writes a
    checkpoint and returns with ``interrupted`` set, to be continued with ``resume=True``.
    Frozen parameters get ``requires_grad=False`` during the run and their flags back afterwards.
    """
    out_dir = Path(out_dir)
    env = distributed.setup(device)
    model.to(env.device)
    params = list(model.parameters()) if trainable is None else list(trainable)
    if not params:
        raise CalofmError("training: no trainable parameters")
    if len(train_set) == 0:
        raise CalofmError("training: no training showers left (see the messages above)")
    chosen = {id(p) for p in params}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    try:
        return _run(
            model,
            train_set,
            val_set,
            config,
            params,
            out_dir,
            env,
            provenance or {},
            resume,
            save,
            should_stop,
            progress,
        )
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _run(
    model: nn.Module,
    train_set: TokenDataset,
    val_set: TokenDataset | None,
    config: TrainConfig,
    params: list[nn.Parameter],
    out_dir: Path,
    env: distributed.DistEnv,
    provenance: dict,
    resume: bool,
    save: Callable[[nn.Module, Path, dict], Path],
    should_stop: Callable[[int], bool] | None,
    progress: bool,
) -> TrainResult:
    main = env.is_main
    checkpoint_dir = out_dir / CHECKPOINT_DIR / "last"
    optimizer = _optimizer(params, config)
    sampler = BucketBatchSampler(
        train_set.lengths,
        train_set.class_id,
        seed=config.seed,
        batch_size=config.batch_size,
        batch_tokens=config.batch_tokens,
        pool_batches=config.pool_batches,
        world_size=env.world_size,
    )
    if sampler.n_batches(0) == 0:
        raise CalofmError("training: too few showers for one batch per process")
    steps_total = total_steps(config, sampler)
    val_batches = (
        eval_batches(val_set.lengths, config.batch_size, config.batch_tokens)
        if val_set is not None and len(val_set)
        else []
    )
    n_trainable, n_total = parameter_counts(model, params)
    signature = {
        "train_config": config.to_dict(),
        "data": dataset_fingerprint(train_set),
        "val_data": dataset_fingerprint(val_set) if val_set is not None else None,
        "classes": list(train_set.classes),
        "n_trainable": n_trainable,
        "n_parameters": n_total,
    }

    step, epoch, position, elapsed0 = 0, 0, 0, 0.0
    interval_sums = {"loss": 0.0, "spatial": 0.0, "energy": 0.0, "tokens": 0.0}
    best_val: float | None = None
    last_val: float | None = None
    last_val_step = -1
    if resume:
        found = find_checkpoint(checkpoint_dir)
        if found is None:
            raise CalofmError(f"{out_dir}: no checkpoint to resume from in {checkpoint_dir}")
        state = load_checkpoint(found, model, optimizer)
        if state["signature"] != signature:
            changed = [k for k in signature if state["signature"].get(k) != signature[k]]
            raise CalofmError(
                f"{found}: checkpoint was made with other settings ({', '.join(changed)}); "
                "resume with the original command"
            )
        step, epoch, position = state["step"], state["epoch"], state["position"]
        elapsed0, best_val, last_val = state["elapsed_s"], state["best_val"], state["last_val"]
        last_val_step = state["last_val_step"]
        if main:  # saved summed over processes; the others start from zero
            interval_sums = state["interval"]
    elif distributed.from_main(
        env, [float(checkpoint_dir.parent.exists() or (out_dir / LOG_FILE).exists())]
    )[0]:
        raise CalofmError(
            f"{out_dir}: already holds a training run; resume it with --resume or choose "
            "another --out"
        )
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        print(
            f"trainable parameters: {n_trainable:,} of {n_total:,} "
            f"({100 * n_trainable / n_total:.1f}%)"
            f"; {env.world_size} process(es) on {env.device.type}; "
            f"{sampler.n_batches(epoch)} batches per epoch",
            flush=True,
        )
    log = TrainLog(out_dir / LOG_FILE, resume_step=step if resume else None) if main else None
    if not resume:  # every process fits the same networks from the same seed
        fitted = fit_trainable_totals(model, train_set, {id(p) for p in params}, config.seed)
        if fitted and main:
            print(fitted, flush=True)

    net: nn.Module = _LossModule(model)
    if env.active:
        net = nn.parallel.DistributedDataParallel(
            net,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=True,
        )
    model.train()
    start = time.monotonic() - elapsed0
    last_checkpoint = time.monotonic()
    # Time to keep for the final validation: measured once one has run, until then estimated
    # from the training speed (a forward-and-backward rate, so a generous estimate).
    val_seconds: float | None = None
    val_tokens = val_set.n_targets(np.arange(len(val_set))) / env.world_size if val_batches else 0
    run_tokens, run_start = 0, time.monotonic()
    interval = {**interval_sums, "t": time.monotonic()}
    elapsed = elapsed0  # rank 0's clock, shared after every step, so schedules agree
    bar = tqdm(
        total=steps_total,
        initial=step,
        unit="step",
        disable=not (main and progress),
        dynamic_ncols=True,
    )

    def checkpoint() -> None:
        """Called by every process at the same steps: the log's running sums are summed first."""
        t0 = time.monotonic()
        keys = ("loss", "spatial", "energy", "tokens")
        sums = distributed.all_sum(env, [interval[k] for k in keys])
        summed = dict(zip(keys, sums, strict=True))
        if main:
            save_checkpoint(
                checkpoint_dir,
                model,
                optimizer,
                {
                    "signature": signature,
                    "step": step,
                    "epoch": epoch,
                    "position": position,
                    "elapsed_s": time.monotonic() - start,
                    "best_val": best_val,
                    "last_val": last_val,
                    "last_val_step": last_val_step,
                    "interval": summed,
                },
            )
        interval["t"] += time.monotonic() - t0

    def validate() -> None:
        nonlocal best_val, last_val, last_val_step, val_seconds
        t0 = time.monotonic()
        last_val_step = step
        if not val_batches:
            return
        metrics = evaluate(model, val_set, val_batches, env, config.amp)
        last_val = metrics["loss"]
        val_seconds = time.monotonic() - t0
        if main:
            log.write(
                {
                    "kind": "val",
                    "step": step,
                    "epoch": epoch,
                    **metrics,
                    "elapsed_s": time.monotonic() - start,
                }
            )
            log.plot(out_dir / PLOT_FILE)
            bar.write(
                f"step {step} epoch {epoch}: validation loss {metrics['loss']:.4f} "
                f"(spatial {metrics['spatial']:.4f}, energy {metrics['energy']:.4f})"
            )
        if best_val is None or last_val < best_val:
            best_val = last_val
            if main:
                save(model, out_dir, {**provenance, "training": _summary(step, epoch, best_val)})
        interval["t"] += time.monotonic() - t0

    done = steps_total is not None and step >= steps_total
    interrupted = False
    while not done and (config.epochs is None or epoch < config.epochs):
        batches = sampler.batches(epoch)
        while position < len(batches):
            global_batch = batches[position]
            part = shard(global_batch, env.rank, env.world_size)
            n_global = train_set.n_targets(global_batch)
            n_local = train_set.n_targets(part)
            lr = learning_rate(config, step, steps_total, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = lr
            b = _to_device(collate(train_set, part), env.device)
            with _autocast(env.device, config.amp):
                total, spatial, energy = net(
                    b["spatial"], b["energy"], b["incident"], b["class_id"]
                )
            # Each process's loss is a mean over its own tokens; weighting by its token share
            # makes DDP's average the mean over the global batch's tokens.
            (total * (n_local * env.world_size / n_global)).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            if not torch.isfinite(grad_norm):
                raise CalofmError(
                    f"training diverged at step {step} (non-finite gradient); "
                    "lower the learning rate"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            position += 1
            for key, value in (("loss", total), ("spatial", spatial), ("energy", energy)):
                interval[key] += value.item() * n_local
            interval["tokens"] += n_local
            run_tokens += n_local
            bar.update(1)

            if step % config.log_every == 0:
                loss, sp, en, tokens = distributed.all_sum(
                    env,
                    [interval["loss"], interval["spatial"], interval["energy"], interval["tokens"]],
                )
                now = time.monotonic()
                rate = tokens / max(now - interval["t"], 1e-9)
                record = {
                    "kind": "train",
                    "step": step,
                    "epoch": epoch,
                    "loss": loss / tokens,
                    "spatial": sp / tokens,
                    "energy": en / tokens,
                    "lr": lr,
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": rate,
                    "elapsed_s": now - start,
                }
                if main:
                    log.write(record)
                    bar.set_postfix(
                        loss=f"{loss / tokens:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}"
                    )
                interval.update(loss=0.0, spatial=0.0, energy=0.0, tokens=0.0, t=now)

            now = time.monotonic()
            stop = bool(should_stop and should_stop(step))
            reserve = (
                val_seconds
                if val_seconds is not None
                else val_tokens * (now - run_start) / max(run_tokens, 1)
            )
            time_up = (
                config.time_limit_min is not None
                and now - start + reserve >= 60 * config.time_limit_min
            )
            due = now - last_checkpoint >= 60 * config.checkpoint_minutes
            elapsed, stop_flag, time_flag, due = distributed.from_main(
                env, [now - start, stop, time_up, due]
            )
            if stop_flag:
                interrupted = True
                break
            if time_flag or (steps_total is not None and step >= steps_total):
                done = True
                break
            if due:
                checkpoint()
                last_checkpoint = time.monotonic()
        if interrupted or done:
            break
        validate()
        epoch += 1
        position = 0
        checkpoint()
        last_checkpoint = time.monotonic()

    if not interrupted and last_val_step != step:
        validate()
    checkpoint()
    bar.close()
    elapsed = time.monotonic() - start
    if main and not interrupted:
        if not val_batches:
            save(model, out_dir, {**provenance, "training": _summary(step, epoch, None)})
        log.plot(out_dir / PLOT_FILE)
        summary = {
            **_summary(step, epoch, best_val),
            "last_val_loss": last_val,
            "elapsed_s": elapsed,
            "world_size": env.world_size,
            "device": env.device.type,
            "n_trainable": n_trainable,
            "n_parameters": n_total,
            "n_train_showers": len(train_set),
            "n_val_showers": len(val_set) if val_set is not None else 0,
            "train_config": config.to_dict(),
            "data_messages": train_set.messages() + (val_set.messages() if val_set else []),
        }
        with atomic_output(out_dir / SUMMARY_FILE) as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
    return TrainResult(out_dir, step, epoch, best_val, last_val, interrupted, elapsed)


def _summary(step: int, epoch: int, best_val: float | None) -> dict:
    return {"step": step, "epoch": epoch, "best_val_loss": best_val}
