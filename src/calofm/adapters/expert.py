"""The expert part of an adapter: one FFN expert per block for a new class (and its shower-totals
network, for a model with totals), and its conditioning.

The expert is the class: it only ever runs on that class's rows, so it cannot change any other
class's output. The optional conditioning (a layer-embedding shift and a layer bias of the spatial
logits, both zero to start) lets the class move its longitudinal profile directly.
"""

from __future__ import annotations

from torch import nn

from calofm.adapters.embeddings import add_layer_shift, remove_embedding_adapters
from calofm.adapters.heads import add_layer_logit_bias, remove_layer_logit_bias
from calofm.adapters.rows import Sites
from calofm.model.transformer import CaloFM


def add_expert(model: CaloFM, class_name: str, init_from: str | None) -> dict[str, nn.Module]:
    """Add the class with one expert per block (a copy of ``init_from``'s, or random)."""
    model.add_class(class_name, init_from)
    k = len(model.classes) - 1
    parts: dict[str, nn.Module] = {
        f"blocks.{i}.expert": block.experts.ffn[k] for i, block in enumerate(model.blocks)
    }
    if model.totals is not None:
        parts["totals"] = model.totals.nets[k]
    return parts


def remove_expert(model: CaloFM, class_name: str) -> None:
    """Remove the class and its experts; later classes move down one id."""
    k = model.class_index(class_name)
    for block in model.blocks:
        del block.experts.ffn[k]
    if model.totals is not None:
        del model.totals.nets[k]
    del model.classes[k]


def add_conditioning(model: CaloFM, sites: Sites, class_name: str) -> dict[str, nn.Module]:
    return {
        "condition.layer_embed": add_layer_shift(model, sites, class_name),
        "condition.layer_logits": add_layer_logit_bias(model, sites, class_name),
    }


def remove_conditioning(model: CaloFM, class_name: str) -> None:
    remove_embedding_adapters(model, None, class_name)
    remove_layer_logit_bias(model, class_name)
