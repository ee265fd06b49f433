"""Model initialisation from a seed, without touching the caller's random state."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def seeded_init(seed: int) -> Iterator[None]:
    """Inside the block torch's CPU generator starts from ``seed``; after it, it is as it was.

    ``nn.init`` draws from the global generator (it takes no ``torch.Generator``), so building a
    model from a seed needs that one. Models are built on the CPU: only the CPU generator is
    forked and seeded, so CUDA is neither initialised nor touched. The weights are those that
    ``torch.manual_seed(seed)`` before the block gives.
    """
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield
