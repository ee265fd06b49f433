"""The output directory of a training command (train, extend, adapt-particle): what a rerun may do.

A directory holding a finished or started run is never trained over silently: ``--resume``
continues it, ``--overwrite`` removes that run's files (and only those) first. A run stopped
before its first checkpoint (SIGKILL, a crash) has nothing to continue, so ``--resume`` starts it
again instead of leaving the user between "no checkpoint" and "already holds a run".
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from calofm.errors import CalofmError

if TYPE_CHECKING:
    from calofm.training.distributed import DistEnv


@dataclass
class RunDirPlan:
    """What to do with the output directory, decided before anything is changed."""

    out: Path
    resume: bool
    remove: list[str] = field(default_factory=list)
    note: str | None = None

    def apply(self, env: DistEnv) -> bool:
        """Remove what the plan replaces (once the inputs are known to be good); return resume.

        Under torchrun only rank 0 changes files.
        """
        from calofm.files import remove_outputs

        if env.is_main:
            remove_outputs(self.out, self.remove)
            if self.note:
                print(self.note, file=sys.stderr)
        return self.resume


def plan_run_dir(
    out: str | os.PathLike[str],
    *,
    resume: bool,
    overwrite: bool,
    products: tuple[str, ...],
    what: str,
) -> RunDirPlan:
    """Check ``out`` before training and decide whether to resume and what to remove."""
    from calofm.files import check_output_dir
    from calofm.training.checkpoint import find_checkpoint
    from calofm.training.run import CHECKPOINT_DIR, LOG_FILE, PLOT_FILE, SUMMARY_FILE

    out = Path(out)
    if resume and overwrite:
        raise CalofmError("--resume continues a run and --overwrite replaces it: give one of them")
    check_output_dir(out)
    run_files = (LOG_FILE, PLOT_FILE, SUMMARY_FILE, CHECKPOINT_DIR, *products)
    present = [name for name in run_files if (out / name).exists()]
    if overwrite:
        return RunDirPlan(out, False, present)
    if not resume:
        if present:
            raise CalofmError(
                f"{out} already holds {what} or a training run; continue an interrupted run "
                "with --resume, replace it with --overwrite, or choose another --out"
            )
        return RunDirPlan(out, False)
    if find_checkpoint(out / CHECKPOINT_DIR / "last") is not None:
        return RunDirPlan(out, True)
    if (out / SUMMARY_FILE).exists():
        raise CalofmError(
            f"{out} holds a finished run (no checkpoint is kept): nothing to resume; add "
            "--overwrite to train it again"
        )
    note = (
        f"calofm: {out} has no checkpoint yet (the run stopped before its first one); "
        "starting from step 0"
    )
    return RunDirPlan(out, False, present, note)
