"""The CaloFM transformer: config and presets, attention, experts, KV cache, model files."""

from calofm.model.config import (
    PRESETS,
    ModelConfig,
    class_name,
    parse_class,
    preset,
    with_overrides,
)
from calofm.model.experts import Routing
from calofm.model.io import load_model, model_hash, save_model, weights_hash
from calofm.model.transformer import CaloFM

__all__ = [
    "PRESETS",
    "CaloFM",
    "ModelConfig",
    "Routing",
    "class_name",
    "load_model",
    "model_hash",
    "parse_class",
    "preset",
    "save_model",
    "weights_hash",
    "with_overrides",
]
