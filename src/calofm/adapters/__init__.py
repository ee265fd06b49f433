"""Adapters: new materials (experts) and new particles (LoRA + heads) on a frozen base model.

An ``AdaptedModel`` wraps a base model and holds its adapters (``model``); each adapter is saved
on its own (``files``); one stage of adaptation (add, train with the shared trainer, save) is in
``stage``; a particle adapter merges into a plain model for deployment (``merge``).
"""

from calofm.adapters.config import AdapterConfig
from calofm.adapters.files import (
    load_adapter,
    load_adapters,
    load_model_with_adapters,
    read_manifest,
    save_adapter,
)
from calofm.adapters.model import AdaptedModel, Adapter

__all__ = [
    "AdaptedModel",
    "Adapter",
    "AdapterConfig",
    "load_adapter",
    "load_adapters",
    "load_model_with_adapters",
    "read_manifest",
    "save_adapter",
]
