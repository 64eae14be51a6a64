"""DeepMind's I3D flow recipe: greyscale, TV-L1 between consecutive frames, clip ±20, scale to ±1.

kinetics-i3d README (DeepMind): flow inputs are TV-L1 optical flow computed on greyscale
frames at 25 fps, "pixel values are truncated to the range [-20, 20], then rescaled between
-1 and 1", and only the two flow channels (x, y) are used, with the same crop as RGB.
Greyscale is OpenCV's ``COLOR_RGB2GRAY`` on uint8: Y = 0.299 R + 0.587 G + 0.114 B in 15-bit
fixed point (9798, 19235, 3735: blue rounded down so the weights sum to 2^15), rounded; checked
equal to cv2 5.0's ``cvtColor`` on all 2^24 RGB values. The TV-L1 itself runs through one of
two implementations, named in a :class:`FlowConfig`: ``torch``
(:func:`i3d.flow.tvl1_torch.tvl1_flow`, any device) or ``opencv`` (the reference
``cv2.optflow.DualTVL1OpticalFlow``, opencv-contrib). ``raft`` (:mod:`i3d.flow.raft`,
torchvision's RAFT from a local checkpoint) replaces greyscale and TV-L1 for those who prefer
it; the bound and scaling stay, but it is not the flow the I3D Flow weights were trained on.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import numpy as np
import torch

from i3d.flow.params import OPENCV_DEFAULTS, TVL1Params
from i3d.flow.tvl1_opencv import opencv_tvl1_flow
from i3d.flow.tvl1_torch import tvl1_flow

IMPLEMENTATIONS = ("torch", "opencv", "raft")
FLOW_BOUND = 20.0
"""DeepMind truncates flow to [-20, 20] pixels before scaling it to [-1, 1]."""

_GRAY_BITS = 15
_GRAY_WEIGHTS = (9798, 19235, 3735)  # 0.299, 0.587, 0.114 × 2^15, summing to 2^15 (OpenCV's)


def _positive_int(instance: object, attribute: attrs.Attribute, value: int) -> None:
    if value < 1:
        raise ValueError(f"flow {attribute.name} must be at least 1, got {value}")


@attrs.frozen
class FlowConfig:
    """Which flow runs (``impl``: a TV-L1, or RAFT from ``raft_weights``), with what
    parameters, where, and the recipe's bound."""

    impl: Literal["torch", "opencv", "raft"] = attrs.field(
        default="torch", validator=attrs.validators.in_(IMPLEMENTATIONS)
    )
    tvl1: TVL1Params = OPENCV_DEFAULTS
    bound: float = FLOW_BOUND
    device: str = "cpu"
    """Torch device of the ``torch`` and ``raft`` implementations (``opencv``: the CPU)."""
    batch_size: int = attrs.field(default=8, validator=_positive_int)
    """Frame pairs per call (the torch TV-L1 and RAFT solve them as one batch)."""
    raft_weights: str | None = attrs.field(default=None, converter=attrs.converters.optional(str))
    """``raft``: a local torchvision RAFT checkpoint (``.pth`` or ``.safetensors``)."""

    def __attrs_post_init__(self) -> None:
        if self.impl == "raft" and self.raft_weights is None:
            raise ValueError(
                "the raft flow needs its weights: a local torchvision RAFT checkpoint "
                "(--raft-weights PATH, e.g. raft_large_C_T_SKHT_V2-ff5fadd5.pth)"
            )
        if self.impl != "raft" and self.raft_weights is not None:
            raise ValueError(
                f"RAFT weights serve the raft flow, not the {self.impl} TV-L1: pick raft as "
                "the flow implementation, or drop the RAFT weights"
            )

    @property
    def on_device(self) -> bool:
        """Whether the flow runs on ``device`` (torch TV-L1, RAFT), not always the CPU."""
        return self.impl != "opencv"

    def recorded(self) -> dict[str, Any]:
        """What decides the flow's values, as flow folders and feature outputs record it:
        the implementation, its TV-L1 parameters (or RAFT model, weights SHA-256 and
        refinements) and the bound (not where or in what batches it runs)."""
        if self.impl == "raft":
            from i3d.flow.raft import raft_recorded

            assert self.raft_weights is not None
            raft = raft_recorded(self.raft_weights)
            return {"impl": self.impl, "tvl1": None, "bound": self.bound, "raft": raft}
        return {"impl": self.impl, "tvl1": attrs.asdict(self.tvl1), "bound": self.bound}


