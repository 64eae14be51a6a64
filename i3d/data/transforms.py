"""Frame transforms on uint8 tensors (T, H, W, C), batched over frames, with mmaction semantics.

Sizes are (width, height) as in mmcv. ``resize`` runs OpenCV's ``cv2.resize``, which is what
mmcv's ``imresize`` calls, so frames match mmaction's pipeline bit for bit on any build that
mmaction itself would run on (and at OpenCV's speed: ~1 ms per 1080p frame on one core).
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from einops import rearrange

from i3d.utils.memory import empty_frames

Box = tuple[int, int, int, int]
"""Crop box (x1, y1, x2, y2), as mmaction's ``crop_bbox``."""

_CV2_INTERPOLATION = {
    "bilinear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
    "bicubic": cv2.INTER_CUBIC,
    "area": cv2.INTER_AREA,
    "lanczos": cv2.INTER_LANCZOS4,
}
"""mmcv's ``cv2_interp_codes``: the interpolation names its ``imresize`` takes."""
INTERPOLATIONS = tuple(_CV2_INTERPOLATION)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    w, h = size
    return int(w), int(h)


def rescale_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) after scaling the short side to ``short_side`` (mmcv ``rescale_size`` rounding)."""
    factor = short_side / min(width, height)
    return int(width * factor + 0.5), int(height * factor + 0.5)


def resize(
    frames: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear"
) -> torch.Tensor:
    """Resize uint8 frames (T, H, W, C) to ``size`` = (width, height) with ``cv2.resize``."""
    if frames.dtype != torch.uint8 or frames.ndim != 4:
        raise ValueError(
            f"resize takes uint8 frames (T, H, W, C), got {frames.dtype} {tuple(frames.shape)}"
        )
    if tuple(frames.shape[2:0:-1]) == tuple(size):
        interpolation_code(interpolation)
        return frames
    return torch.from_numpy(resize_each(list(frames.cpu().numpy()), size, interpolation))


def resize_each(
    frames: Sequence[np.ndarray],
    size: tuple[int, int],
    interpolation: str = "bilinear",
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Each uint8 (H, W, C) frame resized to ``size`` = (width, height) into ``out[i]``.

    Decoded frames go straight into the (T, height, width, C) result (allocated when
    ``out`` is None): no stacked copy of the full-size frames is made first.
    """
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"resize target must be positive, got {width}x{height}")
    code = interpolation_code(interpolation)
    channels = frames[0].shape[2]
    if out is None:
        out = np.empty((len(frames), height, width, channels), dtype=np.uint8)
    for i, frame in enumerate(frames):
        if frame.shape[1::-1] == (width, height):
            out[i] = frame
        elif channels == 1:  # OpenCV drops a single channel axis
            out[i, ..., 0] = cv2.resize(frame[..., 0], size, interpolation=code)
        else:
            cv2.resize(frame, size, dst=out[i], interpolation=code)
    return out


def interpolation_code(interpolation: str) -> int:
    """OpenCV's flag for an interpolation name (``bilinear``, ``nearest``, ...)."""
    code = _CV2_INTERPOLATION.get(interpolation)
    if code is None:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from {INTERPOLATIONS}")
    return code


def resize_short(
    frames: torch.Tensor, short_side: int, interpolation: str = "bilinear"
) -> torch.Tensor:
    """Scale so the short side is ``short_side``, keeping the aspect ratio (mmcv rounding)."""
    height, width = frames.shape[1:3]
    return resize(frames, rescale_size(width, height, short_side), interpolation)


def crop(frames: torch.Tensor, box: Box) -> torch.Tensor:
    """Frames cut to ``box`` = (x1, y1, x2, y2) (a view, no copy)."""
    x1, y1, x2, y2 = box
    return frames[:, y1:y2, x1:x2]


def center_box(width: int, height: int, size: int | Sequence[int]) -> Box:
    """mmaction ``CenterCrop`` box (floor offsets)."""
    crop_w, crop_h = _pair(size)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h


def three_boxes(width: int, height: int, size: int | Sequence[int]) -> list[Box]:
    """mmaction ``ThreeCrop`` boxes along the long side: start, end (``2*step``), middle."""
    crop_w, crop_h = _pair(size)
    if crop_h != height and crop_w != width:
        raise ValueError(
            f"three-crop needs the crop ({crop_w}x{crop_h}) to span the frame's short side "
            f"({width}x{height}); resize the short side to the crop size first"
        )
    if crop_h == height:
        step = (width - crop_w) // 2
        return [(x, 0, x + crop_w, crop_h) for x in (0, 2 * step, step)]
    step = (height - crop_h) // 2
    return [(0, y, crop_w, y + crop_h) for y in (0, 2 * step, step)]


