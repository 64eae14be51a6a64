"""Training: recipes, LR schedules, checkpoints, torch.distributed launch and the loop."""

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
