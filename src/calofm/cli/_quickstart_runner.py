"""Running the quickstart's steps so that a rerun is honest: each step's fingerprint (its arguments
and its inputs' fingerprints), the record of what made each output and how long it took, the
decision per step (skip, run or resume, redo), and one step run as a sub-command or a library call.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from calofm.errors import CalofmError

RECORD_FILE = "quickstart_steps.json"


@dataclass
class Step:
    """One step: a sub-command (``argv``) or a library call (``action``, for what no sub-command
    does), the output that says it finished, and the steps whose outputs it reads."""

    key: str
    title: str
    output: Path
    started: Path  # exists once the step has begun (its partial file or directory)
    deps: tuple[str, ...] = ()
    argv: list[str] | None = None
    action: Callable[[], None] | None = None
    settings: tuple = ()  # what decides the output besides argv (a model's weights)
    note: str = ""  # what a library step does, printed in place of a command


def fingerprints(steps: list[Step], ignore: tuple[str, ...]) -> dict[str, str]:
    """Each step's arguments and its inputs' fingerprints, hashed: a change anywhere upstream
    changes every step downstream of it. Options that do not change the outputs are left out."""
    prints: dict[str, str] = {}
    for step in steps:
        what = [step.key] if step.argv is None else step.argv
        what = [a for i, a in enumerate(what) if not _ignored(what, i, ignore)]
        what += map(str, step.settings)
        text = json.dumps([what, [prints[d] for d in step.deps]])
        prints[step.key] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return prints


def _ignored(argv: list[str], i: int, ignore: tuple[str, ...]) -> bool:
    return argv[i] in ignore or (i > 0 and argv[i - 1] in ignore)


def read_records(path: Path) -> dict[str, dict]:
    """Each step's fingerprint and wall time so far."""
    if not path.is_file():
        return {}
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CalofmError(f"{path}: malformed JSON; remove it or add --overwrite") from None
    if not isinstance(records, dict):
        return {}
    return {
        k: v if isinstance(v, dict) else {"fingerprint": v, "seconds": None}
        for k, v in records.items()
    }


def write_records(path: Path, records: dict) -> None:
    from calofm.files import atomic_output

    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")


def plan_actions(steps: list[Step], prints: dict[str, str], records: dict, overwrite: bool) -> dict:
    """For each step: 'skip' (finished with these settings), 'run' (new, or resuming its own
    interrupted run) or 'redo' (made with other settings: only with --overwrite)."""
    plan = {}
    for step in steps:
        begun = step.output.exists() or step.started.exists()
        same = records.get(step.key, {}).get("fingerprint") == prints[step.key]
        if not begun:
            plan[step.key] = "run"
        elif same:
            plan[step.key] = "skip" if step.output.exists() else "run"
        elif overwrite:
            plan[step.key] = "redo"
        else:
            raise CalofmError(
                f"{step.started} was made by other settings than these (or by an unknown "
                "command); rerun with the settings that made it, choose another --out, or add "
                "--overwrite to recompute it"
            )
    return plan


def run_step(step: Step, action: str) -> None:
    from calofm.cli import Terminated, main
    from calofm.files import remove_outputs

    if step.argv is None:
        print(f"\n== {step.title}\n# calofm (python): {step.note}", flush=True)
    else:
        argv = list(step.argv)
        if action == "redo":
            argv.append("--overwrite")
        elif step.key == "expert" and step.started.exists():
            argv.append("--resume")  # the same training, interrupted: continue it
        print(f"\n== {step.title}\n$ calofm {shlex.join(argv)}", flush=True)
    if action == "skip":
        print(f"   (skipped: {step.output} was made with these settings)")
        return
    if step.argv is None:
        if action == "redo":
            remove_outputs(step.started.parent, {step.started.name, step.output.name})
        assert step.action is not None
        step.action()
        return
    code = main(argv)
    if code == 143:
        raise Terminated
    if code >= 128:
        raise KeyboardInterrupt
    if code != 0:
        raise CalofmError(f"step '{step.title}' failed (exit {code}; its message is above)")


def cpu_seconds() -> float:
    """CPU time of this process and its finished child processes (Geant4 and generation
    workers): with the wall time, what a step would take on an idle machine."""
    import resource

    own, children = (
        resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime
