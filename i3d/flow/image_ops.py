"""The image operators of TV-L1 on (N, H, W) float tensors, with OpenCV's border rules.

Each operator matches the one OpenCV's ``DualTVL1OpticalFlow`` (opencv_contrib
``optflow/src/tvl1flow.cpp``) uses, so the PyTorch solver can follow the reference step by
step: ``INTER_LINEAR`` resizes (half-pixel centres, edge pixels repeated), centred image
gradients with one-sided differences at the border, forward differences and their adjoint
divergence for the flow, a 5×5 (or 3×3) median with replicated borders, and ``INTER_CUBIC``
remapping (cubic convolution a = -0.75, zeros outside the image; OpenCV 5's remap samples
float maps at full precision, which ``grid_sample`` matches to 1e-3 grey levels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def scaled_size(height: int, width: int, factor: float) -> tuple[int, int]:
    """(h, w) of ``cv::resize(src, Size(), factor, factor)``: each side × ``factor``, rounded."""
    return round(height * factor), round(width * factor)


def _linear_taps(
    src: int, dst: int, scale: float, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (lo, hi) and the weight of hi along one axis of an INTER_LINEAR resize."""
    pos = ((torch.arange(dst, dtype=torch.float64) + 0.5) * scale - 0.5).to(torch.float32)
    lo = torch.floor(pos)
    frac = pos - lo
    lo = lo.to(torch.int64)
    hi = (lo + 1).clamp(0, src - 1)
    lo = lo.clamp(0, src - 1)
    return lo.to(device), hi.to(device), frac.to(device)


def resize_linear(
    images: torch.Tensor, size: tuple[int, int], scale: tuple[float, float] | None = None
) -> torch.Tensor:
    """``cv::resize`` INTER_LINEAR of (N, H, W) float images to ``size`` = (h, w).

    ``scale`` = (sy, sx) source pixels per output pixel; by default ``in / out`` (a resize to
    an explicit size), while ``cv::resize`` with a factor f uses exactly ``1 / f`` although the
    output size is rounded.
    """
    height, width = images.shape[-2:]
    out_h, out_w = size
    sy, sx = scale if scale is not None else (height / out_h, width / out_w)
    y0, y1, fy = _linear_taps(height, out_h, sy, images.device)
    x0, x1, fx = _linear_taps(width, out_w, sx, images.device)
    fx = fx.to(images.dtype)
    fy = fy.to(images.dtype)[:, None]
    rows = images.index_select(-1, x0) * (1 - fx) + images.index_select(-1, x1) * fx
    return rows.index_select(-2, y0) * (1 - fy) + rows.index_select(-2, y1) * fy


def centered_gradient(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/dx, d/dy) as half the difference of the two neighbours, the edge pixel repeated."""
    padded = _replicate_pad(images, 1)
    dx = 0.5 * (padded[..., 1:-1, 2:] - padded[..., 1:-1, :-2])
    dy = 0.5 * (padded[..., 2:, 1:-1] - padded[..., :-2, 1:-1])
    return dx, dy


def forward_gradient(field: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(d/dx, d/dy) as forward differences, zero on the last column / row (Neumann)."""
    dx = torch.zeros_like(field)
    dy = torch.zeros_like(field)
    dx[..., :, :-1] = field[..., :, 1:] - field[..., :, :-1]
    dy[..., :-1, :] = field[..., 1:, :] - field[..., :-1, :]
    return dx, dy


