"""The learning-rate schedule and the step budget, shared by every stage."""

from __future__ import annotations

import math

from calofm.data.batches import BucketBatchSampler
from calofm.training.config import TrainConfig


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
