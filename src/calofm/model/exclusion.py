"""A voxel used once: the normaliser over the voxels a shower does not have yet, in the loss.

Shared by the voxel heads (``calofm.model.heads``, ``calofm.model.layered_head``): position j of a
sequence has inputs 1..j (token 0 is SOS), and each head removes the probability of the voxels
among them from the part of its distribution where they live.
"""

from __future__ import annotations

import torch


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


def causal_history(n: int, device: torch.device) -> torch.Tensor:
    """(T, T) True where input i (1 <= i <= j) precedes or is position j: the hits so far."""
    i = torch.arange(n, device=device)
    return (i[None, :] <= i[:, None]) & (i[None, :] >= 1)
