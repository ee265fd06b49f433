"""Fixed routing: which rows of a batch belong to which class, and the per-class FFN experts.

Every module that acts differently per row group receives one ``Routing`` object, built once per
forward pass (or once per generation run). Experts run only on their own rows (gather, run,
scatter back), so the cost per token does not grow with the number of classes. ``RoutedLinear``
is a plain linear layer that is handed the routing too: it is the interface of the attention
projections and the heads, which an adapted model (``calofm.adapters``) wraps in modules acting on
some rows only; the base layer ignores the routing.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from calofm.errors import CalofmError
from calofm.model.config import parse_class


@dataclass
class RowGroups:
    """Rows of a batch grouped by a key. ``rows is None`` means one group holding every row."""

    keys: list[Hashable]
    rows: list[torch.Tensor] | None
    inverse: torch.Tensor | None  # puts the concatenated group outputs back in row order

    @classmethod
    def build(cls, keys_per_row: Sequence[Hashable], device: torch.device) -> RowGroups:
        keys = list(dict.fromkeys(keys_per_row))
        if len(keys) == 1:
            return cls(keys, None, None)
        rows = [
            torch.tensor([i for i, k in enumerate(keys_per_row) if k == key], device=device)
            for key in keys
        ]
        inverse = torch.argsort(torch.cat(rows))
        return cls(keys, rows, inverse)

    def apply(
        self, x: torch.Tensor, fn: Callable[[Hashable, torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """``fn(key, rows of x)`` for every group; results back in the row order of ``x``."""
        return self.apply_many(fn, x)

    def apply_many(
        self, fn: Callable[..., torch.Tensor], *tensors: torch.Tensor | None
    ) -> torch.Tensor:
        """``fn(key, rows of each tensor...)`` for every group (None stays None); results back in
        row order."""
        if self.rows is None:
            return fn(self.keys[0], *tensors)
        parts = [
            fn(key, *(None if t is None else t.index_select(0, rows) for t in tensors))
            for key, rows in zip(self.keys, self.rows, strict=True)
        ]
        return torch.cat(parts).index_select(0, self.inverse)

    def rows_of(self, key: Hashable) -> torch.Tensor | None:
        """Row indices of one group; None when that group is the whole batch.

        Raises KeyError when no row has this key.
        """
        if key not in self.keys:
            raise KeyError(key)
        i = self.keys.index(key)
        return None if self.rows is None else self.rows[i]


class Routing:
    """The batch's class ids, grouped by class (for experts) and by particle (for adapters)."""

    def __init__(self, class_id: torch.Tensor, classes: Sequence[str]):
        ids = class_id.tolist()
        bad = sorted({i for i in ids if not 0 <= i < len(classes)})
        if bad:
            raise CalofmError(f"model: class ids {bad} out of range; the model has {len(classes)}")
        if not ids:
            raise CalofmError("model: empty batch")
        self.class_id = class_id
        self.classes = list(classes)
        self.by_class = RowGroups.build(ids, class_id.device)
        self.by_particle = RowGroups.build(
            [parse_class(classes[i])[1] for i in ids], class_id.device
        )

    def __len__(self) -> int:
        return len(self.class_id)


class RoutedLinear(nn.Linear):
    """``nn.Linear`` whose forward also takes the routing; the base layer ignores it.

    Inside ``prepacked`` a large layer uses a copy of its weight in oneDNN's blocked layout, except
    for a single row in a compiled step: there the product is written as a row-wise reduction,
    which inductor turns into one loop streaming the weight (the paper's 27,003- and 25,003-wide
    heads: 0.97 and 0.65 ms against oneDNN's 1.25 and 1.53 ms, one AMD EPYC thread).
    """

    packed: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
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
    """Within the block, large ``RoutedLinear`` layers of ``model`` (CPU, fp32) use oneDNN-packed
    copies of their weights (inference only); yields how many layers were packed.

    The copies are taken on entry and dropped on exit, so weights changed meanwhile (training)
    are never shadowed by stale copies; the results equal ``F.linear``'s up to float round-off.
    """
    layers = [m for m in model.modules() if isinstance(m, RoutedLinear) and can_prepack(m)]
    for m in layers:
        m.packed = torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), batch_size)
    try:
        yield len(layers)
    finally:
        for m in layers:
            m.packed = None


class FeedForward(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d_model, hidden)
        self.fc2 = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Experts(nn.Module):
    """One FeedForward per class; each row goes through its class's expert only."""

    def __init__(self, d_model: int, hidden: int, n_classes: int):
        super().__init__()
        self.d_model, self.hidden = d_model, hidden
        self.ffn = nn.ModuleList(FeedForward(d_model, hidden) for _ in range(n_classes))

    def forward(self, x: torch.Tensor, routing: Routing) -> torch.Tensor:
        return routing.by_class.apply(x, lambda c, rows: self.ffn[c](rows))

    def add(self, init_from: int | None = None) -> FeedForward:
        """Append an expert: a copy of expert ``init_from``, or freshly initialised when None."""
        ref = self.ffn[0].fc1.weight
        expert = FeedForward(self.d_model, self.hidden).to(device=ref.device, dtype=ref.dtype)
        if init_from is not None:
            expert.load_state_dict(self.ffn[init_from].state_dict())
        self.ffn.append(expert)
        return expert
