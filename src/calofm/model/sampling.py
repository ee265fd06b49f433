"""Drawing the next token from logits: cheap, exact and reproducible per row.

On a CPU the two full vocabularies (27k voxels, ~50k energy bins) make sampling a large share of a
decode step. ``torch.multinomial`` draws one exponential variate per vocabulary entry; here one
uniform per row is enough: exponentiate in place, take the cumulative sum in float64 (so that even
probabilities of 1e-12 keep their share) and find the uniform's place in it (inverse CDF). That is
10-20x cheaper on this CPU, and because each row's uniforms come from its own seed, a shower does
not depend on the other rows of its batch. Top-k and top-p cost a sort and run only when asked.

Large vocabularies are searched in two levels: the uniform first picks a block of ``BLOCK``
entries by the blocks' sums, then an entry inside that block by its cumulative weights in float64.
The same inverse CDF, without a float64 copy and cumulative sum of the whole vocabulary (1.5-2x
cheaper at 27k entries); a block's sum is taken in float32 (relative round-off ~1e-7).
"""

from __future__ import annotations

import torch

from calofm.errors import CalofmError

BLOCK = 256


def _below(total: torch.Tensor) -> torch.Tensor:
    """The largest float64 below ``total``: a target there still lands on a non-zero weight."""
    return torch.nextafter(total, torch.zeros_like(total))


def _search(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """First index whose cumulative weight exceeds ``target`` (B, 1): never a zero weight."""
    target = torch.minimum(target, _below(cdf[:, -1:]))
    return torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)


def _inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Index drawn from unnormalised non-negative ``weights`` (B, V) with uniforms ``u`` (B,)."""
    b, v = weights.shape
    u = u.to(torch.float64)[:, None]
    if v < 4 * BLOCK:
        cdf = weights.to(torch.float64).cumsum_(dim=-1)
        return _search(cdf, u * cdf[:, -1:])[:, 0]
    full = v // BLOCK * BLOCK
    sums = weights[:, :full].view(b, -1, BLOCK).sum(-1)
    if full < v:
        sums = torch.cat([sums, weights[:, full:].sum(-1, keepdim=True)], dim=1)
    sums = sums.to(torch.float64)
    cdf = sums.cumsum(dim=-1)
    block = _search(cdf, u * cdf[:, -1:])  # (B, 1), a block of non-zero sum
    before = cdf.gather(1, block) - sums.gather(1, block)
    frac = ((u * cdf[:, -1:] - before) / sums.gather(1, block)).clamp_(min=0.0)
    index = block * BLOCK + torch.arange(BLOCK, device=weights.device)
    inside = weights.gather(1, index.clamp(max=v - 1)).to(torch.float64)
    inside.masked_fill_(index >= v, 0.0)  # past the end of a last, partial block
    inner = inside.cumsum_(dim=-1)
    return (block * BLOCK + _search(inner, frac * inner[:, -1:]))[:, 0]


def sample(
    logits: torch.Tensor,
    u: torch.Tensor | None,
    temperature: float | torch.Tensor,
    top_k: int | None = None,
    top_p: float | None = None,
) -> torch.Tensor:
    """Token ids (B,) from ``logits`` (B, V); ``logits`` is overwritten (no copy is made).

    ``u`` holds one uniform in [0, 1) per row; it is unused when ``temperature == 0`` (greedy).
    ``temperature`` is one number or one per row (B, 1) (a static decode step's dynamic
    temperature: a tensor, so that no step reads it back on the host).
    """
    per_row = isinstance(temperature, torch.Tensor)
    if not per_row and temperature == 0:
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
        if per_row or temperature != 1:
            logits.div_(temperature)
        weights = logits.exp_()
    drawn = _inverse_cdf(weights, u)
    return drawn if index is None else index.gather(-1, drawn[:, None])[:, 0]
