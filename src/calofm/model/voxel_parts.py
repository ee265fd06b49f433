"""What the layer-first voxel heads share (``calofm.model.heads``, ``calofm.model.layered_head``).

A voxel used once: position j of a sequence has inputs 1..j (token 0 is SOS), and each head removes
the probability of the voxels among them from the part of its distribution where they live. The
layer logits take a per-class layer bias (an adapter's), and the full distribution over the
spatial vocabulary puts the layer head's end-of-sequence among the special tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def excluded_log_norm(
    log_probs: torch.Tensor, history: torch.Tensor, match: torch.Tensor
) -> torch.Tensor:
    """log(1 - P(voxels already used)) per position: the normaliser over the allowed voxels.

    ``log_probs`` (B, T, V) normalised over all V; ``history`` (B, T) the ids whose probability is
    removed (index into V); ``match`` (B, T, T) says which history entries count at each position.
    """
    b, t, _ = log_probs.shape
    gathered = log_probs.gather(-1, history[:, None, :].expand(b, t, t))
    used = (gathered.float().exp() * match).sum(-1)
    return torch.log1p(-used.clamp(max=1 - 1e-6))


def split_voxels(
    ids: torch.Tensor, n_layers: int, nx: int, ny: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(layer, x, y) of spatial ids; special ids (from n_layers * nx * ny on) give (0, 0, 0)."""
    v = torch.where(ids < n_layers * nx * ny, ids, torch.zeros_like(ids))
    return v // (nx * ny), (v // ny) % nx, v % ny


def causal_history(n: int, device: torch.device) -> torch.Tensor:
    """(T, T) True where input i (1 <= i <= j) precedes or is position j: the hits so far."""
    i = torch.arange(n, device=device)
    return (i[None, :] <= i[:, None]) & (i[None, :] >= 1)


def add_layer_bias(logits: torch.Tensor, layer_bias: torch.Tensor | None) -> torch.Tensor:
    """Layer logits (B, [T,] layers + 1) plus each row's (B, layers) bias; EOS gets none."""
    if layer_bias is None:
        return logits
    bias = F.pad(layer_bias, (0, 1)).to(logits.dtype)
    return logits + (bias[:, None, :] if logits.ndim == 3 else bias)


def with_special_tokens(
    voxels: torch.Tensor, lp_layer: torch.Tensor, n_layers: int
) -> torch.Tensor:
    """log P over the spatial vocabulary: the voxels (..., n_voxels), then SOS (never), EOS (the
    layer head's last class) and PAD (never)."""
    never = torch.full_like(lp_layer[..., :1], float("-inf"))
    return torch.cat([voxels, never, lp_layer[..., n_layers:], never], dim=-1)
