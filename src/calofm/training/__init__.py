"""One trainer for pre-training and every adaptation stage (DDP, checkpoints, exact resume, logs)."""

from calofm.training.config import PRESET_DEFAULTS, TrainConfig, preset_defaults
from calofm.training.trainer import TrainResult, evaluate, learning_rate, train

__all__ = [
    "PRESET_DEFAULTS",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "learning_rate",
    "preset_defaults",
    "train",
]
