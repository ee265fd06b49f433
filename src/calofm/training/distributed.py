"""Process group set-up for ``torchrun`` (DDP), and the few collective helpers the trainer needs.

Without torchrun's environment there is one process and no process group; every helper then
reduces to the identity, so the trainer has a single code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from calofm.errors import CalofmError


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str | None, local_rank: int = 0) -> torch.device:
    """'cpu', 'cuda', 'cuda:N', or 'auto' and None (CUDA when available): the one place a device
    name is read, for every command. Under torchrun a bare 'cuda' is this process's GPU."""
    if name is None or name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CalofmError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise CalofmError("CUDA was asked for but is not available")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    elif device.type != "cpu":
        raise CalofmError(f"unsupported device {name!r}; use cpu or cuda")
    return device


def setup(device: str | None = None) -> DistEnv:
    """Join the process group when launched by torchrun (gloo on CPU, NCCL on CUDA)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistEnv(rank, world_size, local_rank, dev)


def teardown(env: DistEnv) -> None:
    if env.active and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Element-wise sum over processes (float64)."""
    if not env.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(env))
    dist.all_reduce(t)
    return t.tolist()


def from_main(env: DistEnv, values: list[float]) -> list[float]:
    """Rank 0's values on every process, so that all processes take the same decisions."""
    if not env.active:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(env))
    dist.broadcast(t, src=0)
    return t.tolist()


def barrier(env: DistEnv) -> None:
    """Wait until every process has arrived (e.g. until rank 0 has written its files)."""
    if env.active:
        dist.barrier()


def _comm_device(env: DistEnv) -> torch.device:
    return env.device if env.device.type == "cuda" else torch.device("cpu")
