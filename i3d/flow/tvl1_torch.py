"""Batched dual TV-L1 optical flow in plain PyTorch, step for step as OpenCV's DualTVL1.

The algorithm is Zach, Pock & Bischof (2007) in the form of Sánchez, Meinhardt-Llopis &
Facciolo, "TV-L1 Optical Flow Estimation" (IPOL 2013), with OpenCV's choices where the two
differ: the pyramid is built by repeated INTER_LINEAR resizes by ``scale_step`` (no Gaussian
pre-smoothing), warps are bicubic with zeros outside, the dual variables restart at zero on
every level, the flow is median-filtered at the start of every outer round, and a warp stops
once the summed squared update is under epsilon² × pixels. Every pair of a batch follows its
own stopping rule (masked updates), so a batch gives what each pair would give alone.
Ops are ordinary tensor ops (no custom kernels): it runs on any device torch supports.
"""

from __future__ import annotations

import torch

from i3d.flow.image_ops import (
    centered_gradient,
    divergence,
    forward_gradient,
    median_filter,
    resize_linear,
    scaled_size,
    warp_bicubic,
)
from i3d.flow.params import OPENCV_DEFAULTS, TVL1Params

MIN_LEVEL_SIZE = 16
"""OpenCV stops adding pyramid levels when one would be under 16 pixels on a side."""


def _pyramid(images: torch.Tensor, params: TVL1Params) -> list[torch.Tensor]:
    """Levels finest first: each an INTER_LINEAR resize of the one above by ``scale_step``."""
    levels = [images]
    inverse = 1.0 / params.scale_step
    for _ in range(1, params.nscales):
        height, width = levels[-1].shape[-2:]
        size = scaled_size(height, width, params.scale_step)
        if min(size) < MIN_LEVEL_SIZE:
            break
        levels.append(resize_linear(levels[-1], size, (inverse, inverse)))
    return levels


def _masked(active: torch.Tensor | None, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` for pairs still iterating, ``old`` for those that have stopped."""
    return new if active is None else torch.where(active, new, old)


def _one_scale(
    i0: torch.Tensor,
    i1: torch.Tensor,
    u1: torch.Tensor,
    u2: torch.Tensor,
    params: TVL1Params,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Refine the flow (u1, u2) of one pyramid level: warps × (median + primal-dual rounds)."""
    batch, height, width = i0.shape
    scaled_epsilon = params.epsilon * params.epsilon * height * width
    l_t = params.lambda_ * params.theta
    taut = params.tau / params.theta
    tiny = torch.finfo(i0.dtype).eps
    i1x, i1y = centered_gradient(i1)
    sources = torch.stack((i1, i1x, i1y), dim=1)
    p11, p12, p21, p22 = (torch.zeros_like(i0) for _ in range(4))
    for _ in range(params.warps):
        i1w, i1wx, i1wy = warp_bicubic(sources, u1, u2).unbind(dim=1)
        grad = i1wx * i1wx + i1wy * i1wy
        rho_c = i1w - i1wx * u1 - i1wy * u2 - i0
        # 1/|grad I1|², zero where the image is flat (OpenCV's data step there is below 1e-4 px)
        inv_grad = torch.where(grad > tiny, 1.0 / torch.where(grad > tiny, grad, 1.0), 0.0)
        running = torch.ones(batch, dtype=torch.bool, device=i0.device)
        for _ in range(params.outer_iterations):
            if not bool(running.any()):
                break
            active = None if bool(running.all()) else running[:, None, None]
            if params.median_filtering > 1:
                u1 = _masked(active, median_filter(u1, params.median_filtering), u1)
                u2 = _masked(active, median_filter(u2, params.median_filtering), u2)
            for _ in range(params.inner_iterations):
                if not bool(running.any()):
                    break
                active = None if bool(running.all()) else running[:, None, None]
                # thresholding step: v = u + the projection that minimises the L1 data term
                # (-rho/|grad|², clamped to ±lambda*theta: OpenCV's three cases in one)
                rho = rho_c + i1wx * u1 + i1wy * u2
                step = (-rho * inv_grad).clamp_(-l_t, l_t)
                v1 = u1 + step * i1wx
                v2 = u2 + step * i1wy
                # primal step: u = v + theta * div(p)
                new_u1 = v1 + params.theta * divergence(p11, p12)
                new_u2 = v2 + params.theta * divergence(p21, p22)
                change = ((new_u1 - u1).square() + (new_u2 - u2).square()).sum(dim=(1, 2))
                u1 = _masked(active, new_u1, u1)
                u2 = _masked(active, new_u2, u2)
                # dual step: p = (p + taut * grad u) / (1 + taut * |grad u|)
                u1x, u1y = forward_gradient(u1)
                u2x, u2y = forward_gradient(u2)
                norm1 = 1.0 + taut * (u1x.square() + u1y.square()).sqrt_()
                norm2 = 1.0 + taut * (u2x.square() + u2y.square()).sqrt_()
                p11 = _masked(active, (p11 + taut * u1x) / norm1, p11)
                p12 = _masked(active, (p12 + taut * u1y) / norm1, p12)
                p21 = _masked(active, (p21 + taut * u2x) / norm2, p21)
                p22 = _masked(active, (p22 + taut * u2y) / norm2, p22)
                running = running & (change > scaled_epsilon)
    return u1, u2


def tvl1_flow(
    frames0: torch.Tensor, frames1: torch.Tensor, params: TVL1Params = OPENCV_DEFAULTS
) -> torch.Tensor:
    """TV-L1 flow from each frame of ``frames0`` to its partner in ``frames1``.

    Frames are (N, H, W) greyscale on OpenCV's 0-255 scale (uint8 or float; computed in
    float32 on their device). Returns (N, 2, H, W) float32 flow (x, y) in pixels, such that
    ``frames0[n](p) ≈ frames1[n](p + flow[n, :, p])``.
    """
    if frames0.shape != frames1.shape or frames0.dim() != 3:
        raise ValueError(
            f"TV-L1 needs two (N, H, W) stacks of one shape, got {tuple(frames0.shape)} and "
            f"{tuple(frames1.shape)}"
        )
    if min(frames0.shape[-2:]) < 3:
        raise ValueError(f"TV-L1 needs frames of at least 3x3, got {tuple(frames0.shape[-2:])}")
    dtype = frames0.dtype if frames0.dtype in (torch.float32, torch.float64) else torch.float32
    levels0 = _pyramid(frames0.to(dtype), params)
    levels1 = _pyramid(frames1.to(dtype), params)
    u1 = torch.zeros_like(levels0[-1])
    u2 = torch.zeros_like(levels0[-1])
    for level in range(len(levels0) - 1, -1, -1):
        u1, u2 = _one_scale(levels0[level], levels1[level], u1, u2, params)
        if level == 0:
            break
        size = tuple(levels0[level - 1].shape[-2:])
        u1 = resize_linear(u1, size) * (1.0 / params.scale_step)
        u2 = resize_linear(u2, size) * (1.0 / params.scale_step)
    return torch.stack((u1, u2), dim=1).to(torch.float32)
