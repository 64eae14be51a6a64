"""How a model expects its frames: stored in every weight file, read by the data pipeline."""

from __future__ import annotations

from typing import Any, Literal

import attrs

from i3d.models.config import structure


def _float_tuple(value: Any) -> tuple[float, ...]:
    return tuple(float(v) for v in value)


@attrs.frozen
class Preprocessing:
    """Input protocol of a set of weights.

    Pixels (uint8 RGB) are mapped linearly from [0, 255] to ``value_range`` and then
    normalised per channel as ``(x - mean) / std``. Clips of ``clip_len`` frames taken every
    ``frame_interval`` frames (``clip_len=None``: every frame of the video, which the test
    pipeline cuts into at most 10 windows of up to 250 frames); ``num_clips`` ×
    ``num_crops`` views at test time, after resizing the short side to ``resize_short``.
    Single-view (validation) inference centre-crops ``input_size``; multi-crop testing takes
    ``num_crops`` crops of ``crop_size``.
    """

    mean: tuple[float, ...] = attrs.field(default=(123.675, 116.28, 103.53), converter=_float_tuple)
    std: tuple[float, ...] = attrs.field(default=(58.395, 57.12, 57.375), converter=_float_tuple)
    value_range: tuple[float, ...] = attrs.field(default=(0.0, 255.0), converter=_float_tuple)
    clip_len: int | None = 32
    frame_interval: int = 2
    num_clips: int = 10
    num_crops: int = 3
    sampling: Literal["uniform", "dense", "all"] = "uniform"
    resize_short: int = 256
    crop_size: int = 256
    input_size: int = 224
    interpolation: Literal["bilinear", "area", "bicubic"] = "bilinear"
    fps: float | None = None
    average_clips: Literal["prob", "score"] = "prob"
    modality: Literal["rgb", "flow"] = "rgb"

    def __attrs_post_init__(self) -> None:
        if len(self.mean) != len(self.std):
            raise ValueError("preprocessing mean and std must have the same length")
        if any(s == 0 for s in self.std):
            raise ValueError("preprocessing std must not contain zeros")
        if len(self.value_range) != 2:
            raise ValueError("preprocessing value_range must be (low, high)")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return structure(cls, data)


MMACTION_K400 = Preprocessing()
"""mmaction2 I3D K400 test protocol: 32×2 frames, 10 clips × 3 crops of 256 after short side 256."""

DEEPMIND_K400 = Preprocessing(
    mean=(0.0, 0.0, 0.0),
    std=(1.0, 1.0, 1.0),
    value_range=(-1.0, 1.0),
    clip_len=None,
    frame_interval=1,
    num_clips=1,
    num_crops=1,
    sampling="all",
    resize_short=256,
    crop_size=224,
    input_size=224,
    fps=25.0,
    average_clips="prob",
)
"""DeepMind's protocol: every frame at 25 fps, short side 256 bilinear, centre 224, [-1, 1]."""
