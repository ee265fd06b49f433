"""One trainer for pre-training and every adaptation stage (DDP, checkpoints, exact resume, logs)."""

from calofm.training.config import PRESET_DEFAULTS, TrainConfig, preset_defaults
from calofm.training.run import TrainResult
from calofm.training.schedule import learning_rate
from calofm.training.steps import evaluate
from calofm.training.trainer import train

__all__ = [
    "PRESET_DEFAULTS",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "learning_rate",
    "preset_defaults",
    "train",
]
