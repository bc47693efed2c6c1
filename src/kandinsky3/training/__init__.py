"""The training engine: one accelerate loop and a recipe per model kind."""

from .config import DataConfig, TrainConfig
from .loop import train

__all__ = ["DataConfig", "TrainConfig", "train"]
