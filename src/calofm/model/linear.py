"""Linear layers that decode fast on a CPU: a large layer's weight is prepacked in oneDNN's
blocked layout for the length of a generation run (``prepacked``), and a single row in a
compiled step is a reduction inductor streams."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """``nn.Linear`` that can decode with a prepacked weight on a CPU.

    Inside ``prepacked`` a large layer uses a copy of its weight in oneDNN's blocked layout, except
    for a single row in a compiled step: there the product is written as a row-wise reduction,
    which inductor turns into one loop streaming the weight (the paper's 27,003- and 25,003-wide
    heads: 0.97 and 0.65 ms against oneDNN's 1.25 and 1.53 ms, one AMD EPYC thread).
    """

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and not torch.is_grad_enabled():
            if x.numel() == self.in_features and torch.compiler.is_compiling():
                y = (self.weight * x.reshape(1, -1)).sum(-1)
                return (y if self.bias is None else y + self.bias).reshape(*x.shape[:-1], -1)
            return packed_linear(x, self.packed, self.bias, self.out_features)
        return F.linear(x, self.weight, self.bias)


@torch.library.custom_op("calofm::packed_linear", mutates_args=())
def packed_linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    """``F.linear`` with a weight in oneDNN's blocked layout. An opaque operator to
    ``torch.compile``: inductor cannot lower oneDNN's call itself, so a compiled decode step
    calls it as it is and fuses the rest of the step around it."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


@packed_linear.register_fake
def _packed_linear_shape(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, out_features: int
) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], out_features)


# Layers with at least this many weights are prepacked for decoding on a CPU: the 27k-wide output
# heads of the paper's sizes run 1.8x (batch 16) to 2.2x (batch 64) faster so (2 cores, AVX2);
# for 256 x 256 projections the packed call is slower than MKL's plain one.
PACK_MIN_WEIGHTS = 1 << 20


def can_prepack(layer: nn.Linear) -> bool:
    w = layer.weight
    return (
        w.device.type == "cpu"
        and w.dtype == torch.float32
        and w.numel() >= PACK_MIN_WEIGHTS
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


@contextmanager
def prepacked(model: nn.Module, batch_size: int) -> Iterator[int]:
    """Within the block, large ``Linear`` layers of ``model`` (CPU, fp32) use oneDNN-packed
    copies of their weights (inference only); yields how many layers were packed.

    The copies are taken on entry and dropped on exit, so weights changed meanwhile (training)
    are never shadowed by stale copies; the results equal ``F.linear``'s up to float round-off.
    """
    layers = [m for m in model.modules() if isinstance(m, Linear) and can_prepack(m)]
    for m in layers:
        m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_size)
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.packed = None
