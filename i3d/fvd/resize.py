"""Each FVD protocol's own frame resize and value scaling, uint8 frames → detector input.

Every function takes one clip of uint8 RGB frames (T, H, W, 3) (a tensor) and returns the
float32 (3, T, size, size) clip in [-1, 1] that the I3D detector reads. The three resizes
differ in where they sample the source image, and that shifts FVD:

* :func:`tf1_resize_bilinear` is TensorFlow 1's ``tf.image.resize_bilinear`` with its
  defaults (``align_corners=False``, ``half_pixel_centers=False``): output pixel ``d`` reads
  source position ``d * in / out`` (no half-pixel offset, no antialiasing), interpolating
  between ``floor`` and ``min(floor + 1, in - 1)``; computed in float32 as TF's CPU kernel
  does (along x in the two source rows, then along y).
* :func:`torch_bilinear` is ``torch.nn.functional.interpolate(mode="bilinear",
  align_corners=False)``: source position ``(d + 0.5) * in / out - 0.5``, clamped at 0.
* :func:`short_side_center_crop` scales the short side to ``size`` with that torch bilinear
  (the long side to ``ceil(long * size / short)``) and cuts the centre square.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _check_clip(frames: torch.Tensor) -> None:
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"expected uint8 RGB frames (T, H, W, 3), got {tuple(frames.shape)} {frames.dtype}"
        )


def tf1_source_positions(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TF1 legacy bilinear sampling of one axis: (lower index, upper index, float32 weight)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    lower = np.floor(src).astype(np.int64)
    upper = np.minimum(lower + 1, in_size - 1)
    return lower, upper, (src - lower.astype(np.float32)).astype(np.float32)


def tf1_resize_bilinear_float(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``tf.image.resize_bilinear`` (TF1 defaults) of float32 images (..., H, W, C) to ``size``."""
    h, w = images.shape[-3], images.shape[-2]
    y0, y1, yl = (torch.from_numpy(a) for a in tf1_source_positions(h, size[0]))
    x0, x1, xl = (torch.from_numpy(a) for a in tf1_source_positions(w, size[1]))
    left = images.index_select(-2, x0)
    right = images.index_select(-2, x1)
    rows = left + (right - left) * xl[:, None]  # along x first, as TF's kernel
    top = rows.index_select(-3, y0)
    bottom = rows.index_select(-3, y1)
    return top + (bottom - top) * yl[:, None, None]


def tf1_resize_bilinear(frames: torch.Tensor, size: int) -> torch.Tensor:
    """google-research FVD ``preprocess``: TF1 bilinear to size², then ``2 * x / 255 - 1``."""
    _check_clip(frames)
    resized = tf1_resize_bilinear_float(frames.to(torch.float32), (size, size))
    scaled = 2.0 * resized / 255.0 - 1.0
    return scaled.permute(3, 0, 1, 2).contiguous()


def torch_bilinear(frames: torch.Tensor, size: int) -> torch.Tensor:
    """cd-fvd ``preprocess_i3d``: torch bilinear (half-pixel) to size², then ``2 * x / 255 - 1``."""
    _check_clip(frames)
    x = frames.to(torch.float32).permute(0, 3, 1, 2)  # (T, 3, H, W)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    scaled = 2.0 * x / 255.0 - 1.0
    return scaled.permute(1, 0, 2, 3).contiguous()


def short_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """(H, W) after scaling the short side to ``size``; the long side is rounded up."""
    scale = size / min(height, width)
    if height < width:
        return size, math.ceil(width * scale)
    return math.ceil(height * scale), size


def short_side_center_crop(frames: torch.Tensor, size: int) -> torch.Tensor:
    """common_metrics ``preprocess_single``: x / 255, short side to size (torch bilinear),
    centre size² crop (offsets rounded down), then ``(x - 0.5) * 2``."""
    _check_clip(frames)
    x = frames.to(torch.float32).permute(3, 0, 1, 2) / 255.0  # (3, T, H, W), [0, 1]
    target = short_side_size(x.shape[-2], x.shape[-1], size)
    x = F.interpolate(x, size=target, mode="bilinear", align_corners=False)
    top = (x.shape[-2] - size) // 2
    left = (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    return ((x - 0.5) * 2).contiguous()


def stylegan_v_detector_resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """StyleGAN-V's detector call (``rescale=True, resize=True``): ``x / 127.5 - 1``, then
    torch trilinear (half-pixel) to (T, size, size), which equals per-frame bilinear."""
    _check_clip(frames)
    x = frames.to(torch.float32).permute(3, 0, 1, 2)[None] / 127.5 - 1.0  # (1, 3, T, H, W)
    x = F.interpolate(x, size=(x.shape[2], size, size), mode="trilinear", align_corners=False)
    return x[0].contiguous()


RESIZES = {
    "tf1_bilinear": tf1_resize_bilinear,
    "torch_bilinear": torch_bilinear,
    "short_side_center_crop": short_side_center_crop,
    "stylegan_v_detector": stylegan_v_detector_resize,
}
"""Resize names a :class:`~i3d.fvd.protocols.Protocol` may use, and their functions."""
