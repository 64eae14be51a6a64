"""Training: recipes, LR schedules, checkpoints and the loop (launched through i3d.distributed)."""

from i3d.train.loop import (
    LossDiverged,
    TrainingError,
    TrainingInterrupted,
    model_config,
    train,
)
from i3d.train.recipe import RECIPES, TrainConfig, get_recipe

__all__ = [
    "RECIPES",
    "LossDiverged",
    "TrainConfig",
    "TrainingError",
    "TrainingInterrupted",
    "get_recipe",
    "model_config",
    "train",
]
