"""One training run: what stays fixed, where it stands (the ``Progress`` a checkpoint saves), and
one short method per action of the loop (step, log, validate, checkpoint, decide, finish).

The losses of the steps are summed on the device and read by the host only when they are logged
or checkpointed, so a step does not wait for the accelerator. Rank 0 alone writes files and shows
progress, and takes the decisions that must agree across processes, which it broadcasts.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from calofm.data.batches import TokenDataset, shard
from calofm.errors import CalofmError
from calofm.files import atomic_output
from calofm.training import distributed
from calofm.training.checkpoint import Progress, resume_checkpoint, save_checkpoint
from calofm.training.config import TrainConfig
from calofm.training.logs import TrainLog
from calofm.training.schedule import learning_rate, total_steps
from calofm.training.steps import (
    LossSums,
    autocast,
    batch_on,
    batch_plan,
    evaluate,
    loss_module,
    make_optimizer,
    run_signature,
    self_drawn_energies,
)
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


class Run:
    """One training run: what stays fixed, where it stands, and the actions of the loop."""

    def __init__(
        self,
        model: nn.Module,
        train_set: TokenDataset,
        val_set: TokenDataset | None,
        config: TrainConfig,
        params: list[nn.Parameter],
        out_dir: Path,
        env: distributed.DistEnv,
        save: Callable[[nn.Module, Path, dict], Path],
        progress: bool,
    ):
        self.model, self.train_set, self.val_set = model, train_set, val_set
        self.config, self.params, self.out_dir, self.env = config, params, out_dir, env
        self.save_model, self.show_progress = save, progress
        self.checkpoint_dir = out_dir / CHECKPOINT_DIR / "last"
        self.optimizer = make_optimizer(params, config)
        self.sampler, self.val_batches = batch_plan(config, train_set, val_set, env.world_size)
        self.steps_total = total_steps(config, self.sampler)
        self.n_trainable = sum(p.numel() for p in params)
        self.n_total = sum(p.numel() for p in model.parameters())
        self.signature = run_signature(config, train_set, val_set, self.n_trainable, self.n_total)
        self.state = Progress()
        self.grad_norm: torch.Tensor | None = None  # of the last step
        self.lr = config.lr  # of the last step
        # The first step whose gradient was not finite (-1: none), read at the next sync point.
        self.diverged_at = torch.tensor(-1, device=env.device)

    # ---- set-up ----------------------------------------------------------------------------

    def start(self, resume: bool, provenance: dict) -> None:
        """Restore a checkpoint (or refuse a used directory), fit the totals, start the clocks."""
        env, main = self.env, self.env.is_main
        self.provenance = provenance
        elapsed0, sums = 0.0, None
        if resume:
            self.state, doc = resume_checkpoint(
                self.checkpoint_dir, self.model, self.optimizer, self.signature
            )
            # The log's sums were saved summed over processes; the others start from zero.
            elapsed0, sums = doc["elapsed_s"], doc["interval"] if main else None
        elif distributed.from_main(
            env,
            [float(self.checkpoint_dir.parent.exists() or (self.out_dir / LOG_FILE).exists())],
        )[0]:
            raise CalofmError(
                f"{self.out_dir}: already holds a training run; resume it with --resume or "
                "choose another --out"
            )
        if main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            print(
                f"trainable parameters: {self.n_trainable:,} of {self.n_total:,} "
                f"({100 * self.n_trainable / self.n_total:.1f}%)"
                f"; {env.world_size} process(es) on {env.device.type}; "
                f"{self.sampler.n_batches(self.state.epoch)} batches per epoch",
                flush=True,
            )
        step = self.state.step
        self.log_file = (
            TrainLog(self.out_dir / LOG_FILE, step if resume else None) if main else None
        )
        if not resume:  # every process fits the same networks from the same seed
            chosen = {id(p) for p in self.params}
            fitted = fit_trainable_totals(self.model, self.train_set, chosen, self.config.seed)
            if fitted and main:
                print(fitted, flush=True)
        self.net = loss_module(self.model, env)
        self.model.train()
        self.start_time = time.monotonic() - elapsed0
        self.last_checkpoint = time.monotonic()
        # Time to keep for the final validation: measured once one has run, until then estimated
        # from the training speed (a forward-and-backward rate, so a generous estimate).
        self.val_seconds: float | None = None
        self.val_tokens = (
            self.val_set.n_targets(np.arange(len(self.val_set))) / env.world_size
            if self.val_batches
            else 0
        )
        self.run_tokens, self.run_start = 0, time.monotonic()
        self.interval = LossSums(env.device, sums)  # since the last log line
        self.interval_start = time.monotonic()  # pushed on by validation and checkpoints
        self.elapsed = elapsed0  # rank 0's clock, shared after every step, so schedules agree
        self.bar = tqdm(
            total=self.steps_total,
            initial=step,
            unit="step",
            disable=not (main and self.show_progress),
            dynamic_ncols=True,
        )

    # ---- the actions of the loop -----------------------------------------------------------

    def steps_done(self) -> bool:
        return self.steps_total is not None and self.state.step >= self.steps_total

    def step(self, global_batch: np.ndarray) -> None:
        """One optimizer step on this process's share of ``global_batch``; no host sync."""
        s, env = self.state, self.env
        part = shard(global_batch, env.rank, env.world_size)
        n_global = self.train_set.n_targets(global_batch)
        n_local = self.train_set.n_targets(part)
        self.lr = learning_rate(self.config, s.step, self.steps_total, self.elapsed)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        b = batch_on(self.train_set, part, env.device)
        with autocast(env.device, self.config.amp):
            fed = None
            if self.config.self_drawn_energy:
                fed = self_drawn_energies(
                    self.model, b, self.config.self_drawn_energy, self._generator(s.step)
                )
            losses = self.net(b["spatial"], b["energy"], b["incident"], b["class_id"], fed)
        # Each process's loss is a mean over its own tokens; weighting by its token share
        # makes DDP's average the mean over the global batch's tokens.
        (losses[0] * (n_local * env.world_size / n_global)).backward()
        self.grad_norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.grad_clip)
        first = (self.diverged_at < 0) & ~torch.isfinite(self.grad_norm)
        self.diverged_at = torch.where(first, s.step, self.diverged_at)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        s.step += 1
        s.position += 1
        self.interval.add(losses, n_local)
        self.run_tokens += n_local
        self.bar.update(1)

    def _generator(self, step: int) -> torch.Generator:
        """The random stream of one step on this process: a function of the seed, the step and
        the rank, so a resumed run draws what the uninterrupted one would have."""
        entropy = np.random.SeedSequence([self.config.seed, step, self.env.rank])
        seed = int(entropy.generate_state(1, np.uint64)[0]) >> 1
        return torch.Generator(self.env.device).manual_seed(seed)

    def _check_finite(self) -> None:
        """Refuse to go on (and to write anything) after a non-finite gradient."""
        step = int(self.diverged_at)
        if step >= 0:
            raise CalofmError(
                f"training diverged at step {step} (non-finite gradient); lower the learning rate"
            )

    def log(self) -> None:
        """Write the interval's mean losses and speed (rank 0) and start a new interval."""
        self._check_finite()
        sums = self.interval.summed(self.env)
        tokens = sums["tokens"]
        now = time.monotonic()
        rate = tokens / max(now - self.interval_start, 1e-9)
        if self.env.is_main:
            self.log_file.write(
                {
                    "kind": "train",
                    "step": self.state.step,
                    "epoch": self.state.epoch,
                    "loss": sums["loss"] / tokens,
                    "spatial": sums["spatial"] / tokens,
                    "energy": sums["energy"] / tokens,
                    "lr": self.lr,
                    "grad_norm": float(self.grad_norm),
                    "tokens_per_s": rate,
                    "elapsed_s": now - self.start_time,
                }
            )
            self.bar.set_postfix(
                loss=f"{sums['loss'] / tokens:.3f}", lr=f"{self.lr:.2e}", tok_s=f"{rate:.0f}"
            )
        self.interval.clear()
        self.interval_start = now

    def decide(self, should_stop: Callable[[int], bool] | None) -> tuple[bool, bool, bool]:
        """(stop asked for, budget reached, checkpoint due): rank 0's answers on every process."""
        now = time.monotonic()
        stop = bool(should_stop and should_stop(self.state.step))
        reserve = (
            self.val_seconds
            if self.val_seconds is not None
            else self.val_tokens * (now - self.run_start) / max(self.run_tokens, 1)
        )
        limit = self.config.time_limit_min
        time_up = limit is not None and now - self.start_time + reserve >= 60 * limit
        due = now - self.last_checkpoint >= 60 * self.config.checkpoint_minutes
        self.elapsed, stop_flag, time_flag, due_flag = distributed.from_main(
            self.env, [now - self.start_time, stop, time_up, due]
        )
        return bool(stop_flag), bool(time_flag) or self.steps_done(), bool(due_flag)

    def checkpoint(self) -> None:
        """Called by every process at the same steps: the log's running sums are summed first."""
        t0 = time.monotonic()
        self._check_finite()
        summed = self.interval.summed(self.env)
        if self.env.is_main:
            state = {
                "signature": self.signature,
                **asdict(self.state),
                "elapsed_s": time.monotonic() - self.start_time,
                "interval": summed,
            }
            save_checkpoint(self.checkpoint_dir, self.model, self.optimizer, state)
        self.interval_start += time.monotonic() - t0
        self.last_checkpoint = time.monotonic()

    def validate(self) -> None:
        """Validation loss (logged, plotted); the best weights so far are saved."""
        s, main = self.state, self.env.is_main
        t0 = time.monotonic()
        s.last_val_step = s.step
        if not self.val_batches:
            return
        self._check_finite()
        metrics = evaluate(self.model, self.val_set, self.val_batches, self.env, self.config.amp)
        s.last_val = metrics["loss"]
        self.val_seconds = time.monotonic() - t0
        if main:
            elapsed = time.monotonic() - self.start_time
            record = {"kind": "val", "step": s.step, "epoch": s.epoch, **metrics}
            self.log_file.write({**record, "elapsed_s": elapsed})
            self.log_file.plot(self.out_dir / PLOT_FILE)
            self.bar.write(
                f"step {s.step} epoch {s.epoch}: validation loss {metrics['loss']:.4f} "
                f"(spatial {metrics['spatial']:.4f}, energy {metrics['energy']:.4f})"
            )
        if s.best_val is None or s.last_val < s.best_val:
            s.best_val = s.last_val
            if main:
                self._save(s.best_val)
        self.interval_start += time.monotonic() - t0

    def _save(self, best_val: float | None) -> None:
        training = _summary(self.state.step, self.state.epoch, best_val)
        self.save_model(self.model, self.out_dir, {**self.provenance, "training": training})

    def finish(self, interrupted: bool) -> TrainResult:
        """Validate where the run ended, checkpoint; unless interrupted, save and summarise."""
        s = self.state
        if not interrupted and s.last_val_step != s.step:
            self.validate()
        self.checkpoint()
        self.bar.close()
        elapsed = time.monotonic() - self.start_time
        if self.env.is_main and not interrupted:
            if not self.val_batches:
                self._save(None)
            self.log_file.plot(self.out_dir / PLOT_FILE)
            self._write_summary(elapsed)
        distributed.barrier(self.env)  # no process goes on (and removes files) before rank 0
        return TrainResult(
            self.out_dir, s.step, s.epoch, s.best_val, s.last_val, interrupted, elapsed
        )

    def _write_summary(self, elapsed: float) -> None:
        s, val_set = self.state, self.val_set
        summary = {
            **_summary(s.step, s.epoch, s.best_val),
            "last_val_loss": s.last_val,
            "elapsed_s": elapsed,
            "world_size": self.env.world_size,
            "device": self.env.device.type,
            "n_trainable": self.n_trainable,
            "n_parameters": self.n_total,
            "n_train_showers": len(self.train_set),
            "n_val_showers": len(val_set) if val_set is not None else 0,
            "train_config": self.config.to_dict(),
            "data_messages": self.train_set.messages() + (val_set.messages() if val_set else []),
        }
        with atomic_output(self.out_dir / SUMMARY_FILE) as tmp:
            tmp.write_text(json.dumps(summary, indent=1))


def _summary(step: int, epoch: int, best_val: float | None) -> dict:
    return {"step": step, "epoch": epoch, "best_val_loss": best_val}
