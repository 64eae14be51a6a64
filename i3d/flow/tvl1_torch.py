"""Batched dual TV-L1 optical flow in plain PyTorch, step for step as OpenCV's DualTVL1.

The algorithm is Zach, Pock & Bischof (2007) in the form of Sánchez, Meinhardt-Llopis &
Facciolo, "TV-L1 Optical Flow Estimation" (IPOL 2013), with OpenCV's choices where the two
differ: the pyramid is built by repeated INTER_LINEAR resizes by ``scale_step`` (no Gaussian
pre-smoothing), warps are bicubic with zeros outside, the dual variables restart at zero on
every level, the flow is median-filtered at the start of every outer round, and a warp stops
once the summed squared update is under epsilon² × pixels. Every pair of a batch follows its
own stopping rule (masked updates), so a batch gives what each pair would give alone.
Ops are ordinary tensor ops (no custom kernels): it runs on any device torch supports. On the
CPU, threads work on separate pairs, each with single-core ops (see :func:`_solve_on_cpu`).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from i3d.flow.image_ops import (
    centered_gradient,
    median_filter,
    resize_linear,
    scaled_size,
    warp_bicubic,
)
from i3d.flow.params import OPENCV_DEFAULTS, TVL1Params

MIN_LEVEL_SIZE = 16
"""OpenCV stops adding pyramid levels when one would be under 16 pixels on a side."""
CPU_BATCH_PIXELS = 2 * 256 * 256
"""Pixels (pairs × H × W) a CPU thread solves as one batch: two 256² pairs, 22 64×48 ones."""


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
    i0: torch.Tensor, i1: torch.Tensor, flow: torch.Tensor, params: TVL1Params
) -> torch.Tensor:
    """Refine the flow (N, 2, H, W) of one pyramid level: warps × (median + primal-dual rounds).

    Both flow components and their four dual variables live in stacked tensors, so each step
    of an iteration is one tensor op (about 20 an iteration instead of 70: the op count, not
    the arithmetic, is what a 2-channel 256² field costs on the CPU).
    """
    batch, height, width = i0.shape
    scaled_epsilon = params.epsilon * params.epsilon * height * width
    l_t = params.lambda_ * params.theta
    taut = params.tau / params.theta
    tiny = torch.finfo(i0.dtype).eps
    i1x, i1y = centered_gradient(i1)
    sources = torch.stack((i1, i1x, i1y), dim=1)
    # dual[:, c, d]: the dual variable of flow component c along direction d (x, y)
    dual = i0.new_zeros(batch, 2, 2, height, width)
    # forward differences of the flow; the last column (x) and row (y) stay zero (Neumann)
    grad_u = i0.new_zeros(batch, 2, 2, height, width)
    for _ in range(params.warps):
        warped = warp_bicubic(sources, flow[:, 0], flow[:, 1])
        i1w, i1wx, i1wy = warped.unbind(dim=1)
        i1w_grad = warped[:, 1:]
        grad = i1wx * i1wx + i1wy * i1wy
        rho_c = i1w - i1wx * flow[:, 0] - i1wy * flow[:, 1] - i0
        # -1/|grad I1|², zero where the image is flat (OpenCV's data step there is below 1e-4 px)
        flat = grad <= tiny
        neg_inv_grad = (-1.0 / grad.masked_fill_(flat, 1.0)).masked_fill_(flat, 0.0)
        running = torch.ones(batch, dtype=torch.bool, device=i0.device)
        for _ in range(params.outer_iterations):
            if not bool(running.any()):
                break
            if params.median_filtering > 1:
                active = None if bool(running.all()) else running[:, None, None, None]
                fields = flow.reshape(2 * batch, height, width)
                smooth = median_filter(fields, params.median_filtering)
                flow = _masked(active, smooth.reshape(flow.shape), flow)
            for _ in range(params.inner_iterations):
                if not bool(running.any()):
                    break
                active = None if bool(running.all()) else running[:, None, None, None]
                # thresholding step: v = u + the projection that minimises the L1 data term
                # (-rho/|grad|², clamped to ±lambda*theta: OpenCV's three cases in one)
                rho = torch.addcmul(rho_c, i1wx, flow[:, 0]).addcmul_(i1wy, flow[:, 1])
                step = rho.mul_(neg_inv_grad).clamp_(-l_t, l_t)
                v = torch.addcmul(flow, step[:, None], i1w_grad)
                # primal step: u = v + theta * div(p), the backward-difference divergence
                div = dual[:, :, 0] + dual[:, :, 1]
                div[..., :, 1:] -= dual[:, :, 0, :, :-1]
                div[..., 1:, :] -= dual[:, :, 1, :-1, :]
                new_flow = v.add_(div, alpha=params.theta)
                delta = new_flow - flow
                change = delta.mul_(delta).sum(dim=(1, 2, 3))
                flow = _masked(active, new_flow, flow)
                # dual step: p = (p + taut * grad u) / (1 + taut * |grad u|)
                torch.sub(flow[..., :, 1:], flow[..., :, :-1], out=grad_u[:, :, 0, :, :-1])
                torch.sub(flow[..., 1:, :], flow[..., :-1, :], out=grad_u[:, :, 1, :-1, :])
                norm = grad_u[:, :, 0].square().add_(grad_u[:, :, 1].square()).sqrt_()
                norm = norm.mul_(taut).add_(1.0)[:, :, None]
                if active is None:
                    dual = dual.add_(grad_u, alpha=taut).div_(norm)
                else:
                    new_dual = torch.add(dual, grad_u, alpha=taut).div_(norm)
                    dual = torch.where(active[..., None], new_dual, dual)
                running = running & (change > scaled_epsilon)
    return flow


def _solve(frames0: torch.Tensor, frames1: torch.Tensor, params: TVL1Params) -> torch.Tensor:
    """TV-L1 of one batch of pairs, coarse to fine, on the calling thread."""
    dtype = frames0.dtype if frames0.dtype in (torch.float32, torch.float64) else torch.float32
    levels0 = _pyramid(frames0.to(dtype), params)
    levels1 = _pyramid(frames1.to(dtype), params)
    coarsest = levels0[-1]
    flow = coarsest.new_zeros(coarsest.shape[0], 2, *coarsest.shape[1:])
    for level in range(len(levels0) - 1, -1, -1):
        flow = _one_scale(levels0[level], levels1[level], flow, params)
        if level == 0:
            break
        size = tuple(levels0[level - 1].shape[-2:])
        flow = resize_linear(flow, size) * (1.0 / params.scale_step)
    return flow.to(torch.float32)


def _solve_serial_ops(
    frames0: torch.Tensor, frames1: torch.Tensor, params: TVL1Params
) -> torch.Tensor:
    """:func:`_solve` with this thread's tensor ops on one core (no OpenMP team, no barriers)."""
    torch.set_num_threads(1)
    return _solve(frames0, frames1, params)


