"""Adapters: new materials (experts) and new particles (LoRA + heads) on a frozen base model.

A model with adapters is the base model plus an ordered set of adapter directories, each saved on
its own (``files``); the rules that keep the base and every other adapter untouched live in
``attach``; one stage of adaptation (attach, train with the shared trainer, save) in ``stage``.
"""

from calofm.adapters.attach import (
    AttachedAdapter,
    attach,
    base_weights_hash,
    check_base,
    describe,
    detach,
    detach_all,
    disable,
    disabled,
    enable,
    registry,
)
from calofm.adapters.config import AdapterConfig
from calofm.adapters.files import (
    load_adapter,
    load_adapters,
    load_model_with_adapters,
    read_manifest,
    save_adapter,
)

__all__ = [
    "AdapterConfig",
    "AttachedAdapter",
    "attach",
    "base_weights_hash",
    "check_base",
    "describe",
    "detach",
    "detach_all",
    "disable",
    "disabled",
    "enable",
    "load_adapter",
    "load_adapters",
    "load_model_with_adapters",
    "read_manifest",
    "registry",
    "save_adapter",
]
