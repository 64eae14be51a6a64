"""Test helper: a tiny ResNet3d I3D weights file with a small mmaction-style protocol."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import torch

from i3d.models import build_model, get_preset
from i3d.weights.format import WeightsInfo, save_weights
from i3d.weights.preprocessing import MMACTION_K400


def save_tiny_weights(path: Path, labels: tuple[str, ...], **protocol: Any) -> Path:
    """ResNet3d-18 at width 4 (seeded), 8-frame clips at 32 px; ``protocol`` overrides
    the preprocessing (default 2 clips × 1 crop)."""
    torch.manual_seed(0)
    config = get_preset("i3d_r50", depth=18, base_channels=4, num_classes=len(labels))
    prep = attrs.evolve(
        MMACTION_K400,
        **{
            "clip_len": 8, "frame_interval": 1, "num_clips": 2, "num_crops": 1,
            "resize_short": 32, "crop_size": 32, "input_size": 32, **protocol,
        },
    )  # fmt: skip
    info = WeightsInfo(config, labels, prep)
    return save_weights(path, build_model(config).state_dict(), info)


def save_random_inception(path: Path, num_classes: int = 4, seed: int = 0) -> Path:
    """A seeded random full-width Inception I3D (RGB) with ``num_classes`` logits: the FVD
    detector's network, standing in for the real weights where values do not matter."""
    torch.manual_seed(seed)
    config = get_preset("inception_i3d_rgb", num_classes=num_classes)
    return save_weights(path, build_model(config).state_dict(), WeightsInfo(config))
