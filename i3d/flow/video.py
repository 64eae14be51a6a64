"""Flow of a whole video, streamed: decode, resample, resize/crop as RGB, TV-L1 chunk by chunk."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from i3d.data.decode import VideoDecodeError, open_video
from i3d.data.transforms import center_box, resize_short
from i3d.features.snippets import video_timeline
from i3d.flow.recipe import FlowConfig, pair_flow, rgb_to_gray, scale_flow


def _prepare(frames: np.ndarray, size: int | None, crop_size: int | None) -> np.ndarray:
    """uint8 RGB frames with the short side resized to ``size`` (mmcv bilinear), greyscale."""
    tensor = torch.from_numpy(frames)
    if size is not None:
        tensor = resize_short(tensor, size)
    gray = rgb_to_gray(tensor.numpy())
    if crop_size is not None:
        height, width = gray.shape[1:]
        if crop_size > min(height, width):
            raise ValueError(f"crop {crop_size} is larger than the {width}x{height} frames")
    return gray


def iter_video_flow(
    path: str | os.PathLike[str],
    config: FlowConfig = FlowConfig(),
    fps: float | None = 25.0,
    size: int | None = None,
    crop_size: int | None = None,
) -> Iterator[np.ndarray]:
    """DeepMind-scaled flow of a video in chunks of (pairs, H, W, 2) float32 in [-1, 1].

    The timeline is resampled to ``fps`` (None: the video's own frames), frames are resized
    so their short side is ``size`` (None: as decoded), flow is computed on the full frames
    and then centre-cropped to ``crop_size`` (None: no crop), as the RGB stream is cropped.
    """
    with open_video(path) as reader:
        ticks = video_timeline(reader, fps).source
        if ticks.size < 2:
            raise VideoDecodeError(f"{path}: flow needs at least 2 frames, the video gives 1")
        step = config.batch_size
        previous: np.ndarray | None = None
        for start in range(0, ticks.size, step):
            gray = _prepare(reader.get_frames(ticks[start : start + step]), size, crop_size)
            if previous is not None:
                gray = np.concatenate([previous, gray])
            previous = gray[-1:]
            if len(gray) < 2:
                continue
            flow = scale_flow(pair_flow(gray[:-1], gray[1:], config), config.bound)
            if crop_size is not None:
                x1, y1, x2, y2 = center_box(flow.shape[-1], flow.shape[-2], crop_size)
                flow = flow[..., y1:y2, x1:x2]
            yield flow.permute(0, 2, 3, 1).contiguous().numpy()


def video_flow(
    path: str | os.PathLike[str],
    config: FlowConfig = FlowConfig(),
    fps: float | None = 25.0,
    size: int | None = None,
    crop_size: int | None = None,
) -> np.ndarray:
    """The whole of :func:`iter_video_flow` as one (T-1, H, W, 2) float32 array."""
    return np.concatenate(list(iter_video_flow(path, config, fps, size, crop_size)))
