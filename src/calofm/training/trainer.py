"""One trainer for pre-training and for every adaptation stage.

What differs between stages is only which parameters are trainable and which data is used; the
loop, the schedule, validation, checkpoints, resume and DDP are shared. Every process runs the same
loop on its share of the same global batches; the loop calls the actions of a ``Run``
(``calofm.training.run``), which also holds the run directory's file names.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from torch import nn

from calofm.data.batches import TokenDataset
from calofm.errors import CalofmError
from calofm.training import distributed
from calofm.training.config import TrainConfig
from calofm.training.run import Run, TrainResult


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
        run = Run(model, train_set, val_set, config, params, Path(out_dir), env, save, progress)
        run.start(resume, provenance or {})
        interrupted = _loop(run, should_stop)
        return run.finish(interrupted)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _loop(run: Run, should_stop: Callable[[int], bool] | None) -> bool:
    """Train until a budget is reached (False) or a stop is asked for (True)."""
    s, config = run.state, run.config
    while not run.steps_done() and (config.epochs is None or s.epoch < config.epochs):
        batches = run.sampler.batches(s.epoch)
        while s.position < len(batches):
            run.step(batches[s.position])
            if s.step % config.log_every == 0:
                run.log()
            stop, done, due = run.decide(should_stop)
            if stop:
                return True
            if done:
                return False
            if due:
                run.checkpoint()
        run.validate()
        s.epoch += 1
        s.position = 0
        run.checkpoint()
    return False
