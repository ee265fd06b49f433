"""Kill ``simulate``, ``train`` and ``generate`` at random moments and rerun them: the result must be
exactly what an uninterrupted run gives (nothing lost, nothing duplicated).

Each case runs the command as a real process, sends SIGINT, SIGTERM or SIGKILL at a moment drawn from
its seed (anywhere from start-up to the end of a run), reruns it (``train`` with ``--resume``, as its
message says; the rerun is killed again in the longer cases), lets the last rerun finish and
compares the output with a reference run. The moments are only drawn from the reference's duration;
nothing asserts a time. CI runs one seed and one kill per command and signal; ``pytest -m
kill_many`` runs more seeds with three kills each.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_toy_showers
from safetensors.numpy import load_file
from test_model import tiny_model

from calofm.data.formats import file_info, read_all, write_showers
from calofm.detector import DetectorConfig
from calofm.model import save_model

SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}
CI_SEEDS = (0,)
MORE_SEEDS = (1, 2, 3, 4)
CI_KILLS, MORE_KILLS = 1, 3  # interruptions per case before the run may finish


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    return env


def _calofm(argv: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "calofm", *argv],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(argv: list[str], cwd: Path) -> str:
    """Run to the end. A kill that came after the output was complete leaves nothing to resume:
    the rerun then refuses to replace it (no --overwrite), which is what it must do."""
    proc = _calofm(argv, cwd)
    _, err = proc.communicate(timeout=120)
    complete = proc.returncode == 2 and "exists (a complete output)" in err
    assert proc.returncode == 0 or complete, err[-3000:]
    return err


def _kill_at(argv: list[str], cwd: Path, delay: float, signum: int) -> int:
    """Run, wait ``delay`` seconds (or until it ends), send ``signum``; return the exit code."""
    proc = _calofm(argv, cwd)
    try:
        proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    if proc.returncode not in (0, -signum):  # a handled stop: no traceback through calofm's code
        assert not re.search(r'File ".*calofm/', err), err[-3000:]
    return proc.returncode


def _det() -> DetectorConfig:
    return DetectorConfig(absorber_mm=(2.1,) * 6, nx=6, ny=6)


def _simulate(out: Path) -> list[str]:
    return [
        "simulate", "-n", "6", "--energy", "1", "--chunk-size", "1", "--seed", "3",
        "--out", str(out),
    ]  # fmt: skip


def _generate(model: Path, out: Path) -> list[str]:
    return [
        "generate", "--model", str(model), "--material", "G4_W", "--particle", "gamma",
        "-n", "12", "--energy-range", "10", "90", "--seed", "5", "--batch-size", "2",
        "--max-hits", "12", "--device", "cpu", "--out", str(out),
    ]  # fmt: skip


def _train(data: Path, out: Path) -> list[str]:
    return [
        "train", "--data", f"G4_W:gamma={data}", "--preset", "tiny", "--max-steps", "8",
        "--batch-size", "4", "--val-fraction", "0.2", "--seed", "2", "--device", "cpu",
        "--out", str(out),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """Each command's uninterrupted output, and how long it took (to draw kill moments from)."""
    root = tmp_path_factory.mktemp("kill_reference")
    model = root / "model"
    save_model(tiny_model(), model, {"test": True})
    data = write_showers(
        make_toy_showers(24, seed=0, detector=_det(), energy_range=(1, 5)), root / "data.h5"
    )
    refs = {}
    for name, argv, out in (
        ("simulate", _simulate(root / "sim.h5"), root / "sim.h5"),
        ("generate", _generate(model, root / "gen.h5"), root / "gen.h5"),
        ("train", _train(data, root / "trained"), root / "trained"),
    ):
        start = time.monotonic()
        _finish(argv, root)
        refs[name] = {"out": out, "seconds": time.monotonic() - start}
    refs["inputs"] = {"model": model, "data": data}
    return refs


def _argv(command: str, refs: dict, out: Path) -> list[str]:
    if command == "simulate":
        return _simulate(out)
    if command == "generate":
        return _generate(refs["inputs"]["model"], out)
    return _train(refs["inputs"]["data"], out)


def _assert_same_output(command: str, reference: Path, out: Path) -> None:
    if command == "train":
        a = load_file(str(reference / "model.safetensors"))
        b = load_file(str(out / "model.safetensors"))
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        assert not (out / "checkpoints" / "last.tmp").exists()
        return
    a, b = read_all(reference), read_all(out)
    for field in ("offsets", "voxels", "energies", "incident"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field), err_msg=field)
    if command == "generate":
        stats = [file_info(p).metadata["generation_stats"] for p in (reference, out)]
        assert stats[0] == stats[1]
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(out.name)) == [out.name]


def _kill_and_rerun(
    command: str, signame: str, seed: int, kills: int, refs: dict, tmp_path: Path
) -> None:
    out = tmp_path / ("trained" if command == "train" else f"{command}.h5")
    argv = _argv(command, refs, out)
    rng = np.random.default_rng([seed, list(SIGNALS).index(signame), len(command)])
    finished = False
    for kill in range(kills):
        rerun = argv + ["--resume"] if command == "train" and kill > 0 else argv
        delay = rng.uniform(0.05, 1.0) * refs[command]["seconds"]
        finished = _kill_at(rerun, tmp_path, delay, SIGNALS[signame]) == 0
        if finished:
            break
    if not finished:
        _finish(argv + ["--resume"] if command == "train" else argv, tmp_path)
    _assert_same_output(command, refs[command]["out"], out)


CASES = [(c, s) for c in ("simulate", "generate", "train") for s in SIGNALS]


@pytest.mark.slow
@pytest.mark.parametrize("seed", CI_SEEDS)
@pytest.mark.parametrize(("command", "signame"), CASES)
def test_killed_run_resumes_to_exactly_the_uninterrupted_output(
    command, signame, seed, references, tmp_path
):
    _kill_and_rerun(command, signame, seed, CI_KILLS, references, tmp_path)


@pytest.mark.slow
@pytest.mark.kill_many
@pytest.mark.parametrize("seed", MORE_SEEDS)
@pytest.mark.parametrize(("command", "signame"), CASES)
def test_killed_run_resumes_to_exactly_the_uninterrupted_output_for_more_seeds(
    command, signame, seed, references, tmp_path, request
):
    if "kill_many" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("more kill seeds run with: pytest -m kill_many")
    _kill_and_rerun(command, signame, seed, MORE_KILLS, references, tmp_path)
