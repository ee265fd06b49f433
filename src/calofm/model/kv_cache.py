"""A static, pre-allocated key/value cache for one attention module (gpt-fast style).

The buffers are allocated once for the longest sequence. ``update`` writes the same new positions
of every row and returns views of the positions written so far, so attention never sees the empty
slots (prefill and the eager reference). ``write_rows`` writes one position per row, each row at its
own position, and returns a fixed-length window: the static decode step, whose shapes do not change
from step to step (CUDA graphs, compilation, continuous batching); the caller masks the slots
beyond each row's position.
"""

from __future__ import annotations

import torch
from torch import nn

from calofm.errors import CalofmError


class KVCache(nn.Module):
    def __init__(
        self,
        batch_size: int,
        n_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
    ):
        super().__init__()
        if batch_size <= 0 or max_len <= 0:
            raise CalofmError("kv cache: batch size and length must be positive")
        shape = (batch_size, n_heads, max_len, head_dim)
        # Not part of the model's weights: never saved, rebuilt for every generation run.
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("rows", torch.arange(batch_size, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    @property
    def nbytes(self) -> int:
        return self.k.nelement() * self.k.element_size() * 2

    def update(
        self, pos: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` (B, H, t, Dh) at positions ``pos..pos+t-1``; return (B, H, pos+t, Dh)."""
        end = pos + k.shape[2]
        if pos < 0 or end > self.max_len:
            raise CalofmError(
                f"kv cache: positions {pos}..{end - 1} do not fit a cache of length {self.max_len}"
            )
        if k.shape[0] != self.k.shape[0]:
            raise CalofmError(
                f"kv cache: batch of {k.shape[0]} rows, cache set up for {self.k.shape[0]}"
            )
        self.k[:, :, pos:end] = k
        self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def write_rows(
        self, pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor, window: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k, v`` (B, H, 1, Dh) of row i at position ``pos[i]``; return the first
        ``window`` positions (B, H, window, Dh). No host synchronisation: ``pos`` is not checked,
        the decoder keeps every row below ``max_len``. Values of another type (a reduced-precision
        step's) are stored in the cache's."""
        self.k[self.rows, :, pos] = k[:, :, 0].to(self.k.dtype)
        self.v[self.rows, :, pos] = v[:, :, 0].to(self.v.dtype)
        return self.k[:, :, :window], self.v[:, :, :window]
