"""Drawing the next token from logits: cheap, exact and reproducible per row.

On a CPU the two full vocabularies (27k voxels, ~50k energy bins) make sampling a large share of a
decode step. ``torch.multinomial`` draws one exponential variate per vocabulary entry; here one
uniform per row is enough: exponentiate in place, take the cumulative sum in float64 (so that even
probabilities of 1e-12 keep their share) and find the uniform's place in it (inverse CDF). That is
10-20x cheaper on this CPU, and because each row's uniforms come from its own seed, a shower does
not depend on the other rows of its batch. Top-k and top-p cost a sort and run only when asked.
"""

from __future__ import annotations

import torch

from calofm.errors import CalofmError


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from unnormalised non-negative ``weights`` (B, V) with uniforms ``u`` (B,)."""
    cdf = weights.to(torch.float64).cumsum_(dim=-1)
    target = u.to(torch.float64)[:, None] * cdf[:, -1:]
    # right=True: the draw lands in [cdf[i-1], cdf[i]), so zero-weight entries are never chosen.
    index = torch.searchsorted(cdf, target, right=True)
    return index.clamp_(max=weights.shape[-1] - 1)[:, 0]


def sample(
    logits: torch.Tensor,
    u: torch.Tensor | None,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Token ids (B,) from ``logits`` (B, V); ``logits`` is overwritten (no copy is made).

    ``u`` holds one uniform in [0, 1) per row; it is unused when ``temperature == 0`` (greedy).
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    if u is None:
        raise CalofmError("sampling needs one uniform per row")
    index = None
    if top_k is not None and top_k < logits.shape[-1]:
        logits, index = torch.topk(logits, top_k, dim=-1)  # sorted, largest first
    if top_p is not None and top_p < 1:
        if index is None:
            logits, index = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(logits.to(torch.float64) / temperature, dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        probs.masked_fill_(before >= top_p, 0.0)  # the most likely token always stays
        weights = probs
    else:
        logits.sub_(logits.amax(dim=-1, keepdim=True))
        if temperature != 1:
            logits.div_(temperature)
        weights = logits.exp_()
    drawn = _inverse_cdf(weights, u)
    return drawn if index is None else index.gather(-1, drawn[:, None])[:, 0]
