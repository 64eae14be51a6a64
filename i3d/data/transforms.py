"""Frame transforms on uint8 tensors (T, H, W, C), batched over frames, with mmaction semantics.

Sizes are (width, height) as in mmcv. ``resize`` with ``bilinear`` reproduces OpenCV's
``INTER_LINEAR`` fixed-point arithmetic (x86 SIMD build, as mmcv's ``imresize`` runs it): an
exact 2× downscale averages 2×2 blocks as ``(a+b+c+d+2)>>2`` and other sizes use 11-bit
weights, so outputs match OpenCV bit for bit on that build and within ±1 elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from i3d.utils.memory import empty_frames

Box = tuple[int, int, int, int]
"""Crop box (x1, y1, x2, y2), as mmaction's ``crop_bbox``."""

INTERPOLATIONS = ("bilinear", "area", "bicubic")
_COEF_BITS = 11
_CHUNK = 16  # frames per step of the fixed-point resize (bounds int32 temporaries)


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    w, h = size
    return int(w), int(h)


def rescale_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(w, h) after scaling the short side to ``short_side`` (mmcv ``rescale_size`` rounding)."""
    factor = short_side / min(width, height)
    return int(width * factor + 0.5), int(height * factor + 0.5)


def _axis_taps(src: int, dst: int, clamp_fraction: bool) -> tuple[torch.Tensor, ...]:
    """OpenCV INTER_LINEAR source taps (s0, s1) and 11-bit weights (w0, w1) along one axis."""
    scale = 1.0 / (dst / src)
    f = ((np.arange(dst, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s.astype(np.float32)).astype(np.float32)
    if clamp_fraction:
        f[s < 0] = 0
        s[s < 0] = 0
        over = s >= src - 1
        f[over] = 0
        s[over] = src - 1
    one = np.float32(1 << _COEF_BITS)
    w0 = np.rint((np.float32(1) - f) * one).astype(np.int32)
    w1 = np.rint(f * one).astype(np.int32)
    s0 = np.clip(s, 0, src - 1)
    s1 = np.clip(s + 1, 0, src - 1)
    return tuple(torch.from_numpy(a) for a in (s0, s1, w0, w1))


def _resize_linear_fixed(frames: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """OpenCV x86 INTER_LINEAR on uint8 (T, H, W, C) in integer arithmetic."""
    src_h, src_w = frames.shape[1:3]
    x0, x1, wx0, wx1 = _axis_taps(src_w, width, clamp_fraction=True)
    y0, y1, wy0, wy1 = _axis_taps(src_h, height, clamp_fraction=False)
    wx0, wx1 = wx0[:, None], wx1[:, None]
    wy0, wy1 = wy0[:, None, None], wy1[:, None, None]
    out = torch.empty((frames.shape[0], height, width, frames.shape[3]), dtype=torch.uint8)
    for start in range(0, frames.shape[0], _CHUNK):
        chunk = frames[start : start + _CHUNK].to(torch.int32)
        rows0, rows1 = chunk[:, y0], chunk[:, y1]
        h0 = rows0[:, :, x0] * wx0 + rows0[:, :, x1] * wx1
        h1 = rows1[:, :, x0] * wx0 + rows1[:, :, x1] * wx1
        val = ((((h0 >> 4) * wy0) >> 16) + (((h1 >> 4) * wy1) >> 16) + 2) >> 2
        out[start : start + _CHUNK] = val.clamp_(0, 255).to(torch.uint8)
    return out


def _halve(frames: torch.Tensor) -> torch.Tensor:
    """Exact 2× downscale: each output pixel is ``(a + b + c + d + 2) >> 2`` of its 2×2 block."""
    out = []
    for start in range(0, frames.shape[0], _CHUNK):
        x = frames[start : start + _CHUNK].to(torch.int32)
        total = x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2]
        out.append(((total + 2) >> 2).to(torch.uint8))
    return torch.cat(out)


def resize(
    frames: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear"
) -> torch.Tensor:
    """Resize uint8 frames (T, H, W, C) to ``size`` = (width, height)."""
    width, height = size
    if width < 1 or height < 1:
        raise ValueError(f"resize target must be positive, got {width}x{height}")
    src_h, src_w = frames.shape[1:3]
    if (src_w, src_h) == (width, height):
        return frames
    if interpolation == "bilinear":
        if src_w == 2 * width and src_h == 2 * height:
            return _halve(frames)
        return _resize_linear_fixed(frames, width, height)
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {interpolation!r}; choose from {INTERPOLATIONS}")
    x = rearrange(frames, "t h w c -> t c h w").float()
    kwargs = {"align_corners": False} if interpolation == "bicubic" else {}
    x = F.interpolate(x, size=(height, width), mode=interpolation, **kwargs)
    return rearrange(x.round_().clamp_(0, 255).to(torch.uint8), "t c h w -> t h w c")


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
    """uint8 (..., C, T, H, W) → float32: [0, 255] to ``value_range``, then (x - mean) / std."""
    x = views.to(torch.float32)
    low, high = value_range
    if (low, high) != (0.0, 255.0):
        x = x * ((high - low) / 255.0) + low
    shape = (len(mean), 1, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(shape)
    std_t = torch.tensor(std, dtype=torch.float32).view(shape)
    if torch.all(mean_t == 0) and torch.all(std_t == 1):
        return x
    return (x - mean_t) / std_t