def _solve_on_cpu(frames0: torch.Tensor, frames1: torch.Tensor, params: TVL1Params) -> torch.Tensor:
    """Solve the pairs in cache-sized batches, shared out over single-core threads.

    One pair is tens of thousands of small tensor ops. With intra-op threads each op is an
    OpenMP team that ends in a barrier, and on a loaded machine (more runnable threads than
    cores) a descheduled team member makes the others spin through every barrier: 2 threads
    took 60 s per 256² pair where 1 took 1.7 s, and 2.2 s per 64×48 pair where 1 took 0.34 s.
    Threads over batches never wait for each other inside an op (torch releases the GIL while
    an op runs). Batches of :data:`CPU_BATCH_PIXELS` keep a step's tensors in the core's cache:
    at 256², 8 pairs at once cost 2.08 s of CPU per pair against 1.53 s two at a time.
    """
    height, width = frames0.shape[-2:]
    step = max(1, CPU_BATCH_PIXELS // (height * width))
    batches = [
        (frames0[i : i + step], frames1[i : i + step], params)
        for i in range(0, max(len(frames0), 1), step)
    ]
    threads = torch.get_num_threads()
    if threads == 1:
        return torch.cat([_solve(*batch) for batch in batches])
    try:
        workers = min(threads, len(batches))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="tvl1") as pool:
            parts = list(pool.map(lambda batch: _solve_serial_ops(*batch), batches))
    finally:
        torch.set_num_threads(threads)  # the workers' setting also became the process default
    return torch.cat(parts)


def tvl1_flow(
    frames0: torch.Tensor, frames1: torch.Tensor, params: TVL1Params = OPENCV_DEFAULTS
) -> torch.Tensor:
    """TV-L1 flow from each frame of ``frames0`` to its partner in ``frames1``.

    Frames are (N, H, W) greyscale on OpenCV's 0-255 scale (uint8 or float; computed in
    float32 on their device). Returns (N, 2, H, W) float32 flow (x, y) in pixels, such that
    ``frames0[n](p) ≈ frames1[n](p + flow[n, :, p])``. On the CPU the pairs are shared out
    over up to ``torch.get_num_threads()`` threads, each running its ops on one core, so the
    parallelism comes from the pairs (a single pair runs on one core); other devices solve
    all the pairs as one batch.
    """
    if frames0.shape != frames1.shape or frames0.dim() != 3:
        raise ValueError(
            f"TV-L1 needs two (N, H, W) stacks of one shape, got {tuple(frames0.shape)} and "
            f"{tuple(frames1.shape)}"
        )
    if min(frames0.shape[-2:]) < 3:
        raise ValueError(f"TV-L1 needs frames of at least 3x3, got {tuple(frames0.shape[-2:])}")
    if frames0.device.type == "cpu":
        return _solve_on_cpu(frames0, frames1, params)
    return _solve(frames0, frames1, params)