def five_boxes(width: int, height: int, size: int | Sequence[int]) -> list[Box]:
    """Corner and centre boxes in mmaction order: UL, UR, LL, LR, centre (quarter-step grid)."""
    crop_w, crop_h = _pair(size)
    ws, hs = (width - crop_w) // 4, (height - crop_h) // 4
    offsets = [(0, 0), (4 * ws, 0), (0, 4 * hs), (4 * ws, 4 * hs), (2 * ws, 2 * hs)]
    return [(x, y, x + crop_w, y + crop_h) for x, y in offsets]


def view_boxes(width: int, height: int, size: int, crops: int) -> list[tuple[Box, bool]]:
    """(box, mirrored) of mmaction's test crops: the centre (1), ThreeCrop (3), or TenCrop
    (10: each of the five boxes, then its mirror)."""
    if crops == 1:
        return [(center_box(width, height, size), False)]
    if crops == 3:
        return [(box, False) for box in three_boxes(width, height, size)]
    if crops == 10:
        return [(box, flip) for box in five_boxes(width, height, size) for flip in (False, True)]
    raise ValueError(f"test crops are 1, 3 or 10, not {crops}")


def center_crop(frames: torch.Tensor, size: int | Sequence[int]) -> torch.Tensor:
    """Centre crop of ``size`` (int or (w, h))."""
    height, width = frames.shape[1:3]
    return crop(frames, center_box(width, height, size))


def three_crop(frames: torch.Tensor, size: int | Sequence[int]) -> list[torch.Tensor]:
    """mmaction ``ThreeCrop``: three crops covering the long side."""
    height, width = frames.shape[1:3]
    return [crop(frames, b) for b in three_boxes(width, height, size)]


def ten_crop(frames: torch.Tensor, size: int | Sequence[int]) -> list[torch.Tensor]:
    """mmaction ``TenCrop``: each of the five boxes, then its horizontal flip."""
    height, width = frames.shape[1:3]
    out = []
    for box in five_boxes(width, height, size):
        cut = crop(frames, box)
        out += [cut, flip(cut)]
    return out


def multi_scale_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    input_size: int | Sequence[int] = 224,
    scales: Sequence[float] = (1, 0.875, 0.75, 0.66),
    max_wh_scale_gap: int = 1,
    random_crop: bool = False,
) -> Box:
    """mmaction ``MultiScaleCrop`` box (5 fixed offsets unless ``random_crop``) drawn from rng."""
    target = _pair(input_size)
    sizes = [int(min(width, height) * s) for s in scales]
    candidates = [
        [w, h]
        for i, h in enumerate(sizes)
        for j, w in enumerate(sizes)
        if abs(i - j) <= max_wh_scale_gap
    ]
    chosen = candidates[int(rng.integers(len(candidates)))]
    crop_w, crop_h = (t if abs(c - t) < 3 else c for c, t in zip(chosen, target, strict=True))
    if random_crop:
        x = int(rng.integers(0, width - crop_w + 1))
        y = int(rng.integers(0, height - crop_h + 1))
        return x, y, x + crop_w, y + crop_h
    boxes = five_boxes(width, height, (crop_w, crop_h))
    return boxes[int(rng.integers(len(boxes)))]


def flip(frames: torch.Tensor) -> torch.Tensor:
    """Horizontal flip (reverse the W axis)."""
    return frames.flip(2)


def to_views(
    crops: Sequence[torch.Tensor], num_clips: int, index: torch.Tensor | None = None
) -> torch.Tensor:
    """Crops (N, H, W, C) → views (V, C, T, H, W); view v = crop v // k of clip v % k.

    ``index`` picks (and repeats) frames of each crop into clip order, so crops can be cut
    from each decoded frame once; it is fused with the copy into the output.
    """
    first = crops[0]
    index = torch.arange(first.shape[0]) if index is None else index
    out = empty_frames((len(crops), index.numel(), *first.shape[1:]), first.dtype)
    for k, cut in enumerate(crops):
        torch.index_select(cut, 0, index, out=out[k])
    return rearrange(out, "n (k t) h w c -> (n k) c t h w", k=num_clips)


def normalize(
    views: torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    value_range: Sequence[float] = (0.0, 255.0),
) -> torch.Tensor:
    """uint8 (..., C, T, H, W) → float32: [0, 255] to ``value_range``, then (x - mean) / std.

    Runs where ``views`` are (host or device) with the same elementwise float32 operations
    in the same order, so a device gives the host's result bit for bit (IEEE-rounded mul,
    add, sub and div; nothing is fused).
    """
    x = views.to(torch.float32)
    low, high = value_range
    if (low, high) != (0.0, 255.0):
        x = x * ((high - low) / 255.0) + low
    shape = (len(mean), 1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32).view(shape)
    if torch.all(mean_t == 0) and torch.all(std_t == 1):  # decided on the host: no device sync
        return x
    return (x - mean_t.to(x.device)) / std_t.to(x.device)
