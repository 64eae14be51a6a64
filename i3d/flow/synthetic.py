"""Frame pairs with known motion (a smooth texture moved by a given flow), to check TV-L1."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def smooth_texture(height: int, width: int, seed: int = 0, cell: int = 4) -> np.ndarray:
    """float32 (H, W) in [0, 255]: random values every ``cell`` pixels, bicubically upsampled."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 1, height // cell + 3, width // cell + 3)))
    fine = F.interpolate(coarse.float(), scale_factor=cell, mode="bicubic", align_corners=False)
    return (fine[0, 0, :height, :width].clamp(0, 1) * 255).numpy()


def warp_texture(texture: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """``texture`` sampled at (x + flow_x, y + flow_y) (bicubic, edges repeated): I1 = I0(x − u)."""
    height, width = texture.shape
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    grid = np.stack(
        [(xs + flow[0]) * 2 / (width - 1) - 1, (ys + flow[1]) * 2 / (height - 1) - 1], axis=-1
    )
    out = F.grid_sample(
        torch.from_numpy(texture)[None, None],
        torch.from_numpy(grid.astype(np.float32))[None],
        mode="bicubic",
        padding_mode="border",
        align_corners=True,
    )
    return out[0, 0].clamp(0, 255).numpy()


def moving_pair(
    height: int, width: int, flow: np.ndarray, seed: int = 0, margin: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (I0, I1) of a texture whose content moves by ``flow`` (2, H, W) from I0 to I1.

    I1(p + u(p)) = I0(p) is approximated by I1(q) = T(q − u(q)) for a smooth u; a margin of
    texture around the frame keeps the edges inside the pattern.
    """
    big = smooth_texture(height + 2 * margin, width + 2 * margin, seed)
    pad = np.pad(flow, ((0, 0), (margin, margin), (margin, margin)), mode="edge")
    frame0 = big[margin:-margin, margin:-margin]
    frame1 = warp_texture(big, -pad)[margin:-margin, margin:-margin]
    return (np.rint(frame0).astype(np.uint8), np.rint(frame1).astype(np.uint8))


def translation(height: int, width: int, dx: float, dy: float) -> np.ndarray:
    """A constant flow field (2, H, W)."""
    return np.stack([np.full((height, width), dx), np.full((height, width), dy)]).astype(np.float32)


def swirl(height: int, width: int, amplitude: float) -> np.ndarray:
    """A smooth, spatially varying flow field (2, H, W): one period of sine waves."""
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    u = amplitude * np.sin(2 * np.pi * ys / height)
    v = amplitude * np.cos(2 * np.pi * xs / width)
    return np.stack([u, v]).astype(np.float32)
