"""The paper's voxel head: one logit per spatial token, 27,003 of them for a 30 x 30 x 30 grid
(``calofm.model.heads`` for the shared operations and the factorised head)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from calofm.model.linear import Linear
from calofm.model.sampling import sample
from calofm.model.voxel_parts import causal_history, excluded_log_norm
from calofm.tokens import TokenizerConfig


class FlatVoxelHead(Linear):
    """One logit per spatial token (the paper's head)."""

    def __init__(self, d_model: int, tokenizer: TokenizerConfig, layer_of_token: torch.Tensor):
        super().__init__(d_model, tokenizer.spatial_vocab)
        self.n_voxels = tokenizer.n_voxels
        self.sos, self.eos, self.pad = (
            tokenizer.spatial_sos,
            tokenizer.spatial_eos,
            tokenizer.spatial_pad,
        )
        self.register_buffer("layer_of_token", layer_of_token, persistent=False)

    def scores(
        self,
        h: torch.Tensor,
        layer_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        y = Linear.forward(self, h)  # prepacked weights while decoding on a CPU
        if layer_bias is not None:
            layers = self.layer_of_token.to(y.device)  # a buffer a routed wrapper does not move
            bias = F.pad(layer_bias, (0, 1))[:, layers].to(y.dtype)
            y = y + (bias[:, None, :] if y.ndim == 3 else bias)
        return y

    def log_prob(
        self,
        h: torch.Tensor,
        target: torch.Tensor,
        history: torch.Tensor | None = None,
        layer_bias: torch.Tensor | None = None,
    ) -> torch.Tensor:
        lp = torch.log_softmax(self.scores(h, layer_bias).float(), dim=-1)
        out = lp.gather(-1, target.clamp(max=lp.shape[-1] - 1)[..., None])[..., 0]
        if history is not None:
            regular = history < self.n_voxels
            match = causal_history(history.shape[1], h.device)[None] & regular[:, None, :]
            out = out - excluded_log_norm(lp, history.clamp(max=self.n_voxels - 1), match)
        return out

    @torch.no_grad()
    def sample(
        self,
        h: torch.Tensor,
        u: torch.Tensor | None,
        used: torch.Tensor | None,
        temperature: float | torch.Tensor,
        top_k: int | None = None,
        top_p: float | None = None,
        layer_bias: torch.Tensor | None = None,
        can_end: torch.Tensor | None = None,
    ) -> torch.Tensor:
        logits = self.scores(h, layer_bias).float()
        logits[:, self.sos] = logits[:, self.pad] = float("-inf")  # no index tensors
        if can_end is not None:
            logits[:, self.eos].masked_fill_(~can_end, float("-inf"))
        if used is not None:
            logits[:, : self.n_voxels].masked_fill_(used, float("-inf"))
        return sample(logits, None if u is None else u[:, 0], temperature, top_k, top_p)

    def never_end(self) -> None:
        """Push end-of-sequence out of reach (benchmarks that run a fixed number of steps)."""
        with torch.no_grad():
            self.bias[self.eos] = -1e9