def check_flow(config: FlowConfig) -> None:
    """Fail now, in one line, where ``config``'s flow cannot run here, rather than once per
    video: opencv without opencv-contrib, RAFT without torchvision or with weights that are
    missing or do not fit (checked on the CPU; each device builds its own model later)."""
    if config.impl == "opencv":
        from i3d.flow.tvl1_opencv import opencv_optflow

        opencv_optflow()
    elif config.impl == "raft":
        from i3d.flow.raft import raft_model

        assert config.raft_weights is not None
        raft_model(config.raft_weights, "cpu")


def rgb_to_gray(frames: np.ndarray) -> np.ndarray:
    """uint8 RGB (..., 3) → uint8 greyscale (...), bit-exact with ``cv2.COLOR_RGB2GRAY``."""
    if frames.dtype != np.uint8 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB frames (..., 3), got {frames.dtype} {frames.shape}")
    r, g, b = (frames[..., c].astype(np.int32) for c in range(3))
    wr, wg, wb = _GRAY_WEIGHTS
    gray = (r * wr + g * wg + b * wb + (1 << (_GRAY_BITS - 1))) >> _GRAY_BITS
    return gray.astype(np.uint8)


def pair_flow(gray0: np.ndarray, gray1: np.ndarray, config: FlowConfig) -> torch.Tensor:
    """Raw TV-L1 flow in pixels, (N, 2, H, W) float32 on the CPU, from (N, H, W) uint8 pairs."""
    if config.impl == "raft":
        raise ValueError("RAFT reads RGB frames, not greyscale: call frame_flow for it")
    if config.impl == "opencv":
        return torch.from_numpy(opencv_tvl1_flow(gray0, gray1, config.tvl1))
    device = torch.device(config.device)
    parts = []
    for start in range(0, len(gray0), config.batch_size):
        stop = start + config.batch_size
        a = torch.from_numpy(np.ascontiguousarray(gray0[start:stop])).to(device)
        b = torch.from_numpy(np.ascontiguousarray(gray1[start:stop])).to(device)
        parts.append(tvl1_flow(a, b, config.tvl1).cpu())
    return torch.cat(parts)


def frame_flow(frames0: np.ndarray, frames1: np.ndarray, config: FlowConfig) -> torch.Tensor:
    """Raw flow in pixels, (N, 2, H, W) float32 on the CPU, between (N, H, W, 3) uint8 RGB
    frame pairs: TV-L1 of their greyscale (:func:`pair_flow`), or RAFT of the colours."""
    if config.impl == "raft":
        from i3d.flow.raft import raft_flow

        assert config.raft_weights is not None
        return raft_flow(frames0, frames1, config.raft_weights, config.device, config.batch_size)
    return pair_flow(rgb_to_gray(frames0), rgb_to_gray(frames1), config)


def scale_flow(flow: torch.Tensor, bound: float = FLOW_BOUND) -> torch.Tensor:
    """DeepMind's scaling: flow truncated to [-bound, bound] pixels, then divided by bound."""
    return flow.clamp(-bound, bound) / bound


def deepmind_flow(
    frames: np.ndarray,
    config: FlowConfig = FlowConfig(),
    layout: Literal["tchw", "cthw"] = "tchw",
) -> torch.Tensor:
    """I3D Flow-stream input from T uint8 RGB frames (T, H, W, 3): float32 in [-1, 1].

    ``layout`` "tchw" gives (T-1, 2, H, W); "cthw" gives the model's (2, T-1, H, W). Flow t
    goes from frame t to frame t+1, channel 0 is x (right), channel 1 is y (down).
    """
    if frames.ndim != 4 or len(frames) < 2:
        raise ValueError(f"flow needs at least 2 frames (T, H, W, 3), got shape {frames.shape}")
    if layout not in ("tchw", "cthw"):
        raise ValueError(f"layout must be 'tchw' or 'cthw', not {layout!r}")
    flow = scale_flow(frame_flow(frames[:-1], frames[1:], config), config.bound)
    return flow if layout == "tchw" else flow.permute(1, 0, 2, 3).contiguous()
