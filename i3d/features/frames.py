"""Each frame of a snippet: resize, crops (in a named order) and normalisation.

Published feature sets differ in exactly these steps (OpenCV vs Pillow filters, fixed
340×256 vs short-side 256, torchvision's ten-crop order vs the "oversample" one), so a
:class:`FrameTransform` states every one, resolved from the protocol and the weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs
import cv2
import numpy as np
import torch

from i3d.data import transforms as T
from i3d.features.protocol import SnippetProtocol
from i3d.weights.preprocessing import Preprocessing

_PIL_FILTERS = {"pil-bilinear": "BILINEAR", "pil-lanczos": "LANCZOS"}


@attrs.frozen
class FrameTransform:
    """How one decoded frame becomes ``crops`` normalised model inputs (all fields resolved)."""

    resize_short: int | None
    frame_size: tuple[int, int] | None
    size_rule: str
    resampler: str
    """``cv2-<interpolation>`` (OpenCV's ``cv2.resize``, as mmcv) or ``pil-<filter>``."""
    crop_size: int
    crops: int
    crop_order: str
    value_range: tuple[float, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) of a ``width`` × ``height`` frame after the resize."""
        if self.frame_size is not None:
            return self.frame_size
        assert self.resize_short is not None
        if self.size_rule == "round":
            return T.rescale_size(width, height, self.resize_short)
        short = min(width, height)
        if width <= height:
            return self.resize_short, int(self.resize_short * height / short)
        return int(self.resize_short * width / short), self.resize_short

    def resize(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        """Decoded uint8 (H, W, 3) frames → (n, h, w, 3) at :meth:`output_size`, resized
        straight from the decoder's arrays (no stacked copy of the full-size frames)."""
        height, width = frames[0].shape[:2]
        size = self.output_size(width, height)
        if self.resampler.startswith("cv2-"):
            return torch.from_numpy(T.resize_each(frames, size, self.resampler[4:]))
        from PIL import Image

        method = getattr(Image.Resampling, _PIL_FILTERS[self.resampler])
        out = torch.empty((len(frames), size[1], size[0], 3), dtype=torch.uint8)
        for i, frame in enumerate(frames):
            image = Image.fromarray(frame)
            out[i] = torch.from_numpy(
                np.array(image if size == (width, height) else image.resize(size, method))
            )
        return out

    def resize_flow(self, fields: np.ndarray) -> np.ndarray:
        """float32 flow (n, H, W, 2) in pixels of the decoded frames → (n, h, w, 2) at
        :meth:`output_size`, resized as the frames are (OpenCV) and not rescaled: the
        displacements stay in decoded-frame pixels, as MS-TCN's extractor leaves them."""
        if not self.resampler.startswith("cv2-"):
            raise ValueError(f"flow fields are resized with OpenCV, not {self.resampler}")
        size = self.output_size(fields.shape[2], fields.shape[1])
        if size == (fields.shape[2], fields.shape[1]):
            return fields
        code = T.interpolation_code(self.resampler[4:])
        return np.stack([cv2.resize(field, size, interpolation=code) for field in fields])

    def boxes(self, width: int, height: int) -> list[tuple[T.Box, bool]]:
        """(box, flipped) of each crop on a resized ``width`` × ``height`` frame, in order."""
        size = self.crop_size
        if size > min(width, height):
            raise ValueError(f"crop size {size} does not fit in the {width}x{height} resized frame")
        if self.crops != 10 or self.crop_order == "mmaction":
            return T.view_boxes(width, height, size, self.crops)
        five = _torchvision_five if self.crop_order == "torchvision" else _oversample_five
        plain = [(box, False) for box in five(width, height, size)]
        # the same five boxes taken on the mirrored frame, in the original frame's coordinates
        mirrored = [
            ((width - x2, y1, width - x1, y2), True) for x1, y1, x2, y2 in five(width, height, size)
        ]
        return plain + mirrored

    def normalize(self, views: torch.Tensor) -> torch.Tensor:
        """uint8 views (..., C, T, H, W) → float32 model input."""
        return T.normalize(views, self.mean, self.std, self.value_range)

    def to_dict(self) -> dict[str, object]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(self).items()}


def _torchvision_five(width: int, height: int, size: int) -> list[T.Box]:
    """torchvision ``five_crop``: top-left, top-right, bottom-left, bottom-right, centre
    (the centre offset rounded half to even, as torchvision's ``center_crop``)."""
    left, top = round((width - size) / 2.0), round((height - size) / 2.0)
    corners = [(0, 0), (width - size, 0), (0, height - size), (width - size, height - size)]
    return [(x, y, x + size, y + size) for x, y in [*corners, (left, top)]]


def _oversample_five(width: int, height: int, size: int) -> list[T.Box]:
    """The "oversample" ten-crop of pytorch-i3d feature extractors: top-left, top-right,
    centre (floor offsets), bottom-left, bottom-right."""
    left, top = (width - size) // 2, (height - size) // 2
    offsets = [
        (0, 0),
        (width - size, 0),
        (left, top),
        (0, height - size),
        (width - size, height - size),
    ]
    return [(x, y, x + size, y + size) for x, y in offsets]


def frame_transform(protocol: SnippetProtocol, prep: Preprocessing) -> FrameTransform:
    """The protocol's frame steps, the weights' preprocessing filling what it leaves open.

    Default crop: the weights' single-view ``input_size`` for a centre crop, their test
    ``crop_size`` for 3 or 10; three crops span the short side (mmaction's ThreeCrop), so
    without an explicit size the short side is resized to the crop size.
    """
    crop = protocol.crop_size or (prep.input_size if protocol.crops == 1 else prep.crop_size)
    short = protocol.resize_short
    if short is None and protocol.frame_size is None:
        short = crop if protocol.crops == 3 else prep.resize_short
    if protocol.crops == 3 and protocol.frame_size is None and crop != short:
        raise ValueError(
            f"three crops span the short side: crop size {crop} must equal resize_short {short}"
        )
    mean = protocol.mean if protocol.mean is not None else prep.mean
    std = protocol.std if protocol.std is not None else prep.std
    if len(mean) != len(std) or any(s == 0 or math.isnan(s) for s in std):
        raise ValueError(f"mean {mean} and std {std} must match in length, std without zeros")
    return FrameTransform(
        resize_short=None if protocol.frame_size is not None else short,
        frame_size=protocol.frame_size,
        size_rule=protocol.size_rule,
        resampler=protocol.resampler or f"cv2-{prep.interpolation}",
        crop_size=crop,
        crops=protocol.crops,
        crop_order=protocol.crop_order,
        value_range=protocol.value_range or prep.value_range,
        mean=mean,
        std=std,
    )
