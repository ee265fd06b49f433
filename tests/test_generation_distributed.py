"""``torchrun ... -m calofm generate``: the processes share the showers and write one file."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from test_generation_cli import command
from test_model import tiny_model

from calofm.data.formats import file_info, read_all
from calofm.model import save_model


@pytest.mark.slow
def test_two_processes_write_one_file_with_the_showers_of_one_process(tmp_path):
    save_model(tiny_model(), tmp_path / "model", {"test": True})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one.h5", tmp_path / "two.h5"
    single = subprocess.run(
        [sys.executable, "-m", "calofm", *command(tmp_path / "model", one)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr
    # 7 showers in batches of 3: rank 0 decodes rows 0-2 and 6, rank 1 rows 3-5
    ddp = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone"]
        + ["-m", "calofm", *command(tmp_path / "model", two)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    assert ddp.stdout.count("wrote 7 G4_Pb:gamma showers") == 1  # rank 0 alone writes and reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "one.h5", "two.h5"]
    a, b = read_all(one), read_all(two)
    for key in ("offsets", "voxels", "energies", "incident"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    stats = [file_info(p).metadata["generation_stats"] for p in (one, two)]
    assert stats[0] == stats[1]
