"""Merging a particle adapter into a plain model, for serving that particle alone.

The adapter's LoRA is folded into the attention weights (``W + s B A``: one matrix product per
projection instead of two) and its heads become the model's heads. Folded weights act on every
row, so the merged model keeps only the classes of the adapter's particle; the adapted model it
comes from is left as it was. Embedding bottlenecks and per-class conditioning have no place in a
plain model, so an adapter with them (or a kept class with conditioning) is refused. The result is
a ``CaloFM`` that ``save_model`` writes and ``load_model`` reads like any other.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

from torch import nn

from calofm.adapters.lora import PROJECTIONS
from calofm.errors import CalofmError
from calofm.model.config import parse_class
from calofm.model.transformer import CaloFM

if TYPE_CHECKING:
    from calofm.adapters.model import AdaptedModel, Adapter


def merged_model(adapted: AdaptedModel, adapter: Adapter) -> CaloFM:
    """A copy of ``adapted``'s base with ``adapter``'s LoRA and heads merged in (see above)."""
    config = adapter.config
    particle = config.particle
    if particle is None:
        raise CalofmError(f"adapter {config.name} has no LoRA to merge (it is an expert adapter)")
    keep = [c for c in adapted.base.classes if parse_class(c)[1] == particle]
    conditioned = [
        a.config.name
        for a in adapted.adapters.values()
        if a.config.condition and a.config.class_name in keep
    ]
    if config.embed_bottleneck or conditioned:
        raise CalofmError(
            f"adapter {config.name}: embedding bottlenecks and per-class conditioning "
            f"({', '.join(conditioned) or 'none'}) cannot be merged into a plain model"
        )
    model = copy.deepcopy(adapted.base)
    ids = [model.class_index(c) for c in keep]
    for block in model.blocks:
        for name in PROJECTIONS:
            setattr(block.attn, name, getattr(block.attn, name).merged(particle))
        block.experts.ffn = nn.ModuleList(block.experts.ffn[k] for k in ids)
    if model.totals is not None:
        model.totals.nets = nn.ModuleList(model.totals.nets[k] for k in ids)
    model.classes = keep
    model.spatial_head = model.spatial_head.particle[particle]
    model.energy_head = model.energy_head.particle[particle].merged()
    model.embed_adapters = None
    return model.requires_grad_(True)