def divergence(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Backward-difference divergence of (px, py), the negative adjoint of ``forward_gradient``."""
    div = px + py
    div[..., :, 1:] -= px[..., :, :-1]
    div[..., 1:, :] -= py[..., :-1, :]
    return div


def _replicate_pad(images: torch.Tensor, pad: int) -> torch.Tensor:
    """(N, H, W) grown by ``pad`` pixels on every side, repeating the edge pixels."""
    height, width = images.shape[-2:]
    rows = torch.arange(-pad, height + pad, device=images.device).clamp(0, height - 1)
    cols = torch.arange(-pad, width + pad, device=images.device).clamp(0, width - 1)
    return images.index_select(-2, rows).index_select(-1, cols)


def _sort_pair(values: list[torch.Tensor], i: int, j: int) -> None:
    """Compare-exchange: afterwards ``values[i] <= values[j]`` elementwise."""
    low = torch.minimum(values[i], values[j])
    values[j] = torch.maximum(values[i], values[j])
    values[i] = low


def median_filter(field: torch.Tensor, size: int) -> torch.Tensor:
    """``cv::medianBlur`` of (N, H, W) floats: the median of each size×size window, edges repeated.

    Forgetful selection with elementwise min/max (exact, and several times faster than
    ``torch.median`` over unfolded windows): hold k²//2 + 2 candidates, drop their minimum
    and maximum, take in the next value, until one is left.
    """
    half = size // 2
    height, width = field.shape[-2:]
    padded = _replicate_pad(field, half)
    pending = [
        padded[..., dy : dy + height, dx : dx + width] for dy in range(size) for dx in range(size)
    ]
    held = pending[: len(pending) // 2 + 2]
    pending = pending[len(held) :]
    while True:
        for i in range(1, len(held)):
            _sort_pair(held, 0, i)
        for i in range(1, len(held) - 1):
            _sort_pair(held, i, len(held) - 1)
        held = held[1:-1]
        if not pending:
            return held[0]
        held.append(pending.pop(0))


CUBIC_A = -0.75
"""The cubic convolution constant of OpenCV's INTER_CUBIC (Keys' kernel with a = -0.75)."""


def _cubic_weights(frac: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The four INTER_CUBIC tap weights for taps at -1, 0, 1, 2 around a fractional offset."""
    a = CUBIC_A
    near = frac + 1
    far = 1 - frac
    w0 = ((a * near - 5 * a) * near + 8 * a) * near - 4 * a
    w1 = ((a + 2) * frac - (a + 3)) * frac * frac + 1
    w2 = ((a + 2) * far - (a + 3)) * far * far + 1
    return w0, w1, w2, 1 - w0 - w1 - w2


def warp_bicubic(images: torch.Tensor, flow_x: torch.Tensor, flow_y: torch.Tensor) -> torch.Tensor:
    """``cv::remap`` INTER_CUBIC of (N, C, H, W) at (x + flow_x, y + flow_y); zero outside.

    Taps are gathered at exact integer offsets (unlike ``grid_sample``, whose coordinate
    normalisation moves integer positions by ~1e-5 px), so a zero flow returns the image
    unchanged, as OpenCV's does.
    """
    batch, channels, height, width = images.shape
    pad = 2  # zero border: a tap outside the image reads a zero there after clamping
    padded = F.pad(images, (pad, pad, pad, pad))
    stride = width + 2 * pad
    flat = padded.reshape(batch, channels, -1)
    ys = torch.arange(height, device=images.device, dtype=images.dtype)[:, None]
    xs = torch.arange(width, device=images.device, dtype=images.dtype)
    map_x = (xs + flow_x).reshape(batch, -1)
    map_y = (ys + flow_y).reshape(batch, -1)
    # positions far outside would overflow the integer taps; any beyond 3 px reads zeros anyway
    map_x = map_x.clamp(-pad - 2.0, width + pad + 1.0)
    map_y = map_y.clamp(-pad - 2.0, height + pad + 1.0)
    x0 = torch.floor(map_x)
    y0 = torch.floor(map_y)
    wx = _cubic_weights(map_x - x0)
    wy = _cubic_weights(map_y - y0)
    x0 = x0.to(torch.int64) + pad - 1
    y0 = y0.to(torch.int64) + pad - 1
    out = torch.zeros_like(flat[..., : height * width])
    for i in range(4):
        row = (y0 + i).clamp(0, height + 2 * pad - 1) * stride
        for j in range(4):
            index = row + (x0 + j).clamp(0, stride - 1)
            taps = flat.gather(-1, index[:, None, :].expand(batch, channels, -1))
            out += (wy[i] * wx[j])[:, None, :] * taps
    return out.reshape(batch, channels, height, width)
