"""How close two flow fields are: end-point error, the standard optical-flow measure."""

from __future__ import annotations

import numpy as np
import torch


def end_point_error(flow: torch.Tensor | np.ndarray, reference: torch.Tensor | np.ndarray) -> float:
    """Mean end-point error in pixels: the mean over pixels of |flow - reference| (2-vectors).

    Both are (..., 2, H, W) with the two flow components on axis -3.
    """
    a = torch.as_tensor(np.asarray(flow) if not isinstance(flow, torch.Tensor) else flow)
    b = torch.as_tensor(
        np.asarray(reference) if not isinstance(reference, torch.Tensor) else reference
    )
    if a.shape != b.shape or a.dim() < 3 or a.shape[-3] != 2:
        raise ValueError(
            f"EPE needs two (..., 2, H, W) flows of one shape, got {a.shape}, {b.shape}"
        )
    diff = a.to(torch.float64) - b.to(torch.float64)
    return float(diff.square().sum(dim=-3).sqrt().mean())
