"""Flow of a whole video, streamed: decode, resample, resize as RGB, flow chunk by chunk."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import torch

from i3d.data.decode import VideoDecodeError, VideoReader, open_video
from i3d.data.pipeline import chunked
from i3d.data.transforms import center_box, resize_short
from i3d.flow.recipe import FlowConfig, frame_flow, scale_flow

_DECODE_CHUNK = 16  # decoded frames resized together


def timeline_frames(
    reader: VideoReader,
    timeline: np.ndarray,
    size: int | None = None,
    interpolation: str = "bilinear",
) -> Iterator[np.ndarray]:
    """uint8 RGB frame (H, W, 3) of each timeline position in order, its short side resized
    to ``size`` (None: as decoded); each source frame is decoded and resized once."""
    for chunk in chunked(reader.iter_frames(np.unique(timeline)), _DECODE_CHUNK):
        frames = torch.from_numpy(np.stack([frame for _, frame in chunk]))
        if size is not None:
            frames = resize_short(frames, size, interpolation)
        for (index, _), frame in zip(chunk, frames.numpy(), strict=True):
            lo, hi = np.searchsorted(timeline, [index, index + 1])
            for _ in range(int(hi - lo)):
                yield frame


def iter_timeline_flow(
    reader: VideoReader,
    timeline: np.ndarray,
    config: FlowConfig = FlowConfig(),
    size: int | None = None,
    interpolation: str = "bilinear",
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(flow, frames) chunks of a timeline: DeepMind-scaled flow (n, H, W, 2) of the next n
    ticks (tick t: position t to t + 1) and the RGB frames (n, H, W, 3) of those positions;
    the final chunk holds no flow and the last frame."""
    if timeline.size < 2:
        raise VideoDecodeError(f"{reader.path}: flow needs at least 2 frames, the video gives 1")
    held: list[np.ndarray] = []
    for frame in timeline_frames(reader, timeline, size, interpolation):
        held.append(frame)
        if len(held) == config.batch_size + 1:
            yield _solve(np.stack(held), config), np.stack(held[:-1])
            held = held[-1:]
    if len(held) > 1:
        yield _solve(np.stack(held), config), np.stack(held[:-1])
    yield np.zeros((0, *held[-1].shape[:2], 2), np.float32), held[-1][None]


def _solve(frames: np.ndarray, config: FlowConfig) -> np.ndarray:
    """[-1, 1] flow (n - 1, H, W, 2) between consecutive uint8 RGB frames (n, H, W, 3)."""
    flow = scale_flow(frame_flow(frames[:-1], frames[1:], config), config.bound)
    return flow.permute(0, 2, 3, 1).contiguous().numpy()


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
    from i3d.features.snippets import video_timeline  # i3d.features imports i3d.inference

    with open_video(path) as reader:
        ticks = video_timeline(reader, fps).source
        for flow, _ in iter_timeline_flow(reader, ticks, config, size):
            if crop_size is not None:
                height, width = flow.shape[1:3]
                if crop_size > min(height, width):
                    raise ValueError(f"crop {crop_size} is larger than the {width}x{height} frames")
                x1, y1, x2, y2 = center_box(width, height, crop_size)
                flow = np.ascontiguousarray(flow[:, y1:y2, x1:x2])
            if len(flow):
                yield flow


def video_flow(
    path: str | os.PathLike[str],
    config: FlowConfig = FlowConfig(),
    fps: float | None = 25.0,
    size: int | None = None,
    crop_size: int | None = None,
) -> np.ndarray:
    """The whole of :func:`iter_video_flow` as one (T-1, H, W, 2) float32 array."""
    return np.concatenate(list(iter_video_flow(path, config, fps, size, crop_size)))
