"""Model definitions: pure PyTorch, no I/O. ``build_model(config)`` builds any family."""

from __future__ import annotations

from typing import Any

from torch import nn

from i3d.models.config import (
    ConfigError,
    HeadConfig,
    ResNet3dConfig,
    config_from_dict,
    config_to_dict,
)
from i3d.models.inception import InceptionI3d, InceptionI3dConfig, TwoStreamConfig, TwoStreamI3d
from i3d.models.presets import get_preset, preset_names
from i3d.models.recognizer import InputShapeError, Recognizer, average_views
from i3d.models.resnet3d import ResNet3dI3D


def build_model(config: Any) -> nn.Module:
    """Build the network a config describes, initialised for training from scratch."""
    if isinstance(config, str):
        config = get_preset(config)
    if isinstance(config, ResNet3dConfig):
        return ResNet3dI3D(config)
    if isinstance(config, InceptionI3dConfig):
        return InceptionI3d(config)
    if isinstance(config, TwoStreamConfig):
        return TwoStreamI3d(config)
    raise ConfigError(f"cannot build a model from {type(config).__name__}")


__all__ = [
    "ConfigError",
    "HeadConfig",
    "InceptionI3d",
    "InceptionI3dConfig",
    "InputShapeError",
    "Recognizer",
    "ResNet3dConfig",
    "ResNet3dI3D",
    "TwoStreamConfig",
    "TwoStreamI3d",
    "average_views",
    "build_model",
    "config_from_dict",
    "config_to_dict",
    "get_preset",
    "preset_names",
]
